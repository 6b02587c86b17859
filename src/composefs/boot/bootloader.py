"""Boot resources found in an image (composefs-rs ``bootloader.rs``). IO-free.

- Type 1: Boot Loader Specification entries ``/boot/loader/entries/*.conf``
  (their ``linux``/``initrd``/``efi`` files, resolved in the image);
- Type 2: UKIs ``/boot/EFI/Linux/**.efi`` and ``/usr/lib/modules/<kver>/**.efi``
  (an ``.efi`` directly in the scanned directory is a UKI, deeper ones,
  e.g. ``<name>.efi.extra.d/*.addon.efi``, are addons);
- ``/usr/lib/modules/<kver>/vmlinuz`` with ``initramfs.img``.

File contents are read through a `read_file(Regular) -> bytes` callback.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import BootError
from ..tree import Directory, Leaf, Regular, split_path
from .cmdline import split_cmdline

ReadFile = Callable[[Regular], bytes]

EFI_EXT = b".efi"
EFI_ADDON_DIR_EXT = b".efi.extra.d"
EFI_ADDON_FILE_EXT = b".addon.efi"
_WS = " \t\n\r\x0c"


def strip_ble_key(line: str, key: str) -> str | None:
    """The value of a ``key value`` BLS line (None if `line` is not `key`)."""
    if not line.startswith(key):
        return None
    rest = line[len(key) :]
    if not rest or rest[0] not in _WS:
        return None
    return rest.lstrip(_WS)


def _value_span(line: str, key: str) -> tuple[int, int] | None:
    value = strip_ble_key(line, key)
    if value is None:
        return None
    return len(line) - len(value), len(line)


class BootLoaderEntryFile:
    """A BLS Type 1 entry, kept as its lines."""

    def __init__(self, content: str) -> None:
        # split_terminator: a final newline does not add an empty line
        self.lines = content.split("\n")
        if self.lines and self.lines[-1] == "":
            self.lines.pop()

    def get_values(self, key: str) -> list[str]:
        return [v for line in self.lines if (v := strip_ble_key(line, key)) is not None]

    def get_value(self, key: str) -> str | None:
        vals = self.get_values(key)
        return vals[0] if vals else None

    def add_cmdline(self, arg: str) -> None:
        """Add `arg` to the ``options`` line, replacing an argument with the
        same ``key=`` (or the same bare word)."""
        eq = arg.find("=")
        key = arg[: eq + 1] if eq >= 0 else arg
        for i, line in enumerate(self.lines):
            span = _value_span(line, "options")
            if span is None:
                continue
            start = span[0]
            pos = start
            for token in split_cmdline(line[start:]):
                if token.startswith(key):
                    self.lines[i] = line[:pos] + arg + line[pos + len(token) :]
                    return
                pos += len(token) + 1
            self.lines[i] = line + " " + arg
            return
        self.lines.append(f"options {arg}")

    def adjust_cmdline(self, karg: str | None, extra: list[str]) -> None:
        if karg is not None:
            self.add_cmdline(karg)
        for item in extra:
            self.add_cmdline(item)

    def render(self) -> str:
        return "\n".join(self.lines) + "\n"


def _split_dir(root: Directory, pathname: str) -> tuple[Directory, bytes]:
    raw = pathname.encode()
    parent, _, name = raw.rpartition(b"/")
    node = root.lookup(parent) if parent else root
    if node is None:
        raise BootError(f"{pathname}: no such directory in the image")
    if not isinstance(node, Directory):
        raise BootError(f"{pathname}: not a directory in the image")
    return node, name


def _get_file(d: Directory, name: bytes, what: str) -> Regular | None:
    """A regular file entry; None if absent; error if something else."""
    node = d.entries.get(name)
    if node is None:
        return None
    if isinstance(node, Directory) or not isinstance(node.content, Regular):
        raise BootError(f"{what} is not a regular file")
    return node.content


def _get_dir(root: Directory, path: bytes) -> Directory | None:
    """The directory at `path`; None if some component is missing, an error
    if one is not a directory (composefs-rs only treats NotFound as absent)."""
    node: Directory = root
    for part in split_path(path):
        nxt = node.entries.get(part)
        if nxt is None:
            return None
        if not isinstance(nxt, Directory):
            raise BootError(f"{path.decode(errors='replace')}: not a directory")
        node = nxt
    return node


@dataclass
class Type1Entry:
    filename: str
    entry: BootLoaderEntryFile
    # absolute path (as written in the entry) -> file
    files: dict[str, Regular] = field(default_factory=dict)

    def relocate(self, boot_subdir: str | None, entry_id: str) -> None:
        """Name the entry ``<entry_id>.conf`` and move its files to
        ``/<entry_id>/<basename>``."""
        self.filename = f"{entry_id}.conf"
        for i, line in enumerate(self.lines_view()):
            for key in ("linux", "initrd", "efi"):
                span = _value_span(line, key)
                if span is None:
                    continue
                value = line[span[0] :]
                if "/" not in value:
                    continue
                basename = value.rsplit("/", 1)[1]
                file = self.files.pop(value, None)
                new = f"/{entry_id}/{basename}"
                final = f"/{boot_subdir}{new}" if boot_subdir is not None else new
                line = line[: span[0]] + final
                self.entry.lines[i] = line
                if file is not None:
                    self.files[new] = file

    def lines_view(self) -> list[str]:
        return list(self.entry.lines)

    @classmethod
    def load(cls, filename: str, data: bytes, root: Directory) -> Type1Entry:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise BootError(f"/boot/loader/entries/{filename} is not UTF-8") from None
        entry = BootLoaderEntryFile(text)
        files: dict[str, Regular] = {}
        for key in ("linux", "initrd", "efi"):
            for pathname in entry.get_values(key):
                d, name = _split_dir(root, pathname)
                f = _get_file(d, name, pathname)
                if f is None:
                    raise BootError(f"{pathname}: no such file in the image")
                files[pathname] = f
        return cls(filename, entry, files)

    @classmethod
    def load_all(cls, root: Directory, read_file: ReadFile) -> list[Type1Entry]:
        out: list[Type1Entry] = []
        d = _get_dir(root, b"/boot/loader/entries")
        if d is None:
            return out
        for name, node in d.sorted_entries():
            if not name.endswith(b".conf"):
                continue
            fname = name.decode(errors="surrogateescape")
            if isinstance(node, Directory):
                raise BootError(f"/boot/loader/entries/{fname} is a directory")
            if not isinstance(node.content, Regular):
                raise BootError(f"/boot/loader/entries/{fname} is not a regular file")
            out.append(cls.load(fname, read_file(node.content), root))
        return out


class PEType(enum.Enum):
    UKI = "uki"
    UKI_ADDON = "uki-addon"


@dataclass
class Type2Entry:
    kver: bytes | None
    file_path: bytes  # relative to the scanned directory
    file: Regular
    pe_type: PEType

    def rename(self, name: str) -> None:
        parent, _, _ = self.file_path.rpartition(b"/")
        new = name.encode() + EFI_EXT
        self.file_path = parent + b"/" + new if parent else new

    @classmethod
    def _find(
        cls, d: Directory, out: list[Type2Entry], prefix: list[bytes], kver: bytes | None
    ) -> None:
        for name, node in d.sorted_entries():
            if isinstance(node, Directory):
                cls._find(node, out, [*prefix, name], kver)
                continue
            if not name.endswith(EFI_EXT):
                continue
            if not isinstance(node.content, Regular):
                raise BootError(f"{name.decode(errors='replace')} is not a regular file")
            parts = [*prefix, name]
            pe_type = PEType.UKI if len(parts) == 1 else PEType.UKI_ADDON
            out.append(cls(kver, b"/".join(parts), node.content, pe_type))

    @classmethod
    def load_all(cls, root: Directory) -> list[Type2Entry]:
        out: list[Type2Entry] = []
        d = _get_dir(root, b"/boot/EFI/Linux")
        if d is not None:
            cls._find(d, out, [], None)
        modules = _get_dir(root, b"/usr/lib/modules")
        if modules is not None:
            for kver, node in modules.sorted_entries():
                if isinstance(node, Directory):
                    cls._find(node, out, [], kver)
        return out


@dataclass
class UsrLibModulesVmlinuz:
    kver: str
    vmlinuz: Regular
    initramfs: Regular | None
    os_release: Regular | None

    def into_type1(self, entry_id: str | None) -> Type1Entry:
        id_ = entry_id if entry_id is not None else self.kver
        if self.initramfs is None:
            raise BootError(
                f"kernel {self.kver} has no initramfs.img in /usr/lib/modules/{self.kver}"
            )
        entry = BootLoaderEntryFile(
            "# File created by composefs\n"
            "title todoOS\n"
            "version 0-todo\n"
            f"linux /{id_}/vmlinuz\n"
            f"initrd /{id_}/initramfs.img\n"
        )
        return Type1Entry(
            f"{id_}.conf",
            entry,
            {f"/{id_}/vmlinuz": self.vmlinuz, f"/{id_}/initramfs.img": self.initramfs},
        )

    @classmethod
    def load_all(cls, root: Directory) -> list[UsrLibModulesVmlinuz]:
        out: list[UsrLibModulesVmlinuz] = []
        modules = _get_dir(root, b"/usr/lib/modules")
        if modules is None:
            return out
        for kver, node in modules.sorted_entries():
            if not isinstance(node, Directory):
                continue
            vmlinuz = _regular(node.entries.get(b"vmlinuz"))
            if vmlinuz is None:
                continue
            try:
                kver_s = kver.decode("utf-8")
            except UnicodeDecodeError:
                raise BootError(f"/usr/lib/modules/{kver!r}: kernel version is not UTF-8") from None
            out.append(
                cls(
                    kver_s,
                    vmlinuz,
                    _regular(node.entries.get(b"initramfs.img")),
                    _regular(root.lookup(b"/usr/lib/os-release")),
                )
            )
        return out


def _regular(node: Directory | Leaf | None) -> Regular | None:
    if isinstance(node, Leaf) and isinstance(node.content, Regular):
        return node.content
    return None


BootEntry = Type1Entry | Type2Entry | UsrLibModulesVmlinuz


def get_boot_resources(root: Directory, read_file: ReadFile) -> list[BootEntry]:
    """Type 1 entries, then Type 2, then /usr/lib/modules kernels."""
    out: list[BootEntry] = []
    out.extend(Type1Entry.load_all(root, read_file))
    out.extend(Type2Entry.load_all(root))
    out.extend(UsrLibModulesVmlinuz.load_all(root))
    return out
