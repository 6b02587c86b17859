"""A composefs image as a read-only filesystem: what FUSE requests answer.

Binding-free (the /dev/fuse session lives in `composefs.fuse.session`), so every
answer is testable without a mount. The image is validated whole by the
hardened reader (`erofs.reader.read_image`) when the filesystem is created;
requests then read inodes lazily through `erofs.reader.ImageView` and cache
what they parsed.

What a request sees is what the kernel composefs mount (overlayfs over the
EROFS image with the object store as data-only layer) shows for the same
image:

* inode numbers are EROFS nids (as the kernel's, so hardlinks share one and
  they are stable across mounts); FUSE's root node id 1 stands for the root
  nid;
* native whiteouts (character devices 0:0) are invisible, as overlayfs hides
  them in its lowest layer; escaped whiteouts are plain empty files;
* xattrs as overlayfs presents them: ``trusted.overlay.*`` hidden,
  ``trusted.overlay.overlay.X`` shown as ``trusted.overlay.X``, and
  ``trusted.*`` listed only to privileged callers;
* external files read from the first base directory that has the backing
  object; with an fs-verity digest in the image, the object's digest is
  computed (once per inode and object state) before any byte is served, and
  a mismatch, a missing object or a path escaping the base directory is EIO.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .. import fsverity
from ..erofs import format as fmt
from ..erofs.reader import ImageView, RawInode, read_image

__all__ = ["ROOT_ID", "Attr", "FsError", "ImageFilesystem", "OpenFile"]

# FUSE_ROOT_ID: the node id the kernel uses for the mount's root.
ROOT_ID = 1

_OVERLAY = fmt.XATTR_OVERLAY_PREFIX
_ESCAPED = fmt.XATTR_OVERLAY_ESCAPED_PREFIX
_TRUSTED = b"trusted."
_METACOPY = fmt.XATTR_OVERLAY_METACOPY
_REDIRECT = fmt.XATTR_OVERLAY_REDIRECT
_DIGEST_ALGS = {32: "sha256", 64: "sha512"}


class FsError(Exception):
    """A request's failure: an errno for the kernel (not user-facing)."""

    def __init__(self, errno_: int) -> None:
        super().__init__(errno_, os.strerror(errno_))
        self.errno = errno_


@dataclass(frozen=True, slots=True)
class Attr:
    """An inode's attributes; `ino` is st_ino (the nid), `node_id` FUSE's id."""

    ino: int
    node_id: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    rdev: int
    mtime: int
    mtime_nsec: int

    @property
    def mtime_ns(self) -> int:
        return self.mtime * 1_000_000_000 + self.mtime_nsec


@dataclass(slots=True)
class OpenFile:
    """An open regular file: an object fd (external) or the inline bytes."""

    node_id: int
    fd: int | None
    data: bytes | None
    size: int


class _Node:
    __slots__ = ("attr", "entries", "index", "inode", "lock", "verdict", "xattrs")

    def __init__(self, inode: RawInode, attr: Attr, xattrs: list[tuple[bytes, bytes]]) -> None:
        self.inode = inode
        self.attr = attr
        # (name as overlayfs shows it, value, needs privilege)
        self.xattrs = xattrs
        # Directories: visible (name, nid) incl. "." and "..", and name -> nid.
        self.entries: list[tuple[bytes, int]] | None = None
        self.index: dict[bytes, int] | None = None
        # External files: (object identity, digest matched) of the last check.
        self.verdict: tuple[tuple[int, ...], bool] | None = None
        self.lock: threading.Lock | None = None


def _overlay_name(name: bytes) -> bytes | None:
    """The name overlayfs shows for a stored xattr (None: hidden)."""
    if name.startswith(_OVERLAY):
        if name.startswith(_ESCAPED):
            return _OVERLAY + name[len(_ESCAPED) :]
        return None
    return name


class ImageFilesystem:
    """Answers for one image; `basedirs` are directory fds (not closed here)."""

    def __init__(self, image: bytes, basedirs: Sequence[int], *, verify: bool = True) -> None:
        read_image(image)  # the hardened reader: refuse a bad image now, whole
        self._view = ImageView(image)
        self.root_nid = self._view.info.root_nid
        self._basedirs = list(basedirs)
        self._verify = verify
        self._nodes: dict[int, _Node] = {}
        # Digests are computed in worker threads: one check per node at a
        # time, different files in parallel.
        self._locks_lock = threading.Lock()

    # -- ids -------------------------------------------------------------------
    def node_id(self, nid: int) -> int:
        return ROOT_ID if nid == self.root_nid else nid

    def _nid(self, node_id: int) -> int:
        return self.root_nid if node_id == ROOT_ID else node_id

    def _node(self, node_id: int) -> _Node:
        nid = self._nid(node_id)
        node = self._nodes.get(nid)
        if node is None:
            node = self._load(nid)
        return node

    def _load(self, nid: int) -> _Node:
        view = self._view
        try:
            ino = view.inode(nid)
            raw = view.raw_xattrs(ino)
        except Exception:
            # Node ids come from the kernel, which only knows those we gave
            # it; anything else is not ours.
            raise FsError(errno.ENOENT) from None
        t = ino.ftype
        attr = Attr(
            ino=nid,
            node_id=self.node_id(nid),
            mode=ino.mode,
            nlink=ino.nlink,
            uid=ino.uid,
            gid=ino.gid,
            size=ino.size,
            rdev=ino.u if t in (fmt.S_IFCHR, fmt.S_IFBLK) else 0,
            mtime=ino.mtime,
            mtime_nsec=ino.mtime_nsec,
        )
        xattrs: list[tuple[bytes, bytes]] = []
        for name, value in raw:
            shown = _overlay_name(name)
            if shown is not None:
                xattrs.append((shown, value))
        node = self._nodes[nid] = _Node(ino, attr, xattrs)
        return node

    # -- attributes ------------------------------------------------------------
    def getattr(self, node_id: int) -> Attr:
        return self._node(node_id).attr

    def _dir(self, node_id: int) -> _Node:
        node = self._node(node_id)
        if node.inode.ftype != fmt.S_IFDIR:
            raise FsError(errno.ENOTDIR)
        if node.entries is None:
            entries: list[tuple[bytes, int]] = []
            for name, nid, ftype in self._view.dirents(node.inode):
                if ftype == fmt.FT_CHRDEV and self._node(nid).attr.rdev == 0:
                    continue  # a whiteout: overlayfs hides it
                entries.append((name, nid))
            # index first: other request threads take `entries` as "ready"
            node.index = {n: nid for n, nid in entries if n not in (b".", b"..")}
            node.entries = entries
        return node

    def lookup(self, parent: int, name: bytes) -> Attr:
        index = self._dir(parent).index
        assert index is not None
        nid = index.get(name)
        if nid is None:
            raise FsError(errno.ENOENT)
        return self._node(nid).attr

    def readdir(self, node_id: int, offset: int) -> Iterator[tuple[bytes, Attr, int]]:
        """(name, attributes, offset of the next entry) from `offset` on.

        Offsets are positions in the directory's sorted entry list, so they
        stay valid across calls (and `seekdir`) for the life of the mount.
        """
        entries = self._dir(node_id).entries
        assert entries is not None
        for i in range(max(offset, 0), len(entries)):
            name, nid = entries[i]
            yield name, self._node(nid).attr, i + 1

    def readlink(self, node_id: int) -> bytes:
        node = self._node(node_id)
        if node.inode.ftype != fmt.S_IFLNK:
            raise FsError(errno.EINVAL)
        return self._view.content(node.inode)

    # -- xattrs ----------------------------------------------------------------
    def listxattr(self, node_id: int, privileged: bool) -> list[bytes]:
        return [
            n for n, _ in self._node(node_id).xattrs if privileged or not n.startswith(_TRUSTED)
        ]

    def getxattr(self, node_id: int, name: bytes, privileged: bool) -> bytes:
        if name.startswith(_TRUSTED) and not privileged:
            raise FsError(errno.ENODATA)
        for n, v in self._node(node_id).xattrs:
            if n == name:
                return v
        raise FsError(errno.ENODATA)

    # -- file data -------------------------------------------------------------
    def open(self, node_id: int, flags: int) -> OpenFile:
        """Open a regular file for reading (may hash its object: call from a
        worker thread)."""
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FsError(errno.EROFS)
        node = self._node(node_id)
        ino = node.inode
        if ino.ftype != fmt.S_IFREG:
            raise FsError(errno.EISDIR if ino.ftype == fmt.S_IFDIR else errno.EINVAL)
        if ino.datalayout != fmt.DATALAYOUT_CHUNK_BASED:
            data = self._view.content(ino) if ino.size else b""
            return OpenFile(node_id, None, data, ino.size)
        return OpenFile(node_id, self._open_object(node), None, ino.size)

    def _external(self, node: _Node) -> tuple[bytes, str | None, bytes | None]:
        """(backing path, digest algorithm, digest) of an external file."""
        raw = dict(self._view.raw_xattrs(node.inode))
        metacopy = raw.get(_METACOPY, b"")
        digest = metacopy[4:] if len(metacopy) > 4 else None
        algorithm = _DIGEST_ALGS.get(len(digest)) if digest else None
        redirect = raw.get(_REDIRECT)
        if redirect is not None:
            path = redirect.lstrip(b"/")
        elif digest is not None:
            h = digest.hex().encode()
            path = h[:2] + b"/" + h[2:]
        else:
            raise FsError(errno.EIO)
        if not path or b".." in path.split(b"/"):
            raise FsError(errno.EIO)  # must stay beneath the base directory
        return path, algorithm, digest

    def _open_object(self, node: _Node) -> int:
        path, algorithm, digest = self._external(node)
        fd = -1
        for base in self._basedirs:
            try:
                # O_NONBLOCK: a FIFO there must not block the open (it is
                # then refused as no regular file).
                fd = os.open(
                    path,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK,
                    dir_fd=base,
                )
                break
            except FileNotFoundError:
                continue
            except OSError:
                raise FsError(errno.EIO) from None
        if fd < 0:
            raise FsError(errno.EIO)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != node.attr.size:
                raise FsError(errno.EIO)
            os.set_blocking(fd, True)  # read as before (`repository._fs._open_regular` too)
            if self._verify and digest is not None and algorithm is not None:
                self._check_digest(node, fd, st, algorithm, digest)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_digest(
        self, node: _Node, fd: int, st: os.stat_result, algorithm: str, digest: bytes
    ) -> None:
        # The verdict holds while the object is the same file, unchanged.
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with self._locks_lock:
            if node.lock is None:
                node.lock = threading.Lock()
        with node.lock:
            verdict = node.verdict
            if verdict is None or verdict[0] != identity:
                try:
                    ok = fsverity.measure_or_compute(fd, algorithm) == digest
                except Exception:
                    ok = False
                node.verdict = verdict = (identity, ok)
        if not verdict[1]:
            raise FsError(errno.EIO)

    @staticmethod
    def read(f: OpenFile, offset: int, size: int) -> bytes:
        if f.fd is None:
            assert f.data is not None
            return f.data[offset : offset + size]
        try:
            return os.pread(f.fd, size, offset)
        except OSError:
            raise FsError(errno.EIO) from None

    @staticmethod
    def release(f: OpenFile) -> None:
        if f.fd is not None:
            os.close(f.fd)
            f.fd = None

    def statfs(self) -> tuple[int, int]:
        """(blocks of the image, inodes)."""
        return self._view.info.blocks, self._view.info.inodes
