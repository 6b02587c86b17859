"""The object store: ``objects/XX/<rest>``, content named by fs-verity digest.

`ObjectStore` owns the repository directory fd (and the shared lock on it)
and everything that writes or reads objects: the anonymous ``O_TMPFILE`` +
``linkat`` write path (``.tmp-*`` fallback), fs-verity enabling and
measuring, the reflink / ``copy_file_range`` / hashing copy paths, verified
reads, and the atomic relative symlinks (``images/…``, ``streams/…``) that
give objects names. Streams, images and maintenance are built on it.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from typing import IO, Any, BinaryIO

from .. import fsverity
from .._atomic import syncfs
from ..errors import NotFoundError, RepositoryError, VerityError, VerityNotSupported
from ._fs import (
    _NO_TMPFILE,
    _check_relpath,
    _exists,
    _is_hex_id,
    _object_id_from_path,
    _open_regular,
    _proc_self_fd,
    _read_exactly,
    _tmpname,
    _write_all,
)

_COPY_BLOCK = 1 << 20
# How many ids linked into prefix directories this store created it keeps
# (see `_surely_absent`); past that it checks the directory like any other.
_FRESH_IDS_MAX = 1 << 16
_AT_EMPTY_PATH = 0x1000
_NO_EMPTY_PATH = frozenset({errno.ENOENT, errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSYS})
_libc: Any = None
_SMALL_OBJECT = 1 << 20
_FICLONE = 0x40049409
_NO_REFLINK = frozenset({errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM})
# ...of which these say the repository's filesystem cannot reflink at all
# (the kernel answers EXDEV first for a source elsewhere).
_NO_REFLINK_HERE = frozenset({errno.EOPNOTSUPP, errno.ENOTTY})


class StoreMethod(enum.Enum):
    """How `ensure_object_from_file` stored an object."""

    REFLINKED = "reflinked"
    COPIED = "copied"
    ALREADY_PRESENT = "already-present"


class FdWriter:
    """A minimal binary writer over a raw fd that hashes what passes through."""

    def __init__(self, fd: int, hasher: fsverity.FsVerityHasher | None) -> None:
        self.fd = fd
        self.hasher = hasher
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.hasher is not None:
            self.hasher.update(data)
        _write_all(self.fd, data)
        self.size += len(data)
        return len(data)


def _check_ended(source: BinaryIO | IO[bytes], size: int) -> None:
    """A stream that checks itself at its end (see `verified_id`) must end
    after the `size` bytes read: else its check would not have run."""
    if source.read(1):
        raise RepositoryError(f"the content is longer than the {size} bytes expected")


def _linkat_empty_path(fd: int, dirfd: int, name: str) -> None:
    """linkat(fd, "", dirfd, name, AT_EMPTY_PATH): the ``/proc/self/fd``
    path costs a procfs lookup per object (not in the os module)."""
    global _libc
    if _libc is None:
        import ctypes  # here: only writers of many objects get this far

        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.linkat(fd, b"", dirfd, os.fsencode(name), _AT_EMPTY_PATH) != 0:
        import ctypes

        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), name)


class TmpObject:
    """An object being written: an anonymous O_TMPFILE, or (fallback) a
    ``.tmp-*`` file in the repository root."""

    def __init__(self, repo: ObjectStore) -> None:
        self.repo = repo
        self.name: str | None = None
        objects = repo.objects_fd()
        try:
            self.fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=objects)
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
            for _ in range(16):
                name = _tmpname(".tmp-")
                try:
                    self.fd = os.open(
                        name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644,
                        dir_fd=repo.dirfd,
                    )  # fmt: skip
                except FileExistsError:
                    continue
                self.name = name
                break
            else:
                raise RepositoryError("cannot create a temporary file in the repository") from e

    def reopen_readonly(self) -> None:
        """Swap the writable fd for a read-only one (fs-verity needs that)."""
        ro = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(self.fd)
        self.fd = ro

    def link(self, relpath: str) -> bool:
        """Give the file its name under ``objects/``; False if it existed."""
        objects = self.repo.objects_fd()
        try:
            if self.name is not None:
                os.link(self.name, relpath, src_dir_fd=self.repo.dirfd, dst_dir_fd=objects)
            elif self.repo._link_empty_path:
                try:
                    _linkat_empty_path(self.fd, objects, relpath)
                except OSError as e:
                    # Without CAP_DAC_READ_SEARCH kernels before 6.10 answer
                    # ENOENT (a sandbox may say EPERM or ENOSYS): if the
                    # /proc way works, use it from now on (if it fails too,
                    # e.g. the directory is missing, that error is the answer).
                    if e.errno not in _NO_EMPTY_PATH:
                        raise
                    os.link(f"/proc/self/fd/{self.fd}", relpath, dst_dir_fd=objects)
                    self.repo._link_empty_path = False
            else:
                os.link(f"/proc/self/fd/{self.fd}", relpath, dst_dir_fd=objects)
        except FileExistsError:
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.name is not None:
            try:
                os.unlink(self.name, dir_fd=self.repo.dirfd)
            except FileNotFoundError:
                pass
            self.name = None

    def __enter__(self) -> TmpObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ObjectStore:
    """The objects of one open repository directory (see the module docstring).

    `dirfd` is the repository directory (its shared ``flock`` is held by
    whoever opened it); `close` releases it.
    """

    def __init__(
        self, path: str, dirfd: int, algorithm: str, insecure: bool, read_only: list[str]
    ) -> None:
        self.abspath = os.path.abspath(path)
        self.dirfd = dirfd
        self.algorithm = algorithm
        self.insecure = insecure
        self.read_only_features = read_only
        self._objects: int | None = None
        self._verity_possible = True
        self._no_reflink: set[tuple[int, int]] = set()
        self._no_copy_range: set[tuple[int, int]] = set()
        self._prefix_dirs: set[str] = set()
        # Prefix directories this store created, and the ids it linked into
        # them: any other id there is surely absent (see `_surely_absent`).
        self._fresh_prefixes: set[str] = set()
        self._fresh_ids: set[str] = set()
        self._link_empty_path = True
        self._reflink_here = True  # until FICLONE says the filesystem cannot
        self._objects_dev: int | None = None
        self._writable = False

    def close(self) -> None:
        """Close ``objects/`` and the repository directory (dropping its lock)."""
        if self._objects is not None:
            os.close(self._objects)
            self._objects = None
        if self.dirfd >= 0:
            os.close(self.dirfd)  # closing drops the flock
            self.dirfd = -1

    def __del__(self) -> None:
        # The store goes when the last holder does (the Repository, a stream
        # writer, a part): the lock is released then, not at interpreter exit.
        try:
            self.close()
        except Exception:
            pass

    def ensure_writable(self) -> None:
        """Refuse early if nothing can be written (read-only mount,
        permissions, unknown read-only-compatible features)."""
        if self.read_only_features:
            raise RepositoryError(
                "repository is read-only for this tool (unknown read-only-compatible "
                f"features: {', '.join(self.read_only_features)})"
            )
        st = os.statvfs(self.dirfd)
        if st.f_flag & os.ST_RDONLY:
            raise RepositoryError("repository is not writable: read-only file system")
        if not os.access(".", os.W_OK, dir_fd=self.dirfd):
            raise RepositoryError("repository is not writable: permission denied")

    def ensure_writable_once(self) -> None:
        """`ensure_writable` for the per-object paths: checked once per
        instance (two syscalls per object add up over thousands of small
        files); a later read-only remount still fails the write itself."""
        if not self._writable:
            self.ensure_writable()
            self._writable = True

    def sync(self) -> None:
        """Flush everything written so far to disk (``syncfs``)."""
        syncfs(self.dirfd)

    def objects_fd(self) -> int:
        if self._objects is None:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            try:
                self._objects = os.open("objects", flags, dir_fd=self.dirfd)
            except FileNotFoundError:
                # Created on demand (as composefs-rs does); opening first
                # keeps read-only repositories usable.
                try:
                    os.mkdir("objects", 0o755, dir_fd=self.dirfd)
                except FileExistsError:
                    pass
                self._objects = os.open("objects", flags, dir_fd=self.dirfd)
        return self._objects

    @property
    def objects_dir(self) -> str:
        """Path of ``objects/`` (the overlayfs data-only layer)."""
        return os.path.join(self.abspath, "objects")

    def object_relpath(self, object_id: str) -> str:
        """``XX/<rest>`` (relative to ``objects/``) of a hex id."""
        if not _is_hex_id(object_id, self.algorithm):
            raise RepositoryError(f"invalid {self.algorithm} object id {object_id!r}")
        return f"{object_id[:2]}/{object_id[2:]}"

    def has_object(self, object_id: str) -> bool:
        return _exists(self.objects_fd(), self.object_relpath(object_id))

    def measure(self, fd: int) -> str | None:
        """Kernel-measured digest, or None if the file has no (matching) verity."""
        try:
            alg, value = fsverity.measure_verity(fd)
        except VerityError:
            return None
        return value.hex() if alg == self.algorithm else None

    def finalize(self, tmp: TmpObject, userspace_id: str | None, size: int) -> tuple[str, bool]:
        """Enable verity (when possible), determine the id, link it in.
        Returns (id, newly created). A `userspace_id` must be well formed:
        a digest of ours, or checked by the caller."""
        object_id = userspace_id
        if not self.insecure or self._verity_possible:
            tmp.reopen_readonly()
            try:
                fsverity.enable_verity(tmp.fd, self.algorithm)
                measured = self.measure(tmp.fd)
            except VerityNotSupported:
                if not self.insecure:
                    raise RepositoryError(
                        "fs-verity is not supported here but the repository requires it"
                    ) from None
                self._verity_possible = False
                measured = None
            if measured is not None:
                if object_id is not None and measured != object_id:
                    raise RepositoryError(
                        f"fs-verity digest mismatch: kernel measured {measured}, "
                        f"expected {object_id}"
                    )
                object_id = measured
            elif not self.insecure:
                raise RepositoryError("fs-verity could not be enabled on a new object")
        if object_id is None:
            object_id = fsverity.digest_file(tmp.fd, self.algorithm).hex()
        # Ids here are digests (ours or the kernel's) or checked by the
        # public entry points: no second hex check per object.
        relpath = f"{object_id[:2]}/{object_id[2:]}"
        objects = self.objects_fd()
        # No stat first: linkat's EEXIST answers "already there" just as well.
        prefix = object_id[:2]
        if prefix not in self._prefix_dirs:
            try:
                os.mkdir(prefix, 0o755, dir_fd=objects)
                self._fresh_prefixes.add(prefix)
            except FileExistsError:
                pass
            self._prefix_dirs.add(prefix)
        try:
            new = tmp.link(relpath)
        except FileNotFoundError:
            # The directory vanished (removed by hand): recreate it once.
            self._prefix_dirs.discard(prefix)
            self._fresh_prefixes.discard(prefix)
            try:
                os.mkdir(prefix, 0o755, dir_fd=objects)
            except FileExistsError:
                pass
            new = tmp.link(relpath)
        if prefix in self._fresh_prefixes:
            if len(self._fresh_ids) < _FRESH_IDS_MAX:
                self._fresh_ids.add(object_id)
            else:  # enough: from now on every id is looked up
                self._fresh_prefixes.clear()
                self._fresh_ids.clear()
        return object_id, new

    def _surely_absent(self, object_id: str) -> bool:
        """Whether `object_id` cannot be in the store without a look: its
        prefix directory was created by this store and the id was never
        linked there by it. Only a shortcut past the existence check (a
        stat that misses costs as much as the write): a concurrent writer
        that linked it meanwhile makes our link fail with EEXIST, which
        `TmpObject.link` reports as "already present", as before."""
        return object_id[:2] in self._fresh_prefixes and object_id not in self._fresh_ids

    def ensure_object(self, data: bytes | bytearray | memoryview | BinaryIO | IO[bytes]) -> str:
        """Store `data` (bytes, or a binary file object read to its end) as
        an object, if not already there; return its id.

        Like composefs-rs, this does not fsync; `sync()` (done by
        `write_stream` and image commits before naming anything) does.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            return self.store_from_stream(data, None)[0]
        return self.store_bytes(data, check_writable=True)

    def store_bytes(
        self, data: bytes | bytearray | memoryview, *, check_writable: bool
    ) -> str:
        """`ensure_object` for in-memory data: hash first, so an object
        that exists costs one stat and no new inode (creating inodes is the
        expensive part of a write on some filesystems)."""
        return self.store_bytes_counted(data, check_writable=check_writable)[0]

    def store_bytes_counted(
        self,
        data: bytes | bytearray | memoryview,
        *,
        check_writable: bool,
        verified_id: str | None = None,
    ) -> tuple[str, bool]:
        """`store_bytes`, also telling whether the object is new (False: it
        was already present). `verified_id`: see `store_from_stream_counted`."""
        if verified_id is None:
            object_id = fsverity.digest_hex(data, self.algorithm)
        else:
            self.object_relpath(verified_id)  # refuses a malformed id
            object_id = verified_id
        # (a well-formed id: object_relpath's check is moot)
        relpath = f"{object_id[:2]}/{object_id[2:]}"
        objects = self.objects_fd()
        if self._surely_absent(object_id):
            pass
        elif self.insecure:
            if _exists(objects, relpath):
                return object_id, False
        else:
            try:
                fd = _open_regular(relpath, objects)
            except FileNotFoundError:
                pass
            else:
                try:
                    if self.measure(fd) != object_id:
                        raise RepositoryError(
                            f"existing object {object_id} fails fs-verity verification"
                        )
                finally:
                    os.close(fd)
                return object_id, False
        if check_writable:
            self.ensure_writable()
        else:
            self.ensure_writable_once()
        return object_id, self._write_new(data, object_id)

    def _write_new(self, data: bytes | bytearray | memoryview, object_id: str) -> bool:
        """Write `data`, whose digest the caller computed as `object_id`, as
        that object (a secure repository has the kernel confirm it); False
        if it appeared meanwhile."""
        with TmpObject(self) as tmp:
            _write_all(tmp.fd, data)
            return self.finalize(tmp, object_id, len(data))[1]

    def store_from_stream(
        self, source: BinaryIO | IO[bytes], size: int | None, *, check_writable: bool = True
    ) -> tuple[str, int]:
        """Store `size` bytes (or all) of `source` as an object: (id, size)."""
        object_id, n, _new = self.store_from_stream_counted(
            source, size, check_writable=check_writable
        )
        return object_id, n

    def store_from_stream_counted(
        self,
        source: BinaryIO | IO[bytes],
        size: int | None,
        *,
        check_writable: bool = True,
        verified_id: str | None = None,
    ) -> tuple[str, int, bool]:
        """`store_from_stream`, also telling whether the object is new.

        `verified_id`: `source` checks itself against this fs-verity digest
        and raises, instead of returning its last byte, if it differs (e.g.
        an HTTP body hashed as it arrives). The content is then not hashed a
        second time here; a secure repository still has the kernel measure
        it before it is linked. `source` must end after `size` bytes (so
        that its check has run): more is refused.
        """
        if size is not None and size <= _SMALL_OBJECT:
            # Most files in a layer are small: read them whole (bounded) and
            # take the in-memory path — one hash call, one write, and no
            # inode at all for content that is already stored.
            data = _read_exactly(source, size)
            if verified_id is not None:
                _check_ended(source, size)
            object_id, new = self.store_bytes_counted(
                data, check_writable=check_writable, verified_id=verified_id
            )
            return object_id, size, new
        if verified_id is not None:
            self.object_relpath(verified_id)  # refuses a malformed id
        if check_writable:
            self.ensure_writable()
        else:
            self.ensure_writable_once()
        hasher = (
            fsverity.FsVerityHasher(self.algorithm)
            if self.insecure and verified_id is None
            else None
        )
        with TmpObject(self) as tmp:
            out = FdWriter(tmp.fd, hasher)
            remaining = size
            while remaining is None or remaining > 0:
                want = _COPY_BLOCK if remaining is None else min(_COPY_BLOCK, remaining)
                block = source.read(want)
                if not block:
                    break
                out.write(block)
                if remaining is not None:
                    remaining -= len(block)
            if remaining:
                raise RepositoryError(f"short read: {remaining} bytes missing")
            if verified_id is not None and size is not None:
                _check_ended(source, size)
            object_id, new = self.finalize(
                tmp, hasher.hexdigest() if hasher is not None else verified_id, out.size
            )
        return object_id, out.size, new

    def ensure_object_from_stream(
        self,
        source: BinaryIO | IO[bytes],
        size: int | None = None,
        *,
        verified_id: str | None = None,
    ) -> str:
        """Store `size` bytes (or all) read from `source` as an object;
        hashes while copying (unless `verified_id`: see
        `store_from_stream_counted`), memory stays bounded."""
        return self.store_from_stream_counted(source, size, verified_id=verified_id)[0]

    def store_file(
        self,
        path_or_fd: str | os.PathLike[str] | int,
        expected_id: str | None = None,
        *,
        check_writable: bool = True,
        content: bytes | None = None,
    ) -> tuple[str, StoreMethod, int]:
        if expected_id is not None:
            self.object_relpath(expected_id)  # refuses a malformed id
        if check_writable:
            self.ensure_writable()
        else:
            self.ensure_writable_once()
        if isinstance(path_or_fd, int):
            src, owned = path_or_fd, False
        elif (fd := _proc_self_fd(path_or_fd)) is not None:
            # Tree readers hand over ``/proc/self/fd/N`` of a descriptor they
            # keep open during the call: use it rather than reopening it.
            src, owned = fd, False
        else:
            src, owned = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY), True
        try:
            before = os.fstat(src)
            if not stat.S_ISREG(before.st_mode):
                raise RepositoryError("only regular files can be stored as objects")
            if self._objects_dev is None:
                self._objects_dev = os.fstat(self.objects_fd()).st_dev
            key = (before.st_dev, self._objects_dev)
            with TmpObject(self) as tmp:
                method = StoreMethod.COPIED
                if key not in self._no_reflink:
                    try:
                        fcntl.ioctl(tmp.fd, _FICLONE, src)
                        method = StoreMethod.REFLINKED
                    except OSError as e:
                        if e.errno not in _NO_REFLINK:
                            raise
                        self._no_reflink.add(key)
                        if e.errno in _NO_REFLINK_HERE:
                            self._reflink_here = False
                # Hash while copying unless the id is known (the kernel
                # measures the copy anyway in a secure repository).
                want_hash = self.insecure and expected_id is None
                userspace_id = expected_id
                if method is StoreMethod.COPIED and content is not None and not want_hash:
                    # The caller read (and hashed) the file already: write
                    # those bytes rather than have the file read again.
                    _write_all(tmp.fd, content)
                    size = len(content)
                elif method is StoreMethod.COPIED:
                    computed, size = self._copy_fd(src, tmp.fd, before.st_size, want_hash, key)
                    userspace_id = computed or userspace_id
                else:
                    size = os.fstat(tmp.fd).st_size
                after = os.fstat(src)
                if size != before.st_size or (after.st_mtime_ns, after.st_ctime_ns) != (
                    before.st_mtime_ns,
                    before.st_ctime_ns,
                ):
                    raise RepositoryError("source file changed while it was being stored")
                object_id, created = self.finalize(tmp, userspace_id, size)
            return object_id, (method if created else StoreMethod.ALREADY_PRESENT), size
        finally:
            if owned:
                os.close(src)

    def _copy_fd(
        self, src: int, dst: int, size: int, want_hash: bool, key: tuple[int, int]
    ) -> tuple[str | None, int]:
        """Copy `src` into `dst`: in-kernel unless we must hash on the way
        (then one read pass feeds both). Returns the digest if hashed and
        the number of bytes copied (positioned reads: `src`'s offset is
        neither used nor moved)."""
        offset = 0
        if not want_hash and key not in self._no_copy_range:
            try:
                while offset < size:
                    n = os.copy_file_range(src, dst, size - offset, offset)
                    if not n:
                        break
                    offset += n
                return None, offset
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # Remembered per device pair (like FICLONE): across
                # filesystems every file would fail the same way.
                self._no_copy_range.add(key)
                os.lseek(dst, 0, os.SEEK_SET)
                os.ftruncate(dst, 0)
                offset = 0
        hasher = fsverity.FsVerityHasher(self.algorithm) if want_hash else None
        # Sized to the file (+1 so EOF shows on the second read): zeroing a
        # 1 MiB buffer per small file costs more than copying it.
        view = memoryview(bytearray(min(_COPY_BLOCK, size + 1)))
        while True:
            n = os.preadv(src, [view], offset)
            if not n:
                break
            if hasher is not None:
                hasher.update(view[:n])
            _write_all(dst, view[:n])
            offset += n
        return (hasher.hexdigest() if hasher is not None else None), offset

    def ensure_object_from_file(
        self, path_or_fd: str | os.PathLike[str] | int
    ) -> tuple[str, StoreMethod]:
        """Store a regular file's content: reflink (FICLONE) when the
        filesystem can, else copy. Returns (id, how it was stored)."""
        object_id, method, _ = self.store_file(path_or_fd)
        return object_id, method

    def store_file_with_digest(
        self,
        path_or_fd: str | os.PathLike[str] | int,
        object_id: str,
        content: bytes | None = None,
    ) -> bool:
        """Store a file whose fs-verity digest the caller already computed
        (a tree reader's object sink). Nothing is read if the object exists;
        otherwise the file is reflinked or copied in-kernel without hashing
        it again — a secure repository still has the kernel measure the
        copy, an insecure one trusts `object_id` (the copy fails if the
        source changes while it is copied). `content`, if given, is the
        whole content as the caller read it for its digest: it is written
        instead of reading the file again. Returns True if an object was
        created."""
        relpath = self.object_relpath(object_id)
        if not self._surely_absent(object_id) and _exists(self.objects_fd(), relpath):
            return False
        # Called per file (from reader threads): writability is checked once.
        if content is not None and not self._reflink_here:
            # Nothing to reflink: the bytes the caller read and hashed are
            # the object (no source descriptor, no change checks needed).
            self.ensure_writable_once()
            return self._write_new(content, object_id)
        stored, method, _ = self.store_file(
            path_or_fd, object_id, check_writable=False, content=content
        )
        if stored != object_id:
            raise RepositoryError(
                f"{path_or_fd} changed while it was read (digest {stored}, expected {object_id})"
            )
        return method is not StoreMethod.ALREADY_PRESENT

    def object_sink(self) -> Callable[[str, int, str], None]:
        """A `composefs.fs` object sink storing each external file's content."""
        self.objects_fd()  # open it before worker threads race for it
        self.ensure_writable()
        self._writable = True

        def sink(src_path: str, size: int, digest_hex: str, content: bytes | None = None) -> None:
            self.store_file_with_digest(src_path, digest_hex, content)

        sink.accepts_content = True  # type: ignore[attr-defined]  # see fs.ObjectSink
        return sink

    def open_object(self, object_id: str) -> int:
        """A read-only fd for an object; in a secure repository its
        fs-verity digest is checked against the id."""
        relpath = self.object_relpath(object_id)
        try:
            fd = _open_regular(relpath, self.objects_fd())
        except FileNotFoundError:
            raise NotFoundError(f"object {object_id} not found") from None
        if not self.insecure:
            try:
                measured = self.measure(fd)
                if measured != object_id:
                    raise RepositoryError(
                        f"object {object_id} fails fs-verity verification"
                        + (f" (measured {measured})" if measured else " (no fs-verity)")
                    )
            except BaseException:
                os.close(fd)
                raise
        return fd

    def open_object_file(self, object_id: str) -> BinaryIO:
        return os.fdopen(self.open_object(object_id), "rb")

    def read_object(self, object_id: str) -> bytes:
        with self.open_object_file(object_id) as f:
            return f.read()

    def symlink(self, name: str, target: str) -> None:
        """Point repository path `name` at repository path `target` with a
        relative symlink, creating parent directories; atomic replace."""
        self.ensure_writable()
        name_parts = _check_relpath(name, "link name")
        target_parts = _check_relpath(target, "link target")
        parent = name_parts[:-1]
        i = 0
        while i < len(parent) and i < len(target_parts) and parent[i] == target_parts[i]:
            i += 1
        for j in range(i, len(parent)):
            try:
                os.mkdir("/".join(parent[: j + 1]), 0o755, dir_fd=self.dirfd)
            except FileExistsError:
                pass
        relative = "/".join([".."] * (len(parent) - i) + target_parts[i:])
        fd = self.dirfd
        try:
            os.symlink(relative, name, dir_fd=fd)
            return
        except FileExistsError:
            pass
        try:
            if os.readlink(name, dir_fd=fd) == relative:
                return
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.EINVAL:  # not a symlink: replace it below
                raise
        for _ in range(16):
            tmp = _tmpname(".symlink-")
            try:
                os.symlink(relative, tmp, dir_fd=fd)
            except FileExistsError:
                continue
            try:
                os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=fd)
                except OSError:
                    pass
                raise
            return
        raise RepositoryError(f"cannot create a temporary symlink for {name}")

    def readlink_id(self, relpath: str) -> str | None:
        try:
            target = os.readlink(relpath, dir_fd=self.dirfd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise RepositoryError(f"{relpath} is not a symlink") from None
            raise
        return _object_id_from_path(target, self.algorithm)

    def resolve_id(self, relpath: str) -> str | None:
        """Follow a (chain of) symlink(s) to its object and return the id."""
        try:
            real = os.path.realpath(os.path.join(self.abspath, relpath), strict=True)
        except OSError:
            return None
        return _object_id_from_path(real, self.algorithm)
