"""The known-answer vectors in ../shared/vectors, named once for every test.

`../shared/vectors/README.md` says how each is used; the lists here are its
file names, so a test parametrised over them still runs (and skips with the
`vectors` fixture's message) when the directory is absent.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from composefs import dumpfile
from composefs.erofs.format import FormatVersion
from composefs.tree import Directory

# c-mkcomposefs/: images whose plain sha256 must equal NAME.sha256.
C_VECTORS = [
    "bigfile-xattr.dump",
    "bigfile.dump",
    "config.dump.gz",
    "cs9-x86_64-minimal.dump.gz",
    "honggfuzz-bigfile-with-acl.dump",
    "honggfuzz-chardev-nonzero-size.dump",
    "honggfuzz-long-symlink.dump",
    "honggfuzz-longlink-unterminated.dump",
    "longlink.dump",
    "no-newline.dump",
    "special.dump",
    "special_v1.dump",
]
# Parsed like C without CFS_PARSE_STRICT; every other vector strictly.
LAX = frozenset({"no-newline.dump", "longlink.dump", "honggfuzz-longlink-unterminated.dump"})
# composefs-rs/: dumpfiles used for round trips in all formats.
RS_VECTORS = ["empty.dump", "simple.dump", "special.dump", "special_v1.dump"]


def c_vector_bytes(vectors: Path, name: str) -> bytes:
    """The dumpfile text of c-mkcomposefs/NAME (gunzipped if NAME.gz)."""
    data = (vectors / "c-mkcomposefs" / name).read_bytes()
    return gzip.decompress(data) if name.endswith(".gz") else data


def c_vector(vectors: Path, name: str) -> tuple[Directory, FormatVersion, FormatVersion | None]:
    """The tree of c-mkcomposefs/NAME and the (version, max_version) to give
    `mkfs`, as C's test-checksums.sh runs mkcomposefs: both pinned by
    NAME.version when it exists, else V0 and None (C's defaults)."""
    tree = dumpfile.parse(c_vector_bytes(vectors, name), strict=name not in LAX)
    vfile = vectors / "c-mkcomposefs" / f"{name}.version"
    if vfile.exists():
        v = FormatVersion(int(vfile.read_text().strip()))
        return tree, v, v
    return tree, FormatVersion.V0, None
