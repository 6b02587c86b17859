"""The in-memory filesystem tree that every composefs format reads and writes.

IO-free. A tree is a `Directory` root whose entries map byte-string names to
`Directory` or `Leaf` objects. Hardlinks are the *same* `Leaf` object stored
under several names; link counts are derived from that (or taken from an
explicit `Leaf.nlink`, which C mkcomposefs honours for dumpfile input).

`Stat.mode` holds permission bits only (mode & 0o7777); the file type comes
from the node class and the leaf content.
"""

from __future__ import annotations

import gc
import stat as _stat
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import TreeError

S_IFMT = _stat.S_IFMT(0o170000)
S_IFDIR = _stat.S_IFDIR
S_IFREG = _stat.S_IFREG
S_IFLNK = _stat.S_IFLNK
S_IFBLK = _stat.S_IFBLK
S_IFCHR = _stat.S_IFCHR
S_IFIFO = _stat.S_IFIFO
S_IFSOCK = _stat.S_IFSOCK


# Plain __slots__ classes rather than dataclasses: importing `dataclasses`
# (and with it `inspect`) costs ~8 ms at every start of every CLI tool.
# The dumpfile parser's fast path builds Stat, Regular and Leaf without
# calling them (object.__new__ and one store per slot): a slot added to one
# of those must be set there too.


class Stat:
    """Metadata shared by every node. `xattrs` maps full names to values."""

    __slots__ = ("gid", "mode", "mtime", "mtime_nsec", "uid", "xattrs")

    def __init__(
        self,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
        mtime_nsec: int = 0,
        xattrs: dict[bytes, bytes] | None = None,
    ) -> None:
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.mtime = mtime
        self.mtime_nsec = mtime_nsec
        self.xattrs: dict[bytes, bytes] = {} if xattrs is None else xattrs

    def _key(self) -> tuple[int, int, int, int, int, dict[bytes, bytes]]:
        return (self.mode, self.uid, self.gid, self.mtime, self.mtime_nsec, self.xattrs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stat) and self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it was

    def __repr__(self) -> str:
        return (
            f"Stat(mode={self.mode:#o}, uid={self.uid}, gid={self.gid}, "
            f"mtime={self.mtime}, mtime_nsec={self.mtime_nsec}, xattrs={self.xattrs!r})"
        )

    def copy(self) -> Stat:
        return Stat(self.mode, self.uid, self.gid, self.mtime, self.mtime_nsec, dict(self.xattrs))


class Regular:
    """A regular file: inline `data`, or external content named by `digest`.

    `data is not None` means the content is stored inline (its length is
    `size`). Otherwise a file with `size > 0` is external: it carries the
    fs-verity `digest` (lowercase hex, sha256 or sha512) of its content and
    optionally an explicit backing `payload` path (C dumpfiles may name one
    that is not derived from the digest, or give neither, as C allows).
    """

    __slots__ = ("data", "digest", "payload", "size")

    def __init__(
        self,
        size: int = 0,
        data: bytes | None = None,
        digest: str | None = None,
        payload: bytes | None = None,
    ) -> None:
        self.size = size
        self.data = data
        self.digest = digest
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Regular) and (
            self.size, self.data, self.digest, self.payload
        ) == (other.size, other.data, other.digest, other.payload)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"Regular(size={self.size}, data={self.data!r}, digest={self.digest!r}, "
            f"payload={self.payload!r})"
        )

    @property
    def is_inline(self) -> bool:
        return self.data is not None

    @property
    def is_external(self) -> bool:
        return self.data is None and self.size > 0

    def backing_path(self) -> bytes | None:
        """The object path relative to the object store (`xx/yyyy…`).

        An empty `payload` means "explicitly none": C writes no overlay
        redirect for a dumpfile line with a digest but payload `-`.
        """
        if self.payload is not None:
            return self.payload or None
        if self.digest is not None:
            return f"{self.digest[:2]}/{self.digest[2:]}".encode()
        return None


class Symlink:
    __slots__ = ("target",)

    def __init__(self, target: bytes) -> None:
        self.target = target

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Symlink) and self.target == other.target

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Symlink(target={self.target!r})"


class Device:
    """A block or character device; a character device 0:0 is a whiteout."""

    __slots__ = ("kind", "rdev")

    def __init__(self, kind: int, rdev: int = 0) -> None:
        self.kind = kind  # S_IFBLK or S_IFCHR
        self.rdev = rdev

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Device) and (self.kind, self.rdev) == (other.kind, other.rdev)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Device(kind={self.kind:#o}, rdev={self.rdev})"


class Fifo:
    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fifo)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Fifo()"


class Socket:
    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Socket)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return "Socket()"


LeafContent = Regular | Symlink | Device | Fifo | Socket


def content_type(content: LeafContent) -> int:
    """The S_IF* type bits of a leaf's content."""
    if isinstance(content, Regular):
        return S_IFREG
    if isinstance(content, Symlink):
        return S_IFLNK
    if isinstance(content, Device):
        return content.kind
    if isinstance(content, Fifo):
        return S_IFIFO
    return S_IFSOCK


class Leaf:
    """A non-directory inode. Share one object between names for a hardlink."""

    __slots__ = ("content", "nlink", "primary", "stat")

    def __init__(self, stat: Stat, content: LeafContent, nlink: int | None = None) -> None:
        self.stat = stat
        self.content = content
        # Explicit link count (C dumpfile semantics); None means "count the names".
        self.nlink = nlink
        # For a hardlinked leaf: the absolute path of the name that is the
        # inode's own (a dumpfile's non-`@` line). C places the inode there;
        # None (or a path that no longer names this leaf) means the first
        # name in depth-first sorted order, as C reads an image back.
        self.primary: bytes | None = None

    @property
    def file_type(self) -> int:
        return content_type(self.content)

    @property
    def mode(self) -> int:
        """Full st_mode: type bits | permission bits."""
        return content_type(self.content) | (self.stat.mode & 0o7777)

    def is_whiteout(self) -> bool:
        c = self.content
        return isinstance(c, Device) and c.kind == S_IFCHR and c.rdev == 0

    def __repr__(self) -> str:
        return f"Leaf({self.stat!r}, {self.content!r}, nlink={self.nlink})"


class Directory:
    """A directory: metadata plus entries. Iterate `sorted_entries()` for the
    canonical bytewise order every format uses."""

    __slots__ = ("entries", "size", "stat")

    def __init__(self, stat: Stat | None = None) -> None:
        self.stat = stat if stat is not None else Stat(0o755)
        self.entries: dict[bytes, Directory | Leaf] = {}
        # Informational only: the SIZE a dumpfile gave, or the EROFS i_size an
        # image had (C `composefs-info dump` prints it). Writers recompute it.
        self.size: int | None = None

    file_type = S_IFDIR

    @property
    def mode(self) -> int:
        return S_IFDIR | (self.stat.mode & 0o7777)

    def sorted_entries(self) -> list[tuple[bytes, Directory | Leaf]]:
        return sorted(self.entries.items())

    def subdir_count(self) -> int:
        return sum(1 for e in self.entries.values() if isinstance(e, Directory))

    def nlink(self) -> int:
        return 2 + self.subdir_count()

    # -- path helpers -------------------------------------------------
    def lookup(self, path: bytes) -> Directory | Leaf | None:
        """Find an entry by absolute or relative path (no symlink following)."""
        node: Directory | Leaf = self
        for part in split_path(path):
            if not isinstance(node, Directory):
                return None
            nxt = node.entries.get(part)
            if nxt is None:
                return None
            node = nxt
        return node

    def get_dir(self, path: bytes) -> Directory:
        node = self.lookup(path)
        if not isinstance(node, Directory):
            raise TreeError(f"not a directory: {path!r}")
        return node

    def insert(self, path: bytes, node: Directory | Leaf) -> None:
        """Insert `node` at `path`; the parent directory must exist."""
        parts = split_path(path)
        if not parts:
            raise TreeError("cannot insert the root")
        parent = self.get_dir(b"/".join(parts[:-1]))
        parent.entries[parts[-1]] = node

    def __repr__(self) -> str:
        return f"Directory({self.stat!r}, {len(self.entries)} entries)"


def split_path(path: bytes) -> list[bytes]:
    return [p for p in path.split(b"/") if p and p != b"."]


def walk(root: Directory, prefix: bytes = b"/") -> Iterator[tuple[bytes, Directory | Leaf]]:
    """Depth-first walk in sorted order, yielding (path, node), the root first.

    A directory's children come before its later siblings (the dumpfile
    order). Iterative, so trees deeper than Python's recursion limit work.
    """
    yield prefix, root
    # One path buffer, cut back to the parent's length at each step: the
    # stack holds lengths, not every ancestor's path (quadratic in depth).
    path = bytearray(prefix.rstrip(b"/"))
    stack: list[tuple[int, Iterator[tuple[bytes, Directory | Leaf]]]] = [
        (len(path), iter(root.sorted_entries()))
    ]
    while stack:
        base, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            continue
        name, child = nxt
        del path[base:]
        path += b"/"
        path += name
        yield bytes(path), child
        if isinstance(child, Directory):
            stack.append((len(path), iter(child.sorted_entries())))


def iter_leaves(root: Directory) -> Iterator[Leaf]:
    """Every leaf under `root`, once per name (a hardlinked leaf comes once
    for each of its names), in no particular order; iterative."""
    todo = [root]
    while todo:
        d = todo.pop()
        for child in d.entries.values():
            if isinstance(child, Directory):
                todo.append(child)
            else:
                yield child


def leaf_link_counts(root: Directory) -> dict[int, int]:
    """How many names each leaf has, keyed by id(leaf)."""
    # The iter_leaves walk, inlined: this runs for every image read and
    # dumpfile written, and the generator would make it about 12% slower.
    counts: dict[int, int] = {}
    todo = [root]
    while todo:
        d = todo.pop()
        for child in d.entries.values():
            if isinstance(child, Directory):
                todo.append(child)
            else:
                counts[id(child)] = counts.get(id(child), 0) + 1
    return counts


@contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector. Building or walking a large tree
    allocates many objects and no cycles: the collector would only rescan
    them again and again (about a third of the parse time)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
