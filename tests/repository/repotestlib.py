"""Helpers the repository tests share: trees with stored files, a populated
repository, meta.json variants, object paths, a bare object store.

The tests run on the real filesystem under pytest's tmp_path (no fs-verity on
these machines, so repositories are insecure; `fsverity digest` is the
independent oracle for object names); the `repo` fixture is in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from composefs import fsverity
from composefs.repository import (
    ObjectStore,
    Repository,
)
from composefs.splitstream import CONTENT_OCI_LAYER
from composefs.tree import Directory, Leaf, Regular, Stat, Symlink

RUST_META_V2 = b"""{
  "version": 1,
  "algorithm": "fsverity-sha512-12",
  "features": {
    "compatible": [],
    "read-only-compatible": [],
    "incompatible": []
  },
  "erofs_formats": {
    "default": 2
  }
}
"""


def tree_with(repo: Repository, files: dict[str, bytes]) -> Directory:
    """A tree whose large files are stored as objects in `repo`."""
    root = Directory(Stat(0o755, mtime=1000))
    root.insert(b"/usr", Directory(Stat(0o755, mtime=1000)))
    root.insert(b"/usr/lnk", Leaf(Stat(0o777), Symlink(b"target")))
    for name, data in files.items():
        if len(data) > 64:
            content = Regular(len(data), digest=repo.ensure_object(data))
        else:
            content = Regular(len(data), data=data)
        root.insert(f"/usr/{name}".encode(), Leaf(Stat(0o644, mtime=1000), content))
    return root


def stray_files(repo: Repository) -> list[str]:
    return [n for n in os.listdir(repo.path) if n.startswith((".tmp-", ".symlink-"))]


def write_meta(path: Path, **changes: object) -> None:
    meta = json.loads(RUST_META_V2)
    meta.update(changes)
    (path / "meta.json").write_text(json.dumps(meta))


def populated(repo: Repository) -> dict[str, str]:
    big = b"B" * 10_000
    img = repo.commit_image(tree_with(repo, {"big": big}), "img")
    w = repo.create_stream(CONTENT_OCI_LAYER)
    w.write_inline(b"x" * 100)
    ext = w.write_external(b"E" * 5000)
    named = repo.ensure_object(b"N" * 500)
    w.add_named_stream_ref("other", named)
    stream = repo.write_stream(w, "layer", "layer-ref")
    return {
        "img": img,
        "big": fsverity.digest_hex(big, "sha512"),
        "ext": ext,
        "named": named,
        "stream": stream,
    }


def objpath(repo: Repository, oid: str) -> Path:
    return Path(repo.path) / "objects" / oid[:2] / oid[2:]


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def bare_store(path: Path, algorithm: str = "sha256") -> ObjectStore:
    """An `ObjectStore` on a plain directory: no meta.json, no lock, no facade."""
    path.mkdir()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return ObjectStore(str(path), fd, algorithm, True, [])
