"""Low-level helpers the repository's rooms share: fd-relative file
operations, temporary names, id and path checks. No repository state."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import string
from collections.abc import Iterator
from typing import IO, BinaryIO

from ..errors import RepositoryError

HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEXDIGITS = frozenset(string.hexdigits.lower())
_HEX_RE = re.compile("[0-9a-f]*")
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT})

def _tmpname(prefix: str) -> str:
    import secrets  # here: only rarer paths need it (hmac, random: slow imports)

    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(12))


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _proc_self_fd(path: str | os.PathLike[str]) -> int | None:
    """N for a ``/proc/self/fd/N`` path naming a readable descriptor, else
    None (then the path is opened as usual, which also reopens write-only
    and O_PATH descriptors for reading)."""
    if isinstance(path, str) and path.startswith("/proc/self/fd/"):
        rest = path[len("/proc/self/fd/") :]
        if rest.isdigit() and rest.isascii():
            fd = int(rest)
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            except OSError:
                return None
            if flags & os.O_ACCMODE != os.O_WRONLY and not flags & getattr(os, "O_PATH", 0):
                return fd
    return None


def _read_exactly(source: BinaryIO | IO[bytes], size: int) -> bytes:
    """`size` bytes from `source` (which may return short reads)."""
    first = source.read(size)
    if len(first) == size:
        return first
    parts = [first]
    got = len(first)
    while got < size:
        block = source.read(size - got)
        if not block:
            raise RepositoryError(f"short read: {size - got} bytes missing")
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _is_hex_id(name: str, algorithm: str) -> bool:
    # A regex match is ~10x cheaper than building a set of the characters,
    # which shows with thousands of objects per layer.
    return len(name) == HEX_LENGTHS[algorithm] and _HEX_RE.fullmatch(name) is not None


def _object_id_from_path(target: str, algorithm: str) -> str | None:
    """The id in a symlink target ``…/XX/<rest>``, or None."""
    parts = target.rsplit("/", 2)
    if len(parts) < 2:
        return None
    hex_id = parts[-2] + parts[-1]
    if len(parts[-2]) != 2 or not _is_hex_id(hex_id, algorithm):
        return None
    return hex_id


def _check_relpath(name: str, what: str) -> list[str]:
    """Split a repository-relative name; refuse anything that could escape."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise RepositoryError(f"invalid {what} {name!r}")
    if "\0" in name:
        raise RepositoryError(f"invalid {what} {name!r}")
    return parts


def _msg(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


class NotRegularFile(OSError):
    """A repository file (object, image, stream, meta.json) that is no
    regular file: a FIFO, a device, a socket."""


# O_NONBLOCK: a FIFO put in the repository cannot block the open (and is then
# refused); a regular file is read in blocking mode again, as before.
_O_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def _open_regular(path: str, dir_fd: int | None = None) -> int:
    """Open a repository file for reading, refusing anything but a regular
    file (symlinks are followed, as before): reading a FIFO would block
    forever and a character device may never end. A directory raises
    IsADirectoryError, anything else `NotRegularFile`. (`oci.transports`
    opens layout blobs the same way.)"""
    fd = os.open(path, _O_READ, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            os.set_blocking(fd, True)
            return fd
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    raise NotRegularFile(errno.EINVAL, "not a regular file", path)


def _exists(dirfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dirfd)
    except FileNotFoundError:
        return False
    return True


def _isdir(dirfd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _walk_links(top: str) -> Iterator[tuple[str, str]]:
    """(path, target) of every symlink below `top`, recursively; directories
    are not followed through symlinks."""
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                if entry.is_symlink():
                    yield entry.path, os.readlink(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
