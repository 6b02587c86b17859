"""Hostile JSON (deep nesting, huge integers, infinities, garbage) gives one
line naming what was read, never Python exception text."""

from __future__ import annotations

import json
import random

import pytest

import hostilelib as H
from composefs import _json
from composefs.errors import FormatError, RegistryError


def test_hostile_documents() -> None:
    for cls, doc in H.hostile_json(
        random.Random(4), lambda v: '{"token": "t", "expires_in": ' + v + "}"
    ):
        try:
            _json.loads(doc, "test doc")
        except FormatError as e:
            msg = str(e)
            assert msg.startswith("test doc: not valid JSON ("), (cls, msg)
            assert "\n" not in msg and "Exceeds the limit" not in msg and len(msg) < 300, (cls, msg)
        else:
            assert cls in ("number-1e308", "soup"), cls


def test_limits() -> None:
    ok = "[" * _json.MAX_DEPTH + "]" * _json.MAX_DEPTH
    assert _json.loads(ok, "d") is not None
    with pytest.raises(FormatError, match="deeper than 64"):
        _json.loads("[" + ok + "]", "d")
    assert _json.loads("9" * 40, "n") == int("9" * 40)
    with pytest.raises(FormatError, match="integer of 41 digits"):
        _json.loads("9" * 41, "n")
    with pytest.raises(FormatError, match="out of range"):
        _json.loads("1e999", "n")
    with pytest.raises(RegistryError, match=r"^tok: not valid JSON \(Expecting"):
        _json.loads(b"{", "tok", RegistryError)
    # documents json itself accepts come back the same
    doc = {"a": [1, 2.5, None, True, "x"], "b": {"c": -3}}
    assert _json.loads(json.dumps(doc), "d") == doc
