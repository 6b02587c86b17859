"""From OCI layer tars to one composefs tree (IO-free).

`LayerMerger` applies layers in manifest order. The rules follow the OCI
image-spec layer semantics; where composefs-rs 0.7.0 deviates from them we
follow the spec (project decision), and every image composefs-rs accepts and
handles per spec gets the same tree (so the same image id):

- whiteouts ``.wh.NAME`` and opaque markers ``.wh..wh..opq`` hide entries
  of *lower* layers only, wherever they stand in their own layer's tar
  (composefs-rs also clears entries that came earlier in the same layer).
  Any other ``.wh.``-prefixed name is a whiteout of the rest of the name.
- a directory declared again keeps its children; its metadata is replaced.
  A non-directory replaces whatever was there (a directory with all its
  children included). Within a layer the last entry for a path wins.
- a missing parent directory is created as 0755, uid/gid 0, mtime 0, no
  xattrs (composefs-rs fails the import); such an implicit directory never
  overrides the metadata of a directory that exists in a lower layer.
- a hardlink shares the inode of its target, looked up in this layer first
  (entries seen so far) and then in the lower layers. When the target path
  is replaced later, the link keeps the old inode. Hardlinks to directories
  and to missing targets are errors.
- names: ``./x`` is ``x``; a leading ``/`` is dropped (absolute names are
  relative to the image root); an entry for ``.``, ``./`` or ``/`` sets the
  root's metadata (a directory only; composefs later replaces it with
  ``/usr``'s). A ``..`` component anywhere in a name or a hardlink target is
  rejected rather than clamped: no legitimate layer needs it, and silently
  re-rooting it would hide a hostile or broken tar. Components longer than
  255 bytes are rejected (no filesystem can hold them).
- a name whose parent exists but is not a directory (e.g. ``/lib/x`` when
  ``/lib`` is a symlink) is an error: the tree is never walked through
  symlinks, and unlike extracting a tar to disk we do not follow them.

The merged tree then gets `transform_for_oci` (root metadata from ``/usr``,
``/run`` emptied; an image without ``/usr`` keeps its root metadata).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .. import limits
from ..errors import OciError
from ..tree import (
    S_IFBLK,
    S_IFCHR,
    Device,
    Directory,
    Fifo,
    Leaf,
    LeafContent,
    Regular,
    Stat,
    Symlink,
)
from .tar import BLK, CHR, DIR, FIFO, HARDLINK, INLINE_MAX, REG, SYMLINK, TarEntry, TarMember

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"
NAME_MAX = limits.NAME_MAX
SYMLINK_MAX = limits.SYMLINK_MAX

DigestFn = Callable[[bytes], str]


def _show(path: bytes) -> str:
    return limits.show(path)


def split_name(path: bytes) -> list[bytes]:
    """Normalised components of a tar name (see the module docstring)."""
    parts = [p for p in path.split(b"/") if p and p != b"."]
    for p in parts:
        if p == b"..":
            raise OciError(f"layer entry {_show(path)}: '..' is not allowed in names")
        if len(p) > NAME_MAX:
            raise OciError(f"layer entry {_show(path)}: a name component is longer than 255 bytes")
    return parts


def default_dir_stat() -> Stat:
    """Metadata of an implicitly created directory."""
    return Stat(0o755, 0, 0, 0, 0)


def entry_stat(entry: TarEntry) -> Stat:
    return Stat(entry.mode, entry.uid, entry.gid, entry.mtime, entry.mtime_nsec, dict(entry.xattrs))


def leaf_content(member: TarMember, *, large_inline: DigestFn | None = None) -> LeafContent:
    """The tree content of a non-directory, non-hardlink member.

    Regular files must come back from a split stream the way composefs-rs
    stores them: at most 64 bytes inline, larger ones external. For plain
    tars (tests, tools) `large_inline` may compute the digest of larger
    inline data instead.
    """
    e = member.entry
    if e.kind == REG:
        if member.external is not None:
            if e.size <= INLINE_MAX:
                raise OciError(f"layer stream stores the small file {_show(e.path)} externally")
            return Regular(e.size, digest=member.external)
        data = member.data if member.data is not None else b""
        if len(data) > INLINE_MAX:
            if large_inline is None:
                raise OciError(f"layer stream stores the large file {_show(e.path)} inline")
            return Regular(e.size, digest=large_inline(data))
        return Regular(e.size, data=data)
    if e.kind == SYMLINK:
        if len(e.linkname) > SYMLINK_MAX:
            raise OciError(f"symlink {_show(e.path)}: target is longer than {SYMLINK_MAX} bytes")
        return Symlink(e.linkname)
    if e.kind == CHR:
        return Device(S_IFCHR, e.rdev)
    if e.kind == BLK:
        return Device(S_IFBLK, e.rdev)
    if e.kind == FIFO:
        return Fifo()
    raise OciError(f"layer entry {_show(e.path)}: unexpected kind {e.kind}")


class _Layer:
    """One layer's own entries (an 'upper' tree) plus its whiteouts."""

    def __init__(self, lower: Directory) -> None:
        self.lower = lower
        self.root = Directory(default_dir_stat())
        self.root_stat: Stat | None = None
        self.explicit: set[int] = set()  # id() of directories the tar declares
        self.whiteouts: list[list[bytes]] = []
        self.opaque: list[list[bytes]] = []

    def _parent(self, parts: list[bytes], path: bytes) -> Directory:
        d = self.root
        for i, name in enumerate(parts):
            node = d.entries.get(name)
            if node is None:
                node = Directory(default_dir_stat())
                d.entries[name] = node
            elif not isinstance(node, Directory):
                parent = b"/" + b"/".join(parts[: i + 1])
                raise OciError(f"layer entry {_show(path)}: {_show(parent)} is not a directory")
            d = node
        return d

    def _find_leaf(self, parts: list[bytes], link: bytes, path: bytes) -> Leaf:
        # This layer first: its entries shadow the lower layers'.
        node: Directory | Leaf | None = self.root
        for name in parts:
            if not isinstance(node, Directory):
                node = None
                break
            node = node.entries.get(name)
            if node is None:
                break
        if node is None:
            node = self.lower.lookup(b"/".join(parts))
            # A lower path under something this layer replaced is gone.
            d: Directory | Leaf | None = self.root
            for name in parts[:-1]:
                d = d.entries.get(name) if isinstance(d, Directory) else None
                if d is None:
                    break
                if not isinstance(d, Directory):
                    node = None
                    break
        if node is None:
            raise OciError(f"hardlink {_show(path)}: target {_show(link)} does not exist")
        if isinstance(node, Directory):
            raise OciError(f"hardlink {_show(path)}: target {_show(link)} is a directory")
        return node

    def add(self, member: TarMember, large_inline: DigestFn | None) -> None:
        e = member.entry
        parts = split_name(e.path)
        if not parts:
            if e.kind != DIR:
                raise OciError(f"layer entry {_show(e.path)}: the root must be a directory")
            self.root_stat = entry_stat(e)
            return
        name = parts[-1]
        if name.startswith(WHITEOUT_PREFIX):
            if name == OPAQUE_MARKER:
                self.opaque.append(parts[:-1])
            else:
                target = name[len(WHITEOUT_PREFIX) :]
                # ".wh..wh.*" names other than the opaque marker are aufs
                # bookkeeping; like composefs-rs they whiteout a name that
                # cannot exist, i.e. nothing.
                if target and target not in (b".", b".."):
                    self.whiteouts.append([*parts[:-1], target])
            return
        parent = self._parent(parts[:-1], e.path)
        if e.kind == DIR:
            existing = parent.entries.get(name)
            if isinstance(existing, Directory):
                existing.stat = entry_stat(e)
            else:
                existing = Directory(entry_stat(e))
                parent.entries[name] = existing
            self.explicit.add(id(existing))
            return
        if e.kind == HARDLINK:
            target_parts = split_name(e.linkname)
            if not target_parts:
                raise OciError(f"hardlink {_show(e.path)}: target is the root directory")
            parent.entries[name] = self._find_leaf(target_parts, e.linkname, e.path)
            return
        parent.entries[name] = Leaf(entry_stat(e), leaf_content(member, large_inline=large_inline))

    def apply(self) -> None:
        """Merge this layer onto the lower tree."""
        lower = self.lower
        for parts in self.opaque:
            node = lower.lookup(b"/".join(parts))
            if isinstance(node, Directory):
                node.entries.clear()
        for parts in self.whiteouts:
            node = lower.lookup(b"/".join(parts[:-1]))
            if isinstance(node, Directory):
                node.entries.pop(parts[-1], None)
        if self.root_stat is not None:
            lower.stat = self.root_stat
        stack: list[tuple[Directory, Directory, bytes]] = [(lower, self.root, b"")]
        while stack:
            tdir, udir, base = stack.pop()
            for name, unode in udir.entries.items():
                tnode = tdir.entries.get(name)
                if isinstance(unode, Directory):
                    if isinstance(tnode, Directory):
                        if id(unode) in self.explicit:
                            tnode.stat = unode.stat
                        stack.append((tnode, unode, base + b"/" + name))
                        continue
                    if tnode is not None and id(unode) not in self.explicit:
                        # Entries below a lower-layer non-directory: we do not
                        # follow symlinks, and silently replacing it would drop it.
                        raise OciError(
                            f"layer adds entries below {_show(base + b'/' + name)}, "
                            "which is not a directory in a lower layer"
                        )
                tdir.entries[name] = unode


class LayerMerger:
    """Builds the merged filesystem of an image, one layer at a time."""

    def __init__(self) -> None:
        self.root = Directory(default_dir_stat())
        self.layers = 0

    def add_layer(
        self, members: Iterable[TarMember], *, large_inline: DigestFn | None = None
    ) -> None:
        layer = _Layer(self.root)
        for member in members:
            layer.add(member, large_inline)
        layer.apply()
        self.layers += 1

    def finish(self, *, transform: bool = True) -> Directory:
        """The merged tree, with `transform_for_oci` applied unless disabled."""
        if transform:
            transform_for_oci(self.root)
        return self.root


def transform_for_oci(root: Directory) -> None:
    """composefs-rs ``transform_for_oci`` (`composefs.fs.transform_for_oci`):
    root metadata from ``/usr``, ``/run`` emptied. composefs-rs fails on an
    image without ``/usr``; we keep the root's metadata then and still
    empty ``/run``."""
    from .. import fs

    if isinstance(root.entries.get(b"usr"), Directory):
        fs.transform_for_oci(root)
        return
    run = root.entries.get(b"run")
    if isinstance(run, Directory):
        run.entries.clear()


def merge_layers(
    layers: Iterable[Iterable[TarMember]],
    *,
    transform: bool = True,
    large_inline: DigestFn | None = None,
) -> Directory:
    """Merge layers (each an iterable of members, lowest first) into one tree."""
    merger = LayerMerger()
    for members in layers:
        merger.add_layer(members, large_inline=large_inline)
    return merger.finish(transform=transform)
