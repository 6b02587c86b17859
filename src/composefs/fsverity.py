"""fs-verity file digests, computed in userspace or measured by the kernel.

The userspace computation gives exactly what the Linux kernel reports for a
file with fs-verity enabled using 4096-byte Merkle tree blocks and no salt
(the only parameters composefs uses): the data is cut into 4096-byte blocks
(the last one zero-padded), each block is hashed, the concatenated hashes
are again packed into zero-padded 4096-byte blocks and hashed, level by level,
until one block remains; its hash is the root.  A file of at most one block
has the root H(padded block); an empty file has an all-zero root.  The digest
is H() of the 256-byte `fsverity_descriptor` holding the root and the size.

Speed matters here (every external file of every image is hashed), so the
hot path avoids per-block Python work: data is read with ``preadv`` into a
reused buffer and each 4096-byte ``memoryview`` slice is hashed by a C-level
``map`` pipeline (within ~20% of hashing the same bytes in one call).
Threads do not help: each block's hash releases and re-takes the GIL, and
two busy threads lose more in hand-offs than they gain.  So files of 1 MiB
and more can be hashed by helper processes (`digest_fd(...,
helper_processes=N)`, `digest_file`, `digest_files`), which are started on
first use and kept for later calls; small files are hashed in-process.

The kernel side is two ioctls, `FS_IOC_ENABLE_VERITY` and
`FS_IOC_MEASURE_VERITY`; kernels or filesystems without fs-verity make them
raise `errors.VerityNotSupported`.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import os
import select
import socket
import stat
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from operator import methodcaller
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import VerityError, VerityNotEnabled, VerityNotSupported

if TYPE_CHECKING:
    import subprocess

__all__ = [
    "ALGORITHMS",
    "BLOCK_SIZE",
    "FsVerityHasher",
    "algorithm_id",
    "default_threads",
    "descriptor",
    "digest",
    "digest_fd",
    "digest_file",
    "digest_files",
    "digest_hex",
    "digest_size",
    "digest_sized",
    "digest_stream",
    "enable_verity",
    "measure_or_compute",
    "measure_verity",
]

BLOCK_SIZE = 4096
LOG_BLOCK_SIZE = 12

# fs-verity's FS_VERITY_HASH_ALG_* numbers, and the digest sizes.
ALGORITHMS: dict[str, int] = {"sha256": 1, "sha512": 2}
_ALG_NAMES = {v: k for k, v in ALGORITHMS.items()}
_DIGEST_SIZES = {"sha256": 32, "sha512": 64}
_MAX_DIGEST_SIZE = 64

# struct fsverity_descriptor: version, hash_algorithm, log_blocksize,
# salt_size, reserved[4], le64 data_size, root_hash[64], salt[32], reserved[144].
_DESCRIPTOR = struct.Struct("<BBBB4xQ64s32s144x")
assert _DESCRIPTOR.size == 256

# Bytes read (and hashed) per step: big enough that per-chunk overhead vanishes,
# small enough that memory stays bounded with several files in flight.
_CHUNK = 4 << 20

_get_digest = methodcaller("digest")


def _ctor(algorithm: str) -> Callable[..., Any]:
    if algorithm == "sha256":
        return hashlib.sha256
    if algorithm == "sha512":
        return hashlib.sha512
    raise ValueError(f"unsupported fs-verity hash algorithm: {algorithm!r} (use sha256 or sha512)")


def algorithm_id(algorithm: str) -> int:
    """The kernel's FS_VERITY_HASH_ALG_* number for "sha256" / "sha512"."""
    _ctor(algorithm)
    return ALGORITHMS[algorithm]


def digest_size(algorithm: str) -> int:
    """Size in bytes of a digest made with `algorithm`."""
    _ctor(algorithm)
    return _DIGEST_SIZES[algorithm]


def default_threads() -> int:
    """How many hashing threads to use when the caller does not say."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def descriptor(algorithm: str, root_hash: bytes, data_size: int) -> bytes:
    """The 256-byte fsverity_descriptor that the digest is the hash of."""
    return _DESCRIPTOR.pack(
        1, algorithm_id(algorithm), LOG_BLOCK_SIZE, 0, data_size, root_hash, b""
    )


def _hash_blocks(ctor: Callable[..., Any], view: memoryview, nblocks: int) -> bytes:
    """Concatenated hashes of the first `nblocks` full blocks of `view`.

    The whole pipeline runs in C (map/methodcaller), which is what makes the
    per-block cost close to the cost of the hash itself.
    """
    if nblocks == 1:
        return bytes(ctor(view[:BLOCK_SIZE]).digest())
    slices = map(
        slice,
        range(0, nblocks * BLOCK_SIZE, BLOCK_SIZE),
        range(BLOCK_SIZE, (nblocks + 1) * BLOCK_SIZE, BLOCK_SIZE),
    )
    return b"".join(map(_get_digest, map(ctor, map(view.__getitem__, slices))))


class _Tree:
    """The Merkle tree above the data blocks, fed with data-block hashes.

    `levels[i]` holds the not-yet-packed hashes of level i (0 = hashes of
    data blocks).  A level's block is hashed only once a further hash
    arrives for it, so that at the end the one level that never overflowed
    a block is known to be the top.
    """

    __slots__ = ("_ctor", "_hsize", "levels", "nblocks")

    def __init__(self, ctor: Callable[..., Any], hsize: int) -> None:
        self._ctor = ctor
        self._hsize = hsize
        self.levels: list[bytearray] = [bytearray()]
        self.nblocks = 0

    def add(self, hashes: bytes) -> None:
        """Append data-block hashes (a multiple of the hash size)."""
        self.nblocks += len(hashes) // self._hsize
        self._push(0, hashes)

    def _push(self, level: int, hashes: bytes) -> None:
        buf = self.levels[level]
        buf += hashes
        if len(buf) <= BLOCK_SIZE:
            return
        # Pack every full block except the last one: it is kept back until
        # it is known whether more hashes follow.
        nfull = (len(buf) - 1) // BLOCK_SIZE
        upper = _hash_blocks(self._ctor, memoryview(buf), nfull)
        del buf[: nfull * BLOCK_SIZE]
        if level + 1 == len(self.levels):
            self.levels.append(bytearray())
        self._push(level + 1, upper)

    def copy(self) -> _Tree:
        t = _Tree(self._ctor, self._hsize)
        t.levels = [bytearray(b) for b in self.levels]
        t.nblocks = self.nblocks
        return t

    def root(self) -> bytes:
        if self.nblocks == 0:
            return bytes(self._hsize)
        if self.nblocks == 1:
            # One data block: its hash is the root, not H(H(block)).
            return bytes(self.levels[0])
        t = self.copy()
        levels = t.levels
        i = 0
        # Close every level below the top: pad its held-back block, hash it
        # into the level above (which may in turn overflow and grow the tree).
        while i < len(levels) - 1:
            h = self._ctor(_pad(levels[i])).digest()
            levels[i].clear()
            t._push(i + 1, h)
            i += 1
        return bytes(self._ctor(_pad(levels[-1])).digest())


def _pad(buf: bytes | bytearray) -> bytes:
    return bytes(buf) + bytes(BLOCK_SIZE - len(buf))


class FsVerityHasher:
    """Incremental fs-verity digest, like a hashlib object.

    >>> h = FsVerityHasher("sha256"); h.update(b"hello world"); h.hexdigest()[:8]
    '1e2eaa42'
    """

    __slots__ = ("_algorithm", "_ctor", "_partial", "_size", "_tree")

    def __init__(self, algorithm: str = "sha256") -> None:
        self._ctor = _ctor(algorithm)
        self._algorithm = algorithm
        self._tree = _Tree(self._ctor, _DIGEST_SIZES[algorithm])
        self._partial = bytearray()
        self._size = 0

    @property
    def algorithm(self) -> str:
        return self._algorithm

    @property
    def digest_size(self) -> int:
        return _DIGEST_SIZES[self._algorithm]

    @property
    def size(self) -> int:
        """Bytes fed so far."""
        return self._size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        if not n:
            return
        self._size += n
        pos = 0
        partial = self._partial
        if partial:
            take = min(BLOCK_SIZE - len(partial), n)
            partial += view[:take]
            pos = take
            if len(partial) < BLOCK_SIZE:
                return
            self._tree.add(self._ctor(partial).digest())
            partial.clear()
        nfull = (n - pos) // BLOCK_SIZE
        if nfull:
            self._tree.add(_hash_blocks(self._ctor, view[pos:], nfull))
            pos += nfull * BLOCK_SIZE
        if pos < n:
            partial += view[pos:]

    def _add_hashes(self, hashes: bytes, nbytes: int) -> None:
        """Feed precomputed data-block hashes covering `nbytes` (internal: a
        partial final block must already be zero-padded into its hash)."""
        assert not self._partial
        self._size += nbytes
        self._tree.add(hashes)

    def root_hash(self) -> bytes:
        """The Merkle tree root (all zeros for empty input)."""
        if self._partial:
            tree = self._tree.copy()
            tree.add(self._ctor(_pad(self._partial)).digest())
            return tree.root()
        return self._tree.root()

    def digest(self) -> bytes:
        """The fs-verity file digest of everything fed so far."""
        root = self.root_hash()
        return bytes(self._ctor(descriptor(self._algorithm, root, self._size)).digest())

    def hexdigest(self) -> str:
        return self.digest().hex()


def digest(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> bytes:
    """fs-verity digest of in-memory data."""
    n = len(data)
    if n <= BLOCK_SIZE:
        # Common for small files: no tree, root = H(padded block) (zeros if empty).
        ctor = _ctor(algorithm)
        root = (
            ctor(bytes(data) + bytes(BLOCK_SIZE - n)).digest()
            if n
            else bytes(_DIGEST_SIZES[algorithm])
        )
        return bytes(ctor(descriptor(algorithm, root, n)).digest())
    h = FsVerityHasher(algorithm)
    h.update(data)
    return h.digest()


def digest_hex(data: bytes | bytearray | memoryview, algorithm: str = "sha256") -> str:
    return digest(data, algorithm).hex()


def _read_full(f: BinaryIO, view: memoryview) -> int:
    """Fill `view` unless EOF comes first; return the bytes read."""
    got = 0
    total = len(view)
    while got < total:
        n = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


_tls = threading.local()


def _chunk_buffer() -> memoryview:
    """This thread's reusable read buffer (allocating and zeroing 4 MiB per
    file would dominate the cost of small files)."""
    view: memoryview | None = getattr(_tls, "view", None)
    if view is None:
        view = memoryview(bytearray(_CHUNK))
        _tls.view = view
    return view


def digest_stream(f: BinaryIO, algorithm: str = "sha256") -> bytes:
    """fs-verity digest of everything readable from binary stream `f`
    (in this thread, bounded memory)."""
    h = FsVerityHasher(algorithm)
    view = _chunk_buffer()
    _tls.view = None  # not reentrant-safe otherwise (e.g. a generator stream)
    try:
        while True:
            n = _read_full(f, view)
            if not n:
                break
            h.update(view[:n])
            if n < _CHUNK:
                break
    finally:
        _tls.view = view
    return h.digest()


class _PReader:
    """readinto() by pread from offset 0, leaving the fd's own offset alone."""

    __slots__ = ("fd", "offset")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.offset = 0

    def readinto(self, view: memoryview) -> int:
        n = os.preadv(self.fd, [view], self.offset)
        self.offset += n
        return n


# Hashing in threads does not scale: every 4 KiB block costs a GIL release and
# re-acquisition, and with two busy threads the hand-offs cost more than they
# save.  Regular files of some size are therefore hashed by helper processes:
# this same Python running the small script below (no imports beyond the
# standard library).  A helper is started on first use and then kept, idle,
# for later calls (it exits when its socket closes, i.e. with this process).
#
# Protocol over an AF_UNIX SOCK_SEQPACKET pair (message boundaries kept):
# request = (algorithm id, offset, length) with the file's descriptor attached
# (SCM_RIGHTS); reply = status byte + the data-block hashes of that range (the
# final block zero-padded), or an errno.  A file is cut into chunks handed out
# round-robin, two in flight per helper; the replies are read back in chunk
# order, so memory stays bounded and the parent only builds the upper tree
# (1/128 of the work).
_HELPER_CHUNK = 4 << 20  # a reply (1024 hashes) stays within one socket message
_HELPER_SCRIPT = """
import hashlib, os, socket, struct, sys
from operator import methodcaller
sock = socket.socket(fileno=int(sys.argv[1]))
sock.send(b"R")
req = struct.Struct("<BQQ")
ctors = {1: hashlib.sha256, 2: hashlib.sha512}
dg = methodcaller("digest")
mv = memoryview(bytearray(CHUNK))
while True:
    try:
        msg, fds, _, _ = socket.recv_fds(sock, req.size, 1)
    except OSError:
        break
    if len(msg) != req.size or len(fds) != 1:
        break
    alg, off, n = req.unpack(msg)
    fd = fds[0]
    try:
        got = 0
        while got < n:
            r = os.preadv(fd, [mv[got:n]], off + got)
            if not r:
                break
            got += r
        if got < n:
            reply = b"\\2"
        else:
            nb = -(-n // 4096)
            mv[n:nb * 4096] = bytes(nb * 4096 - n)
            reply = b"\\0" + b"".join(map(dg, map(ctors[alg], map(mv.__getitem__, map(slice,
                range(0, nb * 4096, 4096), range(4096, nb * 4096 + 1, 4096))))))
    except OSError as e:
        reply = b"\\1" + struct.pack("<i", e.errno or 5)
    finally:
        os.close(fd)
    try:
        sock.send(reply)
    except OSError:
        break
""".replace("CHUNK", str(_HELPER_CHUNK))
_HELPER_REQ = struct.Struct("<BQQ")
# Files at least this large go to helpers already running; starting new
# helpers (~20 ms each) is worth it only from _HELPER_SPAWN_MIN (or when the
# caller says many files will follow).
_HELPER_MIN = 1 << 20
_HELPER_SPAWN_MIN = 32 << 20
_HELPER_START_TIMEOUT = 30.0
_HELPER_WINDOW = 3  # requests in flight per helper


class _HelperDied(Exception):
    pass


class _Helper:
    __slots__ = ("proc", "ready", "sock")

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.proc = proc
        self.sock = sock
        self.ready = False

    @classmethod
    def start(cls) -> _Helper | None:
        if not sys.executable:
            return None
        import subprocess  # here: processes that only hash in memory start faster

        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HELPER_SCRIPT, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        except OSError:
            mine.close()
            return None
        finally:
            theirs.close()
        return cls(proc, mine)

    def send(self, fd: int, alg_id: int, offset: int, length: int) -> None:
        try:
            if not self.ready:
                # The first message proves the helper runs our script: should
                # sys.executable be something else (an embedding program), we
                # must not wait for replies forever.
                self.sock.settimeout(_HELPER_START_TIMEOUT)
                try:
                    if self.sock.recv(16) != b"R":
                        raise _HelperDied
                finally:
                    self.sock.settimeout(None)
                self.ready = True
            socket.send_fds(self.sock, [_HELPER_REQ.pack(alg_id, offset, length)], [fd])
        except OSError:
            raise _HelperDied from None

    def recv(self, expected: int) -> bytes:
        try:
            msg = self.sock.recv(1 + max(expected, 4))
        except OSError:
            raise _HelperDied from None
        if msg[:1] == b"\0" and len(msg) == 1 + expected:
            return msg[1:]
        if msg[:1] == b"\1" and len(msg) == 5:
            err = struct.unpack("<i", msg[1:])[0]
            raise OSError(err, os.strerror(err))
        if msg[:1] == b"\2":
            raise OSError(errno.EIO, "file shrank while its fs-verity digest was computed")
        raise _HelperDied

    def close(self, kill: bool = False) -> None:
        import subprocess

        self.sock.close()  # a healthy helper exits when it sees EOF
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _HelperPool:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[_Helper] = []
        self.pid = os.getpid()

    def acquire(self, spawn: bool) -> _Helper | None:
        with self.lock:
            if self.pid != os.getpid():
                # Forked: the helpers belong to the parent; drop our copies.
                for h in self.idle:
                    h.sock.close()
                self.idle = []
                self.pid = os.getpid()
            while self.idle:
                h = self.idle.pop()
                if h.proc.poll() is None:
                    return h
                h.sock.close()
        return _Helper.start() if spawn else None

    def release(self, h: _Helper, reusable: bool, broken: bool = False) -> None:
        if reusable and h.proc.poll() is None:
            with self.lock:
                if self.pid == os.getpid() and len(self.idle) < 2 * default_threads() + 2:
                    self.idle.append(h)
                    return
        h.close(kill=broken)

    def shutdown(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for h in idle:
            h.close()


_helpers = _HelperPool()
atexit.register(_helpers.shutdown)


def _digest_with_helpers(
    fd: int, size: int, algorithm: str, nhelpers: int, spawn: bool
) -> bytes | None:
    """Digest of the first `size` bytes of regular file `fd`, hashed by up
    to `nhelpers` helper processes; None if no helper is available (or one
    died), in which case the caller hashes in-process."""
    nchunks = -(-size // _HELPER_CHUNK)
    helpers: list[_Helper] = []
    for _ in range(max(1, min(nhelpers, nchunks))):
        h = _helpers.acquire(spawn)
        if h is None:
            break
        helpers.append(h)
    if not helpers:
        return None
    alg_id = ALGORITHMS[algorithm]
    hsize = _DIGEST_SIZES[algorithm]
    hasher = FsVerityHasher(algorithm)
    # Chunks go to whichever helper answers first (a helper the scheduler
    # leaves waiting must not stall the others); answers are fed to the tree
    # in chunk order, at most `window` chunks ahead of the oldest unanswered.
    window = _HELPER_WINDOW * len(helpers)
    outstanding: dict[int, deque[int]] = {h.sock.fileno(): deque() for h in helpers}
    by_fd = {h.sock.fileno(): h for h in helpers}
    done: dict[int, bytes] = {}
    nxt = fed = 0
    reusable = broken = False

    def chunk_bytes(c: int) -> int:
        return min(_HELPER_CHUNK, size - c * _HELPER_CHUNK)

    def send(h: _Helper) -> None:
        nonlocal nxt
        h.send(fd, alg_id, nxt * _HELPER_CHUNK, chunk_bytes(nxt))
        outstanding[h.sock.fileno()].append(nxt)
        nxt += 1

    try:
        poller = select.poll()
        for h in helpers:
            poller.register(h.sock.fileno(), select.POLLIN)
        while True:
            while fed in done:
                hasher._add_hashes(done.pop(fed), chunk_bytes(fed))
                fed += 1
            if fed == nchunks:
                break
            # Top every helper up to its share, within the window.
            for h in helpers:
                queue = outstanding[h.sock.fileno()]
                while len(queue) < _HELPER_WINDOW and nxt < nchunks and nxt - fed < window:
                    send(h)
            if not any(outstanding.values()):
                raise _HelperDied  # cannot happen; never wait for nothing
            for sfd, _ in poller.poll():
                queue = outstanding[sfd]
                if not queue:
                    raise _HelperDied  # readable with nothing asked: EOF
                c = queue.popleft()
                done[c] = by_fd[sfd].recv(-(-chunk_bytes(c) // BLOCK_SIZE) * hsize)
        reusable = True
        return hasher.digest()
    except _HelperDied:
        broken = True
        return None
    finally:
        # After an error replies may still be queued: such helpers are retired.
        for h in helpers:
            _helpers.release(h, reusable, broken)


def _digest_fd(fd: int, algorithm: str, helpers: int, spawn: bool = False) -> bytes:
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return _digest_regular(fd, st.st_size, algorithm, helpers, spawn)[0]
    return _digest_unsized(fd, algorithm)


def _digest_regular(
    fd: int, size: int, algorithm: str, helpers: int, spawn: bool
) -> tuple[bytes, bytes | None]:
    """Digest of regular file `fd`, `size` bytes by its last fstat, and its
    content if that was read whole, in one read (a small file)."""
    if helpers > 0 and size >= _HELPER_MIN:
        result = _digest_with_helpers(
            fd, size, algorithm, helpers, spawn or size >= _HELPER_SPAWN_MIN
        )
        if result is not None:
            return result, None
    if size < _CHUNK:
        # Small file: one read of exactly what is there (one byte more
        # detects growth, which falls through to streaming).
        data = os.pread(fd, size + 1, 0)
        if len(data) <= size:
            return digest(data, algorithm), data
    return _digest_unsized(fd, algorithm), None


def _digest_unsized(fd: int, algorithm: str) -> bytes:
    reader: Any
    try:
        os.lseek(fd, 0, os.SEEK_CUR)
        reader = _PReader(fd)
    except OSError:
        reader = open(fd, "rb", buffering=0, closefd=False)
    return digest_stream(reader, algorithm)


def digest_sized(
    fd: int, size: int, algorithm: str = "sha256", *, helper_processes: int = 0
) -> tuple[bytes, bytes | None]:
    """`digest_fd` of a regular file the caller has just fstat'ed as `size`
    bytes (no second fstat), also returning its content when that was read
    whole, in one read (small files), else None: a caller that copies the
    file can write those bytes instead of reading it again. A file that
    changed size meanwhile is hashed as it now is: compare sizes after."""
    _ctor(algorithm)
    return _digest_regular(fd, size, algorithm, max(0, helper_processes), True)


def digest_fd(fd: int, algorithm: str = "sha256", *, helper_processes: int = 0) -> bytes:
    """fs-verity digest of open file `fd` (read with pread from offset 0).

    With `helper_processes` > 0 a large regular file is hashed by that many
    helper processes; worker threads that hash many files should pass 1, so
    that they spend their time waiting instead of contending for the GIL.
    """
    _ctor(algorithm)
    return _digest_fd(fd, algorithm, max(0, helper_processes), spawn=True)


def digest_file(
    path_or_fd: str | os.PathLike[str] | int,
    algorithm: str = "sha256",
    *,
    threads: int | None = None,
) -> bytes:
    """fs-verity digest of a file's whole content, streamed.

    A seekable file descriptor is read from offset 0 with pread, so its own
    offset is left alone; a pipe is read from where it stands.  `threads`
    bounds the parallelism for a large file (None: one per CPU; 1: hash
    in this thread only).
    """
    _ctor(algorithm)
    if threads is None:
        threads = default_threads()
    workers = 0 if threads <= 1 else threads
    if isinstance(path_or_fd, int):
        return _digest_fd(path_or_fd, algorithm, workers)
    fd = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        return _digest_fd(fd, algorithm, workers)
    finally:
        os.close(fd)


def digest_files(
    paths: Iterable[str | os.PathLike[str] | int],
    algorithm: str = "sha256",
    threads: int | None = None,
) -> list[bytes]:
    """fs-verity digests of several files, `threads` at a time.

    Results are in the order of `paths`; the first failure (an OSError of
    that file) is raised.  Each large file gets one helper process, so
    several of them really are hashed in parallel.
    """
    items: Sequence[str | os.PathLike[str] | int] = list(paths)
    _ctor(algorithm)
    if threads is None:
        threads = default_threads()
    threads = max(1, min(threads, len(items) or 1))
    if threads == 1:
        return [digest_file(p, algorithm, threads=1) for p in items]

    def one(p: str | os.PathLike[str] | int) -> bytes:
        if isinstance(p, int):
            return _digest_fd(p, algorithm, 1, spawn=True)
        fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            return _digest_fd(fd, algorithm, 1, spawn=True)
        finally:
            os.close(fd)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fsverity") as pool:
        return list(pool.map(one, items))


# ---------------------------------------------------------------------------
# Kernel ioctls (linux/fsverity.h)


def _ioc(direction: int, typ: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(typ) << 8) | nr


# struct fsverity_enable_arg { u32 version, hash_algorithm, block_size,
# salt_size; u64 salt_ptr; u32 sig_size, reserved1; u64 sig_ptr; u64 reserved2[11]; }
_ENABLE_ARG = struct.Struct("=IIIIQIIQ88x")
assert _ENABLE_ARG.size == 128
# struct fsverity_digest { u16 digest_algorithm; u16 digest_size; u8 digest[]; }
_DIGEST_HDR = struct.Struct("=HH")

FS_IOC_ENABLE_VERITY = _ioc(1, "f", 133, _ENABLE_ARG.size)  # _IOW
FS_IOC_MEASURE_VERITY = _ioc(3, "f", 134, _DIGEST_HDR.size)  # _IOWR

# errno values meaning "this kernel or filesystem has no fs-verity".
_UNSUPPORTED = frozenset({errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOPKG})


def _describe(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def enable_verity(fd: int, algorithm: str = "sha256") -> None:
    """Enable fs-verity on the open file `fd` (4096-byte blocks, no salt).

    The file must not be open for writing anywhere (the kernel says ETXTBSY;
    retried briefly, as composefs-rs does).  Raises `VerityNotSupported` when
    the kernel or filesystem cannot do it, `VerityError` otherwise.  Enabling
    a file that already has fs-verity is not an error.
    """
    arg = bytearray(_ENABLE_ARG.pack(1, algorithm_id(algorithm), BLOCK_SIZE, 0, 0, 0, 0, 0))
    for attempt in range(4):
        try:
            fcntl.ioctl(fd, FS_IOC_ENABLE_VERITY, arg, True)
            return
        except OSError as e:
            if e.errno == errno.EEXIST:
                return
            if e.errno == errno.ETXTBSY and attempt < 3:
                time.sleep(0.001)
                continue
            if e.errno in _UNSUPPORTED or e.errno == errno.EINVAL:
                # EINVAL: the kernel rejects 4096-byte blocks or sha512 here.
                raise VerityNotSupported(
                    f"fs-verity is not supported by this filesystem or kernel ({_describe(e)})"
                ) from None
            raise VerityError(f"cannot enable fs-verity: {_describe(e)}") from None


def measure_verity(fd: int) -> tuple[str, bytes]:
    """The kernel's (algorithm, digest) for a file with fs-verity enabled.

    Raises `VerityNotSupported` without kernel/filesystem support,
    `VerityNotEnabled` for a file without fs-verity, `VerityError` otherwise.
    """
    buf = bytearray(_DIGEST_HDR.pack(0, _MAX_DIGEST_SIZE) + bytes(_MAX_DIGEST_SIZE))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf, True)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            raise VerityNotSupported(
                f"fs-verity is not supported by this filesystem or kernel ({_describe(e)})"
            ) from None
        if e.errno == errno.ENODATA:
            raise VerityNotEnabled("fs-verity is not enabled on this file") from None
        raise VerityError(f"cannot measure fs-verity digest: {_describe(e)}") from None
    alg_id, size = _DIGEST_HDR.unpack_from(buf)
    name = _ALG_NAMES.get(alg_id)
    if name is None or size != _DIGEST_SIZES[name]:
        raise VerityError(f"kernel reported an unknown fs-verity algorithm {alg_id} (size {size})")
    return name, bytes(buf[_DIGEST_HDR.size : _DIGEST_HDR.size + size])


def measure_or_compute(fd: int, algorithm: str = "sha256") -> bytes:
    """The fs-verity digest of `fd`: measured by the kernel when the file has
    fs-verity with `algorithm`, otherwise computed in userspace.

    (C `lcfs_fd_get_fsverity` does the same but fails for a sha512-enabled
    file; here a different kernel algorithm just means computing ours.)
    """
    _ctor(algorithm)
    try:
        alg, value = measure_verity(fd)
    except (VerityNotSupported, VerityNotEnabled):
        pass
    else:
        if alg == algorithm:
            return value
    return digest_file(fd, algorithm)
