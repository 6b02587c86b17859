"""The known-answer vectors in ../shared/vectors, named once for every test.

`../shared/vectors/README.md` says how each is used; the lists here are its
file names, so a test parametrised over them still runs (and skips with the
`vectors` fixture's message) when the directory is absent.
"""

from __future__ import annotations

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
