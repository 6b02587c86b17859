"""Durable, atomic file writes: `replacing` a file (the OCI layout, boot and
HTTP publish writers) and `syncfs` (the repository and the digest store)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

_libc: Any = None


def syncfs(fd: int) -> None:
    """syncfs(2) of the filesystem holding `fd` (not in the os module)."""
    import ctypes  # here, not at the top: tools that never sync start faster

    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@contextmanager
def replacing(path: str, *, mode: int | None = None, sync: bool = False) -> Iterator[BinaryIO]:
    """A new file whose content replaces `path` only if the block ends
    without an exception. It is a temporary file in the same directory (so
    the rename is atomic), removed on failure; `mode` is set before the
    rename (mkstemp makes 0600), `sync` fsyncs it first."""
    import tempfile  # costs start-up time in tools that never replace files

    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
