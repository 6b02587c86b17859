"""Hostile one-entry layers: the importer refuses with one clean line what
the image reader would refuse; everything it accepts builds an image that
reads back (composefs.limits is the rule both sides share)."""

from __future__ import annotations

import io
import random

import pytest

import hostilelib as H
from composefs.erofs.format import FormatVersion
from composefs.erofs.reader import read_image
from composefs.erofs.writer import mkfs
from composefs.errors import ComposefsError, TarFormatError
from composefs.oci import tar as T
from composefs.oci.layers import merge_layers


class _Sink:
    def inline(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def entry(self, entry: T.TarEntry) -> None:
        pass

    def external(self, entry: T.TarEntry, content: T.ContentReader) -> None:
        while content.read(1 << 16):
            pass


def _import(data: bytes) -> str:
    try:
        T.split_tar(io.BytesIO(data), _Sink())
        tree = merge_layers([T.read_members([data])])
        for version in (FormatVersion.V0, FormatVersion.V2):
            read_image(mkfs(tree, version))  # accepted => readable
    except ComposefsError as e:
        msg = str(e)
        assert "\n" not in msg and "\x1b" not in msg and "\x07" not in msg, msg
        assert len(msg) < 600, msg
        return type(e).__name__
    return "ok"


def test_hostile_layers_refused_cleanly_or_readable() -> None:
    seen: dict[str, set[str]] = {}
    for cls, data in H.hostile_layers(random.Random(11)):
        seen.setdefault(cls, set()).add(_import(data))
    assert seen["deep-2100"] == {"TarFormatError"}
    assert seen["deep-limit"] == {"ok"}
    assert seen["xattr-nul"] == {"TarFormatError"}
    assert seen["xattr-whiteout"] == {"TarFormatError"}
    assert seen["xattr-random"] >= {"ok", "TarFormatError"}
    for key in ("size", "uid", "gid", "mtime"):
        assert seen[f"pax-{key}-huge"] == {"TarFormatError"}, key
        assert seen[f"pax-{key}-2^64"] == {"TarFormatError"}, key


@pytest.mark.parametrize("key", ["size", "uid", "gid", "mtime"])
def test_pax_numbers_of_5000_digits(key: str) -> None:
    data = H.tar_bytes([H.reg("f", pax={key: "9" * 5000})])
    with pytest.raises(TarFormatError, match=f"PAX {key} out of range"):
        list(T.read_members([data]))
    # leading zeros are still a small number
    data = H.tar_bytes([H.reg("f", pax={"uid": "0" * 5000 + "7"})])
    assert next(iter(T.read_members([data]))).entry.uid == 7


@pytest.mark.parametrize("bad", ["new\nline", "esc\x1b[2J", "bel\x07"])
def test_names_in_errors_are_escaped(bad: str) -> None:
    data = H.tar_bytes([H.reg(bad + "/../x")])
    with pytest.raises(ComposefsError) as e:
        merge_layers([T.read_members([data])])
    msg = str(e.value)
    assert "\n" not in msg and "\x1b" not in msg and "\x07" not in msg
    assert "\\n" in msg or "\\x1b" in msg or "\\x07" in msg
