"""Replacing a file atomically (shared by the OCI layout and boot writers)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO


@contextmanager
def replacing(path: str, *, mode: int | None = None, sync: bool = False) -> Iterator[BinaryIO]:
    """A new file whose content replaces `path` only if the block ends
    without an exception. It is a temporary file in the same directory (so
    the rename is atomic), removed on failure; `mode` is set before the
    rename (mkstemp makes 0600), `sync` fsyncs it first."""
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
