"""`repository.meta`: meta.json parsing and writing, algorithm names, peek_algorithm."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from repotestlib import RUST_META_V2

from composefs.errors import RepositoryError
from composefs.repository.meta import (
    FormatConfig,
    RepoMetadata,
    _read_metadata,
    _write_metadata,
    algorithm_from_string,
    algorithm_string,
    peek_algorithm,
)


def test_algorithm_names() -> None:
    assert algorithm_string("sha512") == "fsverity-sha512-12"
    assert algorithm_from_string("fsverity-sha256-12") == "sha256"
    with pytest.raises(RepositoryError, match="must start with"):
        algorithm_from_string("sha256")


def test_metadata_round_trip() -> None:
    meta = RepoMetadata.from_json(RUST_META_V2)
    assert meta.algorithm == "sha512" and meta.format_config() == FormatConfig(2)
    assert json.loads(meta.to_json()) == json.loads(RUST_META_V2)
    assert RepoMetadata.from_json(meta.to_json()) == meta
    with pytest.raises(RepositoryError, match=r"meta\.json"):
        RepoMetadata.from_json(b"{not json")


def test_write_then_read_and_peek(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert _read_metadata(fd) == (None, False)
        meta = RepoMetadata.new("sha256")
        _write_metadata(fd, meta, enable_verity=False)
        assert _read_metadata(fd) == (meta, False)
        with pytest.raises(FileExistsError):
            _write_metadata(fd, meta, enable_verity=False)
    finally:
        os.close(fd)
    assert peek_algorithm(tmp_path) == "sha256"
    assert peek_algorithm(tmp_path / "absent") is None
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]
