"""Read a directory tree from disk into the in-memory tree model.

Two sets of rules are provided:

* `read_directory` is what C `mkcomposefs SOURCE` does (`lcfs_build`):
  regular files of at most 64 bytes are inlined, larger ones become external
  files named by their fs-verity digest (sha256), hardlinks are broken into
  independent inodes (unless `hardlinks=True`, the composefs-rs extension),
  and `--skip-devices/--skip-xattrs/--user-xattrs/--use-epoch/--digest-store`
  are honoured.
* `read_filesystem` / `read_container_root` are composefs-rs `cfsctl
  create-image` (and `compute-id`, `create-dumpfile`): hardlinks tracked by
  (st_dev, st_ino), the same 64-byte inline rule, sha512 object ids by
  default; `read_container_root` keeps only `security.capability` xattrs and
  then applies `transform_for_oci`.

Safety: the tree is walked with directory file descriptors and `*at()`
calls with O_NOFOLLOW, so no symlink inside the tree is ever followed and
nothing outside it is read; only the path naming the source itself is
resolved normally.  Every inode is checked to still be the one that was
`lstat`ed when it is opened.

With `threads` > 1 (`read_directory`'s default: one per CPU, like C
`--threads`), files of 256 KiB and more are hashed in worker threads while
the walk continues (large files are handed to helper processes, see
`fsverity.digest_fd`); `read_filesystem` reads sequentially by default, as
composefs-rs does (see there why).  Either way the walk opens the next few
regular files of a directory early and has the kernel start reading them
(`_Scanner._read_ahead`): a cold tree is then not read one wait at a time.
An `object_sink` callback lets a caller (the repository) store each external
file's content while it is read, without this module knowing about
repositories.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import stat as st_
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import fsverity, limits
from ._atomic import syncfs
from .errors import ComposefsError, SourceError, TreeError, VerityError, VerityNotSupported
from .tree import Device, Directory, Fifo, Leaf, Regular, Socket, Stat, Symlink

if TYPE_CHECKING:  # imported where a pool is made: the sequential reader needs none
    from concurrent.futures import Future, ThreadPoolExecutor

__all__ = [
    "CONTAINER_XATTR_ALLOWLIST",
    "INLINE_CONTENT_MAX",
    "ObjectSink",
    "canonicalize_run",
    "copy_root_metadata_from_usr",
    "filter_xattrs",
    "is_allowed_container_xattr",
    "read_container_root",
    "read_directory",
    "read_filesystem",
    "store_in_flat_digest_store",
    "transform_for_oci",
]

# C LCFS_RECOMMENDED_INLINE_CONTENT_MAX, composefs-rs INLINE_CONTENT_MAX_V0.
INLINE_CONTENT_MAX = 64

# composefs-rs CONTAINER_XATTR_ALLOWLIST: host xattrs (SELinux labels from the
# build host, overlayfs internals) must not leak into container images.
CONTAINER_XATTR_ALLOWLIST: tuple[bytes, ...] = (b"security.capability",)

ObjectSink = Callable[[str, int, str], None]
"""`sink(src_path, size, digest_hex)`, called once per distinct external file
content (per inode) after its digest is known.

`src_path` is a ``/proc/self/fd/N`` path of a descriptor this module holds
open on the very inode it hashed, valid only during the call: opening it
gives that file (no symlink, no race with the tree changing).  Without
/proc it is the file's real path.  The sink runs in worker threads,
concurrently when ``threads > 1``; an exception it raises aborts the read.

A sink with an attribute ``accepts_content = True`` is called as
`sink(src_path, size, digest_hex, content)`: `content` is the file's whole
content as it was read and hashed (small files, read in one piece), or None;
storing those bytes spares reading the file a second time.
"""

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: should a FIFO replace the file between lstat and open, the open
# must not hang (the inode check then reports the change).
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK

_FICLONE = 0x40049409  # _IOW(0x94, 9, int)


def is_allowed_container_xattr(name: bytes) -> bool:
    """Whether composefs-rs keeps xattr `name` when reading a container root."""
    return name in CONTAINER_XATTR_ALLOWLIST


def _proc_fd_ok() -> bool:
    return os.path.isdir("/proc/self/fd")


@dataclass
class _Options:
    inline_max: int = INLINE_CONTENT_MAX
    skip_devices: bool = False
    skip_xattrs: bool = False
    user_xattrs: bool = False
    use_epoch: bool = False
    hardlinks: bool = False
    digest_store: str | None = None
    algorithm: str = "sha256"
    threads: int = 1
    xattr_filter: Callable[[bytes], bool] | None = None
    object_sink: ObjectSink | None = None


@dataclass
class _Pending:
    """External regular files waiting for one digest (one source inode)."""

    leaves: list[Regular] = field(default_factory=list)
    future: Future[str] | None = None
    digest: str | None = None


class _Scanner:
    def __init__(self, opts: _Options) -> None:
        self.o = opts
        self.proc = _proc_fd_ok()
        self.inodes: dict[tuple[int, int], Leaf] = {}
        self.pending: dict[tuple[int, int], _Pending] = {}
        self.pool: ThreadPoolExecutor | None = None
        # Bounds the open descriptors (and queued work) the walk can race ahead by.
        self.slots = threading.BoundedSemaphore(max(4, 4 * opts.threads))
        self.inflight: dict[Future[str], int] = {}
        self.store: _Store | None = None
        self.big_bytes = 0  # content of files of _HELPER_MIN and more, so far
        self.sink_content = bool(getattr(opts.object_sink, "accepts_content", False))
        # Digest-store copies written (not yet fsynced nor renamed): one
        # syncfs then the renames at the end, instead of an fsync per file.
        self.staged: dict[str, str] = {}  # "xx/rest" -> "xx/.tmpNAME"
        self.staged_lock = threading.Lock()
        self.n_ahead = 0  # files opened ahead of the walk (see `_read_ahead`)
        if opts.threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(opts.threads, thread_name_prefix="composefs-read")

    # -- helpers ------------------------------------------------------
    def _xattrs(self, target: int | bytes, follow: bool, shown: str) -> dict[bytes, bytes]:
        """Xattrs of an open fd, or of a path (not following a final symlink)."""
        o = self.o
        try:
            names = os.listxattr(target, follow_symlinks=follow)
        except OSError as e:
            if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return {}  # a filesystem without xattrs: nothing to copy
            raise _source_error(shown, e) from None
        result: dict[bytes, bytes] = {}
        for sname in names:
            name = os.fsencode(sname)
            if o.user_xattrs and not name.startswith(b"user."):
                continue
            if o.xattr_filter is not None and not o.xattr_filter(name):
                continue
            try:
                result[name] = os.getxattr(target, name, follow_symlinks=follow)
            except OSError as e:
                if e.errno == errno.ENODATA:
                    continue  # removed since listxattr
                raise _source_error(shown, e) from None
        return result

    def _stat(self, st: os.stat_result, xattrs: dict[bytes, bytes]) -> Stat:
        if self.o.use_epoch:
            sec, nsec = 0, 0
        else:
            sec, nsec = divmod(st.st_mtime_ns, 1_000_000_000)
        return Stat(st.st_mode & 0o7777, st.st_uid, st.st_gid, sec, nsec, xattrs)

    def _entry_xattrs(
        self, dfd: int, name: bytes, shown: str, opened: int | None
    ) -> dict[bytes, bytes]:
        """Xattrs of `name` in directory `dfd`, via `opened` (its open fd) if
        given; symlinks, devices, FIFOs and sockets are not opened, so they
        are named through /proc/self/fd/DFD/NAME without following NAME."""
        if self.o.skip_xattrs:
            return {}
        if opened is not None:
            return self._xattrs(opened, True, shown)
        if self.proc:
            return self._xattrs(b"/proc/self/fd/%d/" % dfd + name, False, shown)
        return self._xattrs(os.fsencode(shown), False, shown)

    # -- the walk -----------------------------------------------------
    def read(self, path: str | os.PathLike[str]) -> Directory:
        shown_root = os.fsdecode(path)
        try:
            rootfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENOTDIR:
                raise SourceError(f"{shown_root}: not a directory") from None
            raise _source_error(shown_root, e) from None
        try:
            if self.o.digest_store is not None:
                self.store = _Store(_open_store(self.o.digest_store), self.o.algorithm)
            root = self._walk(rootfd, shown_root)
            self._finish()
            self._commit_staged()
            return root
        except BaseException:
            self._abort()
            raise
        finally:
            os.close(rootfd)
            if self.store is not None:
                os.close(self.store.fd)
            if self.pool is not None:
                self.pool.shutdown(wait=True)

    def _walk(self, rootfd: int, shown_root: str) -> Directory:
        try:
            st = os.fstat(rootfd)
        except OSError as e:
            raise _source_error(shown_root, e) from None
        root = Directory(self._stat(st, self._entry_xattrs(rootfd, b"", shown_root, rootfd)))
        # Iterative depth-first walk: deep trees must not hit the recursion limit.
        # Each frame: (dir fd, node, names still to visit, shown path, the
        # regular files among those names opened ahead: name -> (fd, fstat));
        # the root fd belongs to the caller.
        stack: list[_Frame] = []
        try:
            stack.append((rootfd, root, self._list(rootfd, shown_root), shown_root, {}))
            while stack:
                dfd, node, names, shown_dir, ahead = stack[-1]
                if not names:
                    stack.pop()
                    if dfd != rootfd:
                        os.close(dfd)
                    continue
                name, regular = names.pop()
                shown = f"{shown_dir}/{os.fsdecode(name)}"
                if len(stack) > limits.MAX_DEPTH:
                    # what the image reader accepts (composefs.limits)
                    raise SourceError(f"{limits.show(shown)}: {limits.depth_error()}")
                opened = None
                if regular:
                    opened = ahead.pop(name, None)
                    if opened is not None:
                        self.n_ahead -= 1
                    else:
                        opened = self._open_regular(dfd, name, shown)
                    if names:
                        self._read_ahead(dfd, names, ahead)
                if opened is not None:
                    leaf = self._leaf(dfd, name, opened[1], shown, opened[0])
                    if leaf is not None:
                        node.entries[name] = leaf
                    continue
                try:
                    lst = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue  # vanished since readdir
                except OSError as e:
                    raise _source_error(shown, e) from None
                if st_.S_ISDIR(lst.st_mode):
                    cfd, cst = _open_same(dfd, name, _O_DIR, lst, shown)
                    try:
                        child = Directory(
                            self._stat(cst, self._entry_xattrs(dfd, name, shown, cfd))
                        )
                        children = self._list(cfd, shown)
                    except BaseException:
                        os.close(cfd)
                        raise
                    node.entries[name] = child
                    stack.append((cfd, child, children, shown, {}))
                    continue
                leaf = self._leaf(dfd, name, lst, shown)
                if leaf is not None:
                    node.entries[name] = leaf
        finally:
            for dfd, _, _, _, ahead in stack:
                for fd, _ in ahead.values():
                    os.close(fd)
                self.n_ahead -= len(ahead)
                if dfd != rootfd:
                    os.close(dfd)
        return root

    def _read_ahead(
        self, dfd: int, names: list[tuple[bytes, bool]], ahead: dict[bytes, _Opened]
    ) -> None:
        """Open the next few regular files of this directory and have the
        kernel start reading them (POSIX_FADV_WILLNEED), so that their data
        is in (or on its way into) the page cache when the walk gets there.
        Without it, every file of a cold tree costs a wait for its read:
        on a cold Debian root that is half the kernel time of reading it,
        and most of the wall time. A name that cannot be opened now, or is
        no regular file, is left to the walk (which then decides as always).
        Holding the descriptor is as if the walk had opened it a few names
        earlier: it reads the inode it opened."""
        i = len(names)
        stop = max(0, i - _AHEAD_LOOK)
        while len(ahead) < _AHEAD_FILES and self.n_ahead < _AHEAD_MAX and i > stop:
            i -= 1
            name, regular = names[i]
            if not regular or name in ahead:
                continue
            try:
                opened = self._open_regular(dfd, name, "")
            except SourceError:
                continue  # the walk meets it again, and reports it then
            if opened is None:
                continue
            fd, fst = opened
            if fst.st_size:
                try:
                    os.posix_fadvise(fd, 0, min(fst.st_size, _AHEAD_BYTES), _WILLNEED)
                except OSError:
                    pass  # only a hint
            ahead[name] = opened
            self.n_ahead += 1

    def _list(self, dfd: int, shown: str) -> list[tuple[bytes, bool]]:
        """The names in `dfd`, each with whether readdir says it is a
        regular file (its d_type: no syscall)."""
        try:
            with os.scandir(dfd) as it:
                names = [(os.fsencode(e.name), e.is_file(follow_symlinks=False)) for e in it]
        except OSError as e:
            raise _source_error(shown, e) from None
        # Popped from the end: reverse-sorted makes the walk (and errors) deterministic.
        names.sort(reverse=True)
        return names

    def _open_regular(
        self, dfd: int, name: bytes, shown: str
    ) -> tuple[int, os.stat_result] | None:
        """Open and fstat a name readdir typed as a regular file: two
        syscalls instead of lstat, open, fstat (most entries are regular
        files). None when it is not one now, or cannot be opened: the
        general path (lstat first) then decides, as for any other name.
        Opening on the word of readdir is no weaker than on an lstat's,
        which is as stale by the open; `_O_FILE` keeps a FIFO or symlink
        put there meanwhile from blocking or being followed."""
        try:
            fd = os.open(name, _O_FILE, dir_fd=dfd)
        except OSError:
            return None
        try:
            fst = os.fstat(fd)
        except OSError as e:
            os.close(fd)
            raise _source_error(shown, e) from None
        if not st_.S_ISREG(fst.st_mode):
            os.close(fd)
            return None
        return fd, fst

    def _leaf(
        self, dfd: int, name: bytes, lst: os.stat_result, shown: str, fd: int | None = None
    ) -> Leaf | None:
        """The leaf for `name` (`lst`: its stat). `fd`, if given, is the
        regular file opened (and `lst` its fstat): this call owns it."""
        o = self.o
        mode = lst.st_mode
        if o.skip_devices and (st_.S_ISBLK(mode) or st_.S_ISCHR(mode)):
            return None
        key = (lst.st_dev, lst.st_ino)
        if o.hardlinks:
            seen = self.inodes.get(key)
            if seen is not None:
                if fd is not None:
                    os.close(fd)
                return seen
        leaf: Leaf
        if st_.S_ISREG(mode):
            leaf = self._regular(dfd, name, lst, shown, key, fd)
        else:
            if st_.S_ISLNK(mode):
                try:
                    target = os.readlink(name, dir_fd=dfd)
                except OSError as e:
                    raise _source_error(shown, e) from None
                content: Symlink | Device | Fifo | Socket = Symlink(target)
            elif st_.S_ISBLK(mode):
                content = Device(st_.S_IFBLK, lst.st_rdev)
            elif st_.S_ISCHR(mode):
                content = Device(st_.S_IFCHR, lst.st_rdev)
            elif st_.S_ISFIFO(mode):
                content = Fifo()
            elif st_.S_ISSOCK(mode):
                content = Socket()
            else:
                raise SourceError(f"error accessing {shown}: unknown file type {mode:o}")
            leaf = Leaf(self._stat(lst, self._entry_xattrs(dfd, name, shown, None)), content)
        if o.hardlinks:
            self.inodes[key] = leaf
        return leaf

    def _regular(
        self,
        dfd: int,
        name: bytes,
        lst: os.stat_result,
        shown: str,
        key: tuple[int, int],
        fd: int | None = None,
    ) -> Leaf:
        """A regular file's leaf; `fd` as for `_leaf` (owned by this call)."""
        o = self.o
        size = lst.st_size
        pend = self.pending.get(key) if size > o.inline_max else None
        if (pend is not None and pend.leaves and pend.leaves[0].size == size) or size == 0:
            try:
                xattrs = self._entry_xattrs(dfd, name, shown, fd)
            finally:
                if fd is not None:
                    os.close(fd)
            if size == 0:
                return Leaf(self._stat(lst, xattrs), Regular(0))
            # Another name of an inode already queued (hardlinks broken):
            # hash it once, give every name the digest.
            assert pend is not None
            content = Regular(size)
            pend.leaves.append(content)
            return Leaf(self._stat(lst, xattrs), content)
        if fd is None:
            fd, fst = _open_same(dfd, name, _O_FILE, lst, shown)
        else:
            fst = lst
        try:
            xattrs = self._entry_xattrs(dfd, name, shown, fd)
            if size <= o.inline_max:
                data = _read_exact(fd, size, shown)
                os.close(fd)
                return Leaf(self._stat(fst, xattrs), Regular(size, data=data))
        except BaseException:
            os.close(fd)
            raise
        content = Regular(size)
        pend = _Pending([content])
        self.pending[key] = pend
        self._submit(pend, fd, shown, size, key[0])
        return Leaf(self._stat(fst, xattrs), content)

    # -- hashing, storing ---------------------------------------------
    def _submit(self, pend: _Pending, fd: int, shown: str, size: int, dev: int) -> None:
        """Hash `fd` (which this call now owns) now or in the pool."""
        if self.pool is None or size < _POOL_MIN:
            # A small file costs less to hash (and store) right here than
            # to hand to a worker: each handoff is a few futex wakeups and
            # GIL switches (about 40% more CPU on a Debian root).
            try:
                pend.digest = self._process(fd, shown, size, dev)
            finally:
                os.close(fd)
            return
        if size >= _HELPER_MIN:
            self.big_bytes += size
        # Helper processes (fsverity) hash big files outside the GIL, but
        # each costs ~20 ms of CPU to start: worth it only once the big
        # files add up (a Debian root has ~20 MB of them: hashing those in
        # the worker threads saves ~7% of the CPU).
        helpers = 1 if self.big_bytes >= _HELPERS_AFTER or size >= _HELPERS_AFTER else 0
        self.slots.acquire()
        try:
            fut = self.pool.submit(self._job, fd, shown, size, dev, helpers)
        except BaseException:
            self.slots.release()
            os.close(fd)
            raise
        self.inflight[fut] = fd
        pend.future = fut

    def _job(self, fd: int, shown: str, size: int, dev: int, helpers: int) -> str:
        try:
            return self._process(fd, shown, size, dev, helpers)
        finally:
            os.close(fd)
            self.slots.release()

    def _process(self, fd: int, shown: str, size: int, dev: int, helpers: int = 0) -> str:
        """Digest of open file `fd` (on device `dev`), stored if asked."""
        o = self.o
        try:
            # A small file is read whole, in one read: the same bytes are
            # written to the store below, instead of the kernel reading the
            # file a second time to copy it.
            raw, data = fsverity.digest_sized(fd, size, o.algorithm, helper_processes=helpers)
            now_size = len(data) if data is not None else os.fstat(fd).st_size
            if now_size != size:
                # The digest would not describe a file of the recorded size.
                raise SourceError(f"error accessing {shown}: changed while it was being read")
        except OSError as e:
            raise _source_error(shown, e) from None
        hexd = raw.hex()
        if self.store is not None:
            try:
                self._stage(fd, hexd, data, dev)
            except OSError as e:
                raise SourceError(f"cannot fill store with {shown}: {_strerror(e)}") from None
        if o.object_sink is not None:
            path = f"/proc/self/fd/{fd}" if self.proc else shown
            if self.sink_content:
                o.object_sink(path, size, hexd, data)  # type: ignore[call-arg]
            else:
                o.object_sink(path, size, hexd)
        return hexd

    def _stage(self, src_fd: int, digest_hex: str, data: bytes | None, dev: int) -> None:
        """Copy `src_fd` into the digest store under a temporary name
        (see `_commit_staged`), unless the object is there or staged."""
        assert self.store is not None
        final = f"{digest_hex[:2]}/{digest_hex[2:]}"
        with self.staged_lock:
            if final in self.staged:
                return
            self.staged[final] = ""  # claimed: another thread skips it
        try:
            tmp = self.store.write_copy(src_fd, digest_hex, False, data, dev)
        except BaseException:
            with self.staged_lock:
                del self.staged[final]
            raise
        with self.staged_lock:
            if tmp is None:
                del self.staged[final]
            else:
                self.staged[final] = tmp

    def _finish(self) -> None:
        for pend in self.pending.values():
            if pend.future is not None:
                fut = pend.future
                pend.digest = fut.result()
                self.inflight.pop(fut, None)
            assert pend.digest is not None
            for content in pend.leaves:
                content.digest = pend.digest

    def _commit_staged(self) -> None:
        """Make the staged digest-store copies durable (one syncfs), then
        give them their names: as with C's fsync-then-rename per file, a
        file under its final name is always complete."""
        if not self.staged or self.store is None:
            return
        try:
            syncfs(self.store.fd)
        except OSError as e:
            raise SourceError(f"cannot fill store: {_strerror(e)}") from None
        fd = self.store.fd
        for final, tmp in sorted(self.staged.items()):
            try:
                os.rename(tmp, final, src_dir_fd=fd, dst_dir_fd=fd)
            except OSError as e:
                raise SourceError(f"cannot fill store with {final}: {_strerror(e)}") from None
            del self.staged[final]

    def _abort(self) -> None:
        for fut in self.inflight:
            fut.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        # Cancelled jobs never ran, so their descriptors are still ours.
        for fut, fd in self.inflight.items():
            if fut.cancelled():
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.inflight.clear()
        if self.store is not None:
            for tmp in self.staged.values():
                if not tmp:
                    continue  # claimed, not written
                try:
                    os.unlink(tmp, dir_fd=self.store.fd)
                except OSError:
                    pass
        self.staged.clear()


# Files from this size on are hashed by the worker threads (when there are any).
_POOL_MIN = 256 << 10
# Read-ahead of the walk (`_Scanner._read_ahead`): at most this many files
# open ahead per directory (a directory's own stay open while the walk is in
# its subdirectories) and in all together, among the next this many names,
# and of each file at most its first this many bytes asked for (the kernel's
# own read-ahead follows a sequential reader past that).
_AHEAD_FILES = 8
_AHEAD_MAX = 64
_AHEAD_LOOK = 16
_AHEAD_BYTES = 2 << 20
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 3)

_Opened = tuple[int, os.stat_result]
_Frame = tuple[int, Directory, list[tuple[bytes, bool]], str, dict[bytes, _Opened]]

# Files from this size on count towards starting fsverity's helper processes,
# which happens once they add up to _HELPERS_AFTER (or one file is that big).
_HELPER_MIN = fsverity._HELPER_MIN
_HELPERS_AFTER = 64 << 20


def _open_same(
    dfd: int, name: bytes, flags: int, lst: os.stat_result, shown: str
) -> tuple[int, os.stat_result]:
    """Open `name`, lstat'ed as `lst`, and make sure it is still that
    inode (not replaced since): its fd and fstat."""
    try:
        fd = os.open(name, flags, dir_fd=dfd)
    except OSError as e:
        raise _source_error(shown, e) from None
    try:
        st = os.fstat(fd)
        _same_inode(lst, st, shown)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _same_inode(a: os.stat_result, b: os.stat_result, shown: str) -> None:
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) or st_.S_IFMT(a.st_mode) != st_.S_IFMT(
        b.st_mode
    ):
        raise SourceError(f"error accessing {shown}: changed while it was being read")


def _read_exact(fd: int, size: int, shown: str) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size:
        try:
            chunk = os.pread(fd, size - got, got)
        except OSError as e:
            raise _source_error(shown, e) from None
        if not chunk:
            raise SourceError(f"error accessing {shown}: file shrank while it was being read")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _strerror(e: OSError) -> str:
    return e.strerror or str(e)


def _source_error(shown: str, e: OSError) -> SourceError:
    # The C tool's wording: "error accessing PATH: <strerror>".
    return SourceError(f"error accessing {limits.show(shown, 4096)}: {_strerror(e)}")


# -- digest store (mkcomposefs --digest-store) --------------------------------


def _open_store(path: str) -> int:
    try:
        os.makedirs(path, 0o755, exist_ok=True)
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise SourceError(f"cannot open digest store {path}: {_strerror(e)}") from None


def store_in_flat_digest_store(
    store: int | str, src_fd: int, digest_hex: str, algorithm: str = "sha256"
) -> bool:
    """Copy the content of `src_fd` into a flat digest store as `XX/REST`.

    The C `mkcomposefs --digest-store` layout: `<store>/<first two hex
    digits>/<remaining hex digits>`, mode 0644.  Atomic: the copy is written to
    a temporary file, fsynced, fs-verity is tried on it (failures ignored, as
    C does) and it is renamed into place.  An existing object is kept.  The
    copy tries a reflink, then copy_file_range, then plain reads and writes.
    Returns True if a new object was written.  (A whole tree read with a
    digest store stages its copies and syncs them once instead.)
    """
    own = isinstance(store, str)
    store_fd = (
        os.open(store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if isinstance(store, str)
        else store
    )
    try:
        tmp = _Store(store_fd, algorithm).write_copy(src_fd, digest_hex, True)
        if tmp is None:
            return False
        try:
            os.rename(tmp, f"{digest_hex[:2]}/{digest_hex[2:]}", src_dir_fd=store_fd,
                      dst_dir_fd=store_fd)  # fmt: skip
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=store_fd)
            except OSError:
                pass
            raise
        return True
    finally:
        if own:
            os.close(store_fd)


class _Store:
    """Writes copies into a flat digest store, remembering what needs
    asking only once per store: which `XX/` directories exist, whether the
    filesystem can reflink from the source's and do fs-verity, the umask."""

    def __init__(self, fd: int, algorithm: str) -> None:
        self.fd = fd
        self.algorithm = algorithm
        self.subdirs: dict[str, bool] = {}  # XX -> created by this run
        self.no_reflink: set[int] = set()  # source st_dev values where FICLONE failed
        self.verity = True
        # Unique temporary names without a getrandom call per file (O_EXCL
        # still guards against a clash).
        import secrets  # here: only a digest store needs it (a slow import)

        self.prefix = f".tmp{secrets.token_hex(4)}"
        self.counter = itertools.count()
        self.chmod = _umask() & 0o644 != 0

    def write_copy(
        self,
        src_fd: int,
        digest_hex: str,
        fsync: bool,
        data: bytes | None = None,
        src_dev: int | None = None,
    ) -> str | None:
        """Copy `src_fd` (whose whole content is `data`, if given; on
        device `src_dev`, if known) to a new temporary file in the store's
        `XX/` directory (fsynced if asked, fs-verity tried); its
        store-relative path, or None when `XX/REST` already exists."""
        sub = digest_hex[:2]
        store = self.fd
        fresh = self.subdirs.get(sub)
        if fresh is None:
            try:
                os.mkdir(sub, 0o755, dir_fd=store)
                fresh = True
            except FileExistsError:
                fresh = False
                if not st_.S_ISDIR(os.stat(sub, dir_fd=store, follow_symlinks=False).st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
            self.subdirs[sub] = fresh
        if not fresh:
            # (A directory this run created holds nothing it did not stage,
            # and the caller never stages one object twice.)
            try:
                os.stat(f"{sub}/{digest_hex[2:]}", dir_fd=store, follow_symlinks=False)
                return None
            except FileNotFoundError:
                pass
        tmp = f"{sub}/{self.prefix}{next(self.counter)}"
        tfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                      0o644, dir_fd=store)  # fmt: skip
        try:
            try:
                src = _Source(src_fd, data, src_dev not in self.no_reflink)
                _copy_data(src, tfd)
                if not src.reflink and src_dev is not None:
                    self.no_reflink.add(src_dev)
                if self.chmod:
                    os.fchmod(tfd, 0o644)
                if fsync:
                    os.fsync(tfd)
            finally:
                os.close(tfd)
            if self.verity:
                # fs-verity needs no writable descriptor open: reopen read-only.
                rfd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=store)
                try:
                    fsverity.enable_verity(rfd, self.algorithm)
                except VerityNotSupported:
                    self.verity = False  # the filesystem's answer for every file
                except VerityError:
                    pass  # insecure store, exactly like C
                finally:
                    os.close(rfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=store)
            except OSError:
                pass
            raise
        return tmp


def _umask() -> int:
    """The process umask, read without changing it (other threads may be
    creating files); all bits set (chmod every copy) if /proc cannot say."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o777  # unknown: always chmod


class _Source(int):
    """A source descriptor with what the copy should know: its content when
    that has already been read (and hashed), so that `_copy_data` writes
    those bytes instead of reading the file again; whether a reflink is
    worth trying (it failed before for this device)."""

    data: bytes | None
    reflink: bool

    def __new__(cls, fd: int, data: bytes | None, reflink: bool = True) -> _Source:
        self = super().__new__(cls, fd)
        self.data = data
        self.reflink = reflink
        return self


def _copy_data(src: int, dst: int) -> None:
    """Copy all of `src` (from offset 0; its own offset untouched) to `dst`:
    a reflink if the filesystem can, else the bytes already read (a
    `_Source` with data), else copy_file_range or reads and writes."""
    if not isinstance(src, _Source) or src.reflink:
        try:
            fcntl.ioctl(dst, _FICLONE, src)
            return
        except OSError:
            # not the same filesystem, or no reflinks: copy
            if isinstance(src, _Source):
                src.reflink = False
    if isinstance(src, _Source) and src.data is not None:
        view = memoryview(src.data)
        while view:
            view = view[os.write(dst, view) :]
        return
    off = 0
    try:
        while True:
            n = os.copy_file_range(src, dst, 1 << 30, off, off)
            if n == 0:
                break
            off += n
    except OSError as e:
        if e.errno not in (
            errno.EXDEV,
            errno.EINVAL,
            errno.EOPNOTSUPP,
            errno.ENOSYS,
            errno.EPERM,
            errno.EBADF,
            errno.ETXTBSY,
        ):
            raise
    # copy_file_range may also stop early and wrongly report EOF (overlayfs,
    # some FUSE): finish with plain reads from where it got to.
    while True:
        chunk = os.pread(src, 1 << 20, off)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            w = os.pwrite(dst, view, off)
            off += w
            view = view[w:]


# -- public entry points -----------------------------------------------------


def _threads(threads: int | None) -> int:
    return fsverity.default_threads() if threads is None else max(1, threads)


def read_directory(
    path: str | os.PathLike[str],
    *,
    inline_max: int = INLINE_CONTENT_MAX,
    skip_devices: bool = False,
    skip_xattrs: bool = False,
    user_xattrs: bool = False,
    use_epoch: bool = False,
    hardlinks: bool = False,
    digest_store: str | None = None,
    algorithm: str = "sha256",
    threads: int | None = None,
    xattr_filter: Callable[[bytes], bool] | None = None,
    object_sink: ObjectSink | None = None,
) -> Directory:
    """Read the tree at `path` the way C `mkcomposefs SOURCE` does.

    Regular files of at most `inline_max` bytes are inline, larger ones
    external with their fs-verity digest (`algorithm`).  `hardlinks=False`
    (C behaviour) gives every name its own inode; True shares one `Leaf`
    per source inode.  `digest_store` copies external contents into a C
    flat digest store.  `xattr_filter(name)` keeps an xattr when true.
    Errors reading the source raise `errors.SourceError`.
    """
    if skip_xattrs and user_xattrs:
        # C lcfs_load_node_from_file rejects the combination (EINVAL).
        raise ComposefsError("--skip-xattrs and --user-xattrs cannot be used together")
    fsverity.digest_size(algorithm)
    opts = _Options(
        inline_max=inline_max,
        skip_devices=skip_devices,
        skip_xattrs=skip_xattrs,
        user_xattrs=user_xattrs,
        use_epoch=use_epoch,
        hardlinks=hardlinks,
        digest_store=os.fspath(digest_store) if digest_store is not None else None,
        algorithm=algorithm,
        threads=_threads(threads),
        xattr_filter=xattr_filter,
        object_sink=object_sink,
    )
    return _Scanner(opts).read(path)


def read_filesystem(
    path: str | os.PathLike[str],
    *,
    algorithm: str = "sha512",
    object_sink: ObjectSink | None = None,
    threads: int | None = None,
    xattr_filter: Callable[[bytes], bool] | None = None,
) -> Directory:
    """composefs-rs `read_filesystem`: hardlinks tracked by (st_dev, st_ino),
    files of at most 64 bytes inline, all xattrs (or those `xattr_filter`
    keeps), no transformation (`create-image --no-propagate-usr-to-root`).

    Sequential unless `threads` says otherwise, as composefs-rs reads: the
    hashing and the object sink's writes hold the GIL, so a worker thread
    only adds hand-offs (create-image of the Debian root, cold cache, 8
    alternating runs on 2 CPUs: 13 % more CPU and no wall time saved)."""
    fsverity.digest_size(algorithm)
    opts = _Options(
        hardlinks=True,
        algorithm=algorithm,
        threads=1 if threads is None else _threads(threads),
        xattr_filter=xattr_filter,
        object_sink=object_sink,
    )
    return _Scanner(opts).read(path)


def read_container_root(
    path: str | os.PathLike[str],
    *,
    algorithm: str = "sha512",
    object_sink: ObjectSink | None = None,
    threads: int | None = None,
) -> Directory:
    """composefs-rs `read_container_root` (`cfsctl create-image` default):
    `read_filesystem` keeping only `CONTAINER_XATTR_ALLOWLIST` xattrs, then
    `transform_for_oci` (which needs a `/usr` directory)."""
    root = read_filesystem(
        path,
        algorithm=algorithm,
        object_sink=object_sink,
        threads=threads,
        xattr_filter=is_allowed_container_xattr,
    )
    transform_for_oci(root)
    return root


# -- tree transformations (composefs-rs generic_tree.rs) -----------------------


def _usr(root: Directory) -> Directory:
    usr = root.entries.get(b"usr")
    if not isinstance(usr, Directory):
        raise TreeError("/usr is missing or not a directory (needed for the root's metadata)")
    return usr


def copy_root_metadata_from_usr(root: Directory) -> None:
    """Give the root `/usr`'s mode, uid, gid, mtime and xattrs."""
    u = _usr(root).stat
    s = root.stat
    s.mode, s.uid, s.gid = u.mode, u.uid, u.gid
    s.mtime, s.mtime_nsec = u.mtime, u.mtime_nsec
    s.xattrs = dict(u.xattrs)


def canonicalize_run(root: Directory) -> None:
    """Empty `/run` (a tmpfs at runtime) and give it `/usr`'s mtime."""
    run = root.entries.get(b"run")
    if run is None:
        return
    if not isinstance(run, Directory):
        raise TreeError("/run is not a directory")
    u = _usr(root).stat
    run.stat.mtime, run.stat.mtime_nsec = u.mtime, u.mtime_nsec
    run.entries.clear()


def transform_for_oci(root: Directory) -> None:
    """composefs-rs `transform_for_oci`: root metadata from `/usr`, `/run` emptied."""
    copy_root_metadata_from_usr(root)
    canonicalize_run(root)


def filter_xattrs(root: Directory, keep: Callable[[bytes], bool]) -> None:
    """Drop, everywhere in the tree, the xattrs whose names `keep` rejects."""
    seen: set[int] = set()
    todo: list[Directory] = [root]
    while todo:
        d = todo.pop()
        d.stat.xattrs = {k: v for k, v in d.stat.xattrs.items() if keep(k)}
        for child in d.entries.values():
            if isinstance(child, Directory):
                todo.append(child)
            elif id(child) not in seen:
                seen.add(id(child))
                child.stat.xattrs = {k: v for k, v in child.stat.xattrs.items() if keep(k)}
