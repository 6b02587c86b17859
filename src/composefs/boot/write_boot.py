"""Install a boot entry under a boot directory (composefs-rs ``write_boot.rs``).

Type 1: kernel/initrd copied to ``<bootdir>/<path in entry>``, the entry to
``<bootdir>/loader/entries/<file>`` with the composefs karg and extra
``--cmdline`` arguments in its ``options`` line. Type 2: the UKI copied to
``<bootdir>/EFI/Linux/<path>`` after checking that its embedded
``.cmdline`` names the image. Files are written atomically (temp + rename),
so an error leaves no partial file behind.
"""

from __future__ import annotations

import io
import mmap
import os
import shutil
from collections.abc import Callable
from typing import BinaryIO

from .._atomic import replacing
from ..errors import BootError
from ..tree import Regular
from . import uki
from .bootloader import BootEntry, Type1Entry, Type2Entry, UsrLibModulesVmlinuz
from .cmdline import ComposefsCmdline

# Opens a tree file's content for reading (inline data or a repository object).
OpenFile = Callable[[Regular], BinaryIO]


def _write_atomic(path: str, data: bytes | BinaryIO) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with replacing(path, mode=0o644, sync=True) as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            shutil.copyfileobj(data, f, 1 << 20)  # streamed: kernels are big


def _inside(bootdir: str, rel: str) -> str:
    """`rel` (from the image) joined under bootdir, refusing ``..`` escapes."""
    parts = [p for p in rel.split("/") if p and p != "."]
    if not parts or ".." in parts:
        raise BootError(f"refusing to write {rel!r} outside the boot directory")
    return os.path.join(bootdir, *parts)


def write_t1_simple(
    t1: Type1Entry,
    bootdir: str,
    boot_subdir: str | None,
    karg: ComposefsCmdline,
    cmdline_extra: list[str],
    open_file: OpenFile,
) -> list[str]:
    if boot_subdir is not None:
        bootdir = os.path.join(bootdir, boot_subdir.lstrip("/"))
    t1.entry.adjust_cmdline(karg.to_cmdline_arg(), cmdline_extra)
    entry_path = _inside(os.path.join(bootdir, "loader", "entries"), t1.filename)
    written: list[str] = []
    # Content first, the loader entry last (a bootloader never sees an
    # entry whose files are missing).
    for name, file in sorted(t1.files.items()):
        target = _inside(bootdir, name)
        with open_file(file) as src:
            _write_atomic(target, src)
        written.append(target)
    _write_atomic(entry_path, t1.entry.render().encode())
    written.append(entry_path)
    return written


def write_t2_simple(
    t2: Type2Entry, bootdir: str, acceptable: list[str], open_file: OpenFile
) -> list[str]:
    target = _inside(
        os.path.join(bootdir, "EFI", "Linux"), t2.file_path.decode(errors="surrogateescape")
    )
    with open_file(t2.file) as src:
        if isinstance(src, io.BytesIO):
            _check_uki(src.getvalue(), acceptable)
        else:
            # Map the UKI instead of reading it: only its headers and
            # .cmdline are looked at.
            with mmap.mmap(src.fileno(), 0, prot=mmap.PROT_READ) as m:
                _check_uki(m, acceptable)
        src.seek(0)
        _write_atomic(target, src)
    return [target]


def _check_uki(content: uki.Buffer, acceptable: list[str]) -> None:
    cmdline = uki.get_cmdline(content)
    try:
        parsed = ComposefsCmdline.from_cmdline(cmdline, _algorithm_of(acceptable))
    except BootError as e:
        raise BootError(f"parsing UKI .cmdline section: {cmdline!r}: {e}") from None
    if parsed is None:
        raise BootError(
            f"UKI .cmdline has no composefs karg (composefs= or composefs.digest=): {cmdline!r}"
        )
    parsed.validate_digest(acceptable)


def _algorithm_of(digests: list[str]) -> str:
    return "sha512" if digests and len(digests[0]) == 128 else "sha256"


def write_boot_simple(
    open_file: OpenFile,
    entry: BootEntry,
    karg: ComposefsCmdline,
    bootdir: str,
    boot_subdir: str | None = None,
    entry_id: str | None = None,
    cmdline_extra: list[str] | None = None,
) -> list[str]:
    """Write one boot entry; returns the paths written."""
    extra = list(cmdline_extra or [])
    if entry_id is not None and (not entry_id or "/" in entry_id or entry_id in (".", "..")):
        raise BootError(f"invalid entry id {entry_id!r}")
    if isinstance(entry, Type1Entry):
        if entry_id is not None:
            entry.relocate(boot_subdir, entry_id)
        return write_t1_simple(entry, bootdir, boot_subdir, karg, extra, open_file)
    if isinstance(entry, Type2Entry):
        if entry_id is not None:
            entry.rename(entry_id)
        if extra:
            raise BootError("Can't add --cmdline args to UKIs")
        return write_t2_simple(entry, bootdir, [karg.digest], open_file)
    assert isinstance(entry, UsrLibModulesVmlinuz)
    t1 = entry.into_type1(entry_id)
    if entry_id is not None:
        t1.relocate(boot_subdir, entry_id)
    return write_t1_simple(t1, bootdir, boot_subdir, karg, extra, open_file)
