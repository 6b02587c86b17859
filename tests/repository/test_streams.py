"""`repository.streams`: splitstreams, their names and refs.

See repotestlib for the shared helpers.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from repotestlib import bare_store

from composefs.errors import NotFoundError, SplitstreamError
from composefs.repository import (
    Repository,
    StreamStore,
)
from composefs.splitstream import CONTENT_OCI_CONFIG, CONTENT_OCI_LAYER, SplitStreamReader


def test_streams(repo: Repository) -> None:
    layer = os.urandom(200_000)
    w = repo.create_stream(CONTENT_OCI_LAYER)
    w.write_inline(b"tar header")
    ext = w.write_external(layer)
    w.write_external_stream(io.BytesIO(b"q" * 9000), 9000)
    w.write_inline(b"trailer")
    layer_id = repo.write_stream(w, "oci-layer-sha256:aa")
    assert repo.has_stream("oci-layer-sha256:aa") == layer_id
    assert repo.has_stream("oci-layer-sha256:bb") is None

    calls = []

    def build(writer: object) -> str:
        calls.append(1)
        assert hasattr(writer, "write_external")
        writer.write_external(b"{config json padded out to be external}" * 3)  # type: ignore[attr-defined]
        writer.add_named_stream_ref("sha256:aa", layer_id)  # type: ignore[attr-defined]
        return "built"

    cid, extra = repo.ensure_stream("oci-config-x", CONTENT_OCI_CONFIG, build, "img:latest")
    assert extra == "built" and calls == [1]
    cid2, extra2 = repo.ensure_stream("oci-config-x", CONTENT_OCI_CONFIG, build, "img:latest")
    assert (cid2, extra2, calls) == (cid, None, [1])
    assert repo.has_named_stream("img:latest")
    assert repo.list_stream_refs() == [("img:latest", "../oci-config-x")]
    assert repo.stream_id("refs/img:latest") == cid

    out = io.BytesIO()
    repo.cat_stream("oci-layer-sha256:aa", out, expected_content_type=CONTENT_OCI_LAYER)
    assert out.getvalue() == b"tar header" + layer + b"q" * 9000 + b"trailer"
    with repo.open_stream("refs/img:latest") as reader:
        assert isinstance(reader, SplitStreamReader)
        assert reader.named_refs == {"sha256:aa": layer_id}
    with (
        pytest.raises(SplitstreamError, match="content type"),
        repo.open_stream("oci-config-x", expected_content_type=CONTENT_OCI_LAYER),
    ):
        pass
    with repo.open_stream("ignored", verity=layer_id) as reader:
        assert ext in reader.object_refs
    assert repo.remove_stream_ref("img:latest")
    assert not repo.remove_stream_ref("img:latest")
    with pytest.raises(NotFoundError):
        repo.open_stream("refs/img:latest")


def test_stream_store_alone(tmp_path: Path) -> None:
    """Streams over a bare `ObjectStore`: write, name, resolve, read back."""
    store = bare_store(tmp_path / "store")
    streams = StreamStore(store)
    w = streams.create_stream(CONTENT_OCI_LAYER)
    w.write_inline(b"head")
    ext = w.write_external(b"E" * 5000)
    sid = streams.write_stream(w, "content-1", "tag/one")
    assert streams.has_stream("content-1") == sid
    assert streams.stream_id("refs/tag/one") == sid
    assert streams.list_stream_refs("tag") == [("one", "../../content-1")]
    out = io.BytesIO()
    streams.cat_stream("content-1", out)
    assert out.getvalue() == b"head" + b"E" * 5000
    with streams.open_stream("content-1") as r:
        assert r.object_refs == [ext]
    store.close()
