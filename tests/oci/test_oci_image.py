"""`composefs.oci.image`: the IO-free OCI image model, and the old names.

Everything here is bytes in, objects out: an in-memory `ImageSource`
stands where a transport would be.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
from pathlib import Path
from typing import BinaryIO

import pytest

from composefs.errors import DigestMismatch, OciError
from composefs.oci import image, storage, transports
from composefs.oci.image import (
    OCI_INDEX,
    OCI_MANIFEST,
    BaseSource,
    ImageManifest,
    Platform,
    resolve_manifest,
)


def _digest(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


MANIFEST = json.dumps(
    {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + "c" * 64,
            "size": 2,
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": "sha256:" + "a" * 64,
                "size": 10,
            }
        ],
    }
).encode()


def _index(*platforms: str, digest: str = _digest(MANIFEST)) -> bytes:
    entries = []
    for p in platforms:
        os_, arch = p.split("/")
        entries.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": digest,
                "size": len(MANIFEST),
                "platform": {"os": os_, "architecture": arch},
            }
        )
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()


class MemorySource(BaseSource):
    """An image source over a dict of manifests: no files, no sockets."""

    def __init__(self, top: bytes, by_digest: dict[str, bytes]) -> None:
        self.top = top
        self.by_digest = by_digest

    @property
    def reference(self) -> str:
        return "memory:"

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str | None]:
        return (self.top if digest is None else self.by_digest[digest]), None

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        return io.BytesIO(b"")


def test_resolve_through_an_index() -> None:
    src = MemorySource(_index("linux/arm64", "linux/amd64"), {_digest(MANIFEST): MANIFEST})
    resolved = resolve_manifest(src, Platform.parse("linux/amd64"))
    assert resolved.digest == _digest(MANIFEST) and resolved.media_type == OCI_MANIFEST
    assert resolved.manifest.layers[0].size == 10
    assert resolved.manifest.is_container_image
    with pytest.raises(OciError, match="no image for platform linux/s390x"):
        resolve_manifest(src, Platform.parse("linux/s390x"))


def test_single_entry_index_for_another_platform_is_refused() -> None:
    """A registry's index with one entry, for another platform: refused,
    naming what was found and what was wanted; an explicit platform takes it."""
    src = MemorySource(_index("linux/s390x"), {_digest(MANIFEST): MANIFEST})
    with pytest.raises(OciError, match=r"no image for platform linux/amd64 \(available: linux/s390x\)"):
        resolve_manifest(src, Platform.parse("linux/amd64"))
    assert resolve_manifest(src, Platform.parse("linux/s390x")).digest == _digest(MANIFEST)


def test_index_entry_digest_is_checked() -> None:
    wrong = "sha256:" + "0" * 64
    src = MemorySource(_index("linux/amd64", digest=wrong), {wrong: MANIFEST})
    with pytest.raises(DigestMismatch, match="manifest digest mismatch"):
        resolve_manifest(src, Platform.parse("linux/amd64"))


def test_manifest_parse_errors() -> None:
    with pytest.raises(OciError, match="not valid JSON"):
        ImageManifest.parse(b"{")
    with pytest.raises(OciError, match="schemaVersion must be 2"):
        ImageManifest.parse(b'{"schemaVersion": 3}')
    with pytest.raises(OciError, match="invalid digest"):
        image.parse_digest("sha256:XYZ")


def test_image_module_does_no_io() -> None:
    """The model imports nothing that reaches files, sockets or processes."""
    tree = ast.parse(Path(image.__file__).read_text())
    imported = {
        (n.module or "") if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert not imported & {"os", "io", "socket", "subprocess", "tarfile", "tempfile", "shutil"}


def test_old_names_still_importable() -> None:
    """transports and storage keep every name they had, as the same objects."""
    for name in ("Platform", "Descriptor", "ImageManifest", "resolve_manifest", "parse_digest"):
        assert getattr(transports, name) is getattr(image, name)
    from composefs.oci import fsck, pull, stored

    for name in storage.__all__:
        homes = [
            m for m in (pull, stored, fsck) if getattr(m, name, None) is getattr(storage, name)
        ]
        assert homes, name
