"""Names from hostile input never split a tool's error line nor reach the
terminal raw: dumpfiles (mkcomposefs), layers (cfsctl oci import-layer)."""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from pathlib import Path

import hostilelib as H
from composefs.repository import Repository

BIN = Path(sys.executable).parent
RAW = ("\x1b", "\x07", "\x9b", "\r")


def _check(stderr: bytes, tool: str) -> None:
    text = stderr.decode("utf-8", "surrogateescape")
    assert text.startswith(f"{tool}: ") and text.count("\n") == 1, text
    assert not any(c in text for c in RAW), repr(text)


def test_mkcomposefs_dumpfile_names(tmp_path: Path) -> None:
    for path in H.dump_line_names(random.Random(7)):
        text = H.DUMP_ROOT + path + b" 0 100644 1 0 0 0 0.0 - - -\n"
        r = subprocess.run(
            [str(BIN / "mkcomposefs"), "--from-file", "-", str(tmp_path / "img")],
            input=text,
            capture_output=True,
        )
        assert r.returncode != 0
        _check(r.stderr, "mkcomposefs")


def test_import_layer_names(tmp_path: Path) -> None:
    Repository.init(tmp_path / "repo", insecure=True)[0].close()
    for bad in ("new\nline", "esc\x1b[2Jx", "bel\x07", "csi\x9bx"):
        layer = H.tar_bytes([H.reg(bad, pax={"SCHILY.xattr.user.\x1b\x00": "v"})])
        diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
        r = subprocess.run(
            [str(BIN / "cfsctl"), "--repo", str(tmp_path / "repo"), "oci", "import-layer", diff_id],
            input=layer,
            capture_output=True,
        )
        assert r.returncode != 0
        _check(r.stderr, "cfsctl")
