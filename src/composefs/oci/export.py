"""Exporting stored images: ``cfsctl oci push`` (beyond composefs-rs 0.7.0;
its issue #15 asks for it).

`StoredImageSource` is an `ImageSource` over an image in a repository, so
everything that copies from a source works on it: `registry.push_image`
sends it to a registry, `write_oci_layout` writes it into an OCI image
layout directory.

What comes out:

* the config is the stored raw JSON, byte for byte (same config digest,
  same diff_ids, so a re-pull builds the same composefs image);
* layers are reassembled from their splitstreams: exactly the uncompressed
  tar that was imported (its digest is the diff_id). The repository keeps
  no compressed blobs, so a layer stored compressed upstream (gzip, zstd)
  cannot come back with its original digest: such layers are sent
  uncompressed and the manifest is rewritten for them (media type
  ``…layer.v1.tar`` / Docker ``…rootfs.diff.tar``, digest = diff_id, size;
  everything else in the manifest is kept). An image whose layers were
  uncompressed in the first place keeps its manifest byte for byte, and so
  its manifest digest. `StoredImageSource.rewritten` tells which case
  applies;
* artifact blobs (non-image manifests) are stored whole, so artifacts keep
  their manifest and digests.

Every reassembled layer is hashed while it is read: a repository that no
longer reproduces the digest fails the export (`DigestMismatch`) instead
of producing a corrupt copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from .._atomic import replacing
from ..errors import DigestMismatch, OciError
from ..splitstream import CONTENT_OCI_BLOB, CONTENT_OCI_LAYER, ObjectRef
from . import stored
from .image import (
    DOCKER_MANIFEST,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_JSON_SIZE,
    OCI_INDEX,
    BaseSource,
    ImageManifest,
    ImageSource,
    detect_media_type,
    layer_compression,
    load_json,
    parse_digest,
)
from .transports import split_path_tag

if TYPE_CHECKING:
    from ..repository import Repository

__all__ = [
    "ExportResult",
    "StoredImageSource",
    "export_image",
    "write_oci_layout",
]

_REF_NAME = "org.opencontainers.image.ref.name"
_OCI_TAR = "application/vnd.oci.image.layer.v1.tar"
_DOCKER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
_COPY = 1 << 20


@dataclass(frozen=True)
class _StoredBlob:
    """Where a blob of the exported image comes from."""

    size: int
    data: bytes | None = None  # small documents (the config)
    stream: str | None = None  # splitstream content id
    verity: str | None = None  # its object id
    content_type: int = CONTENT_OCI_LAYER


class StoredImageSource(BaseSource):
    """An `ImageSource` over an image stored in `repo`, named by a tag or
    ``@DIGEST`` (manifest or config digest, like the other ``oci`` commands)."""

    def __init__(self, repo: Repository, ref: str) -> None:
        self.repo = repo
        self.image = img = stored.open_image_ref(repo, ref)
        self._reference = f"composefs:{ref}"
        self._blobs: dict[str, _StoredBlob] = {
            img.config_digest: _StoredBlob(len(img.config_raw), data=img.config_raw)
        }
        if img.is_container_image:
            self.manifest_raw, self.rewritten = self._container_manifest()
        else:
            self.manifest_raw, self.rewritten = img.manifest_raw, False
            self._artifact_blobs()
        self.media_type = img.manifest.media_type
        self.manifest_digest = (
            img.manifest_digest
            if not self.rewritten
            else "sha256:" + hashlib.sha256(self.manifest_raw).hexdigest()
        )

    def _layer_size(self, content_id: str, verity: str, content_type: int) -> int:
        with self.repo.open_stream(content_id, verity, content_type) as reader:
            return int(reader.total_size)

    def _container_manifest(self) -> tuple[bytes, bool]:
        img = self.image
        diff_ids = img.diff_ids
        layers = img.manifest.layers
        if len(diff_ids) != len(layers):
            raise OciError(
                f"{img.manifest_digest}: config lists {len(diff_ids)} diff_ids "
                f"for {len(layers)} layers"
            )
        replace: dict[int, tuple[str, int]] = {}
        for i, (desc, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
            verity = img.layer_refs.get(diff_id)
            if verity is None:
                raise OciError(f"{img.manifest_digest}: layer {diff_id} is not stored")
            content_id = stored.layer_stream(diff_id)
            size = self._layer_size(content_id, verity, CONTENT_OCI_LAYER)
            self._blobs[diff_id] = _StoredBlob(size, stream=content_id, verity=verity)
            unchanged = (
                desc.digest == diff_id
                and desc.size == size
                and layer_compression(desc.media_type) == "none"
            )
            if not unchanged:
                replace[i] = (diff_id, size)
        if not replace:
            return img.manifest_raw, False
        obj = load_json(img.manifest_raw, "manifest")
        tar_type = _DOCKER_TAR if img.manifest.media_type == DOCKER_MANIFEST else _OCI_TAR
        for i, (diff_id, size) in replace.items():
            layer = dict(obj["layers"][i])
            layer.update(mediaType=tar_type, digest=diff_id, size=size)
            layer.pop("urls", None)  # foreign URLs name the original blob
            obj["layers"][i] = layer
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(), True

    def _artifact_blobs(self) -> None:
        img = self.image
        for desc in img.manifest.layers:
            verity = img.layer_refs.get(desc.digest)
            if verity is None:
                raise OciError(f"{img.manifest_digest}: blob {desc.digest} is not stored")
            content_id = stored.layer_stream(desc.digest)
            size = self._layer_size(content_id, verity, CONTENT_OCI_BLOB)
            self._blobs[desc.digest] = _StoredBlob(
                size, stream=content_id, verity=verity, content_type=CONTENT_OCI_BLOB
            )

    @property
    def reference(self) -> str:
        return self._reference

    @property
    def config_digest(self) -> str:
        return self.image.config_digest

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str | None]:
        if digest is not None and digest != self.manifest_digest:
            raise OciError(f"{self._reference}: no manifest {digest}")
        return self.manifest_raw, self.media_type

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        blob = self._blobs.get(digest)
        if blob is None:
            raise OciError(f"{self._reference}: blob {digest} is not part of this image")
        if size is not None and size != blob.size:
            raise OciError(f"{self._reference}: blob {digest} has {blob.size} bytes, not {size}")
        if blob.data is not None:
            return io.BytesIO(blob.data)
        assert blob.stream is not None and blob.verity is not None
        return cast(
            BinaryIO,
            _ReassembledBlob(
                self.repo, blob.stream, blob.verity, blob.content_type, digest, blob.size
            ),
        )


class _ReassembledBlob(io.RawIOBase):
    """A stored splitstream read back as one byte stream, checked against
    `digest` and `size`: the read that would end the stream raises instead
    when they do not match."""

    def __init__(
        self,
        repo: Repository,
        content_id: str,
        verity: str,
        content_type: int,
        digest: str,
        size: int,
    ) -> None:
        super().__init__()
        alg, _ = parse_digest(digest)
        self._repo = repo
        self._reader = repo.open_stream(content_id, verity, content_type)
        self._chunks: Iterator[bytes | ObjectRef] = self._reader.chunks()
        self._object: BinaryIO | None = None
        self._pending = memoryview(b"")
        self._hash = hashlib.new(alg)
        self._digest = digest
        self._size = size
        self._count = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _next(self, n: int) -> bytes:
        while True:
            if self._object is not None:
                data = self._object.read(n)
                if data:
                    return data
                self._object.close()
                self._object = None
            if self._pending:
                data = bytes(self._pending[:n])
                self._pending = self._pending[n:]
                return data
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            if isinstance(chunk, ObjectRef):
                self._object = self._repo.open_object_file(chunk.object_id)
            else:
                self._pending = memoryview(chunk)

    def read(self, n: int | None = -1, /) -> bytes:
        if self._done:
            return b""
        if n is None or n < 0:
            out = bytearray()
            while data := self.read(_COPY):
                out += data
            return bytes(out)
        if n == 0:
            return b""
        data = self._next(n)
        if data:
            self._count += len(data)
            if self._count > self._size:
                raise DigestMismatch(
                    f"stored blob {self._digest} is larger than its size {self._size}"
                )
            self._hash.update(data)
            return data
        self._done = True
        actual = f"{self._digest.partition(':')[0]}:{self._hash.hexdigest()}"
        if self._count != self._size or actual != self._digest:
            raise DigestMismatch(
                f"stored blob {self._digest} does not reassemble to its digest "
                f"(got {actual}, {self._count} bytes); run `cfsctl oci fsck`"
            )
        return b""

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if self._object is not None:
            self._object.close()
            self._object = None
        self._reader.close()
        super().close()


# -- OCI image layout output -------------------------------------------------------


def _write_atomic(path: str, data: bytes) -> None:
    # 0644 like the blobs (and skopeo): a layout is for others to read
    with replacing(path, mode=0o644) as f:
        f.write(data)


def _copy_blob(layout: str, source: ImageSource, digest: str, size: int) -> bool:
    """Write blob `digest` into the layout (verified; False if it was there)."""
    alg, hexpart = parse_digest(digest)
    target = os.path.join(layout, "blobs", alg, hexpart)
    try:
        if os.stat(target).st_size == size:
            return False
    except FileNotFoundError:
        pass
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with replacing(target, mode=0o644) as out:
        h = hashlib.new(alg)
        count = 0
        with source.open_blob(digest, size) as f:
            while data := f.read(_COPY):
                h.update(data)
                count += len(data)
                if count > size:
                    break
                out.write(data)
        if count != size or h.hexdigest() != hexpart:
            raise DigestMismatch(
                f"{source.reference}: blob {digest} does not match its digest and size"
            )
    return True


def _read_index(layout: str) -> list[dict[str, Any]]:
    path = os.path.join(layout, "index.json")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_SIZE + 1)
    except FileNotFoundError:
        return []
    if len(raw) > MAX_JSON_SIZE:
        raise OciError(f"{path} is too large")
    obj = load_json(raw, path)
    entries = obj.get("manifests") if isinstance(obj, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise OciError(f"{path}: not an OCI image index")
    return list(entries)


def write_oci_layout(source: ImageSource, path: str, tag: str | None = None) -> str:
    """Copy the image `source` names into the OCI image layout at `path`
    (created if missing; an existing layout gets the image added, and an
    entry with the same tag is replaced). Returns the manifest digest.

    Blobs are written under temporary names and renamed once verified;
    ``index.json`` is replaced last, so a failed copy never leaves an index
    that names missing blobs.
    """
    if tag is not None and (not tag or "/" in tag):
        raise OciError(f"invalid OCI layout tag {tag!r}")
    raw, declared = source.get_manifest(None)
    if len(raw) > MAX_JSON_SIZE:
        raise OciError("manifest is too large")
    media_type = detect_media_type(raw, declared)
    if media_type in INDEX_MEDIA_TYPES or media_type not in MANIFEST_MEDIA_TYPES:
        raise OciError(f"cannot write a manifest of type {media_type!r} to an OCI layout")
    manifest = ImageManifest.parse(raw, media_type)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()

    created = not os.path.exists(path)
    layout_file = os.path.join(path, "oci-layout")
    if not created:
        if not os.path.isdir(path):
            raise OciError(f"oci:{path}: not a directory")
        if os.path.exists(layout_file):
            with open(layout_file, "rb") as f:
                obj = load_json(f.read(4096), layout_file)
            if not isinstance(obj, dict) or not isinstance(obj.get("imageLayoutVersion"), str):
                raise OciError(f"oci:{path}: invalid oci-layout file")
        elif os.listdir(path):
            raise OciError(f"oci:{path}: exists and is neither empty nor an OCI layout")
    try:
        os.makedirs(os.path.join(path, "blobs"), exist_ok=True)
        entries = _read_index(path)
        blobs = {d.digest: d.size for d in (manifest.config, *manifest.layers)}
        for blob_digest, size in blobs.items():
            _copy_blob(path, source, blob_digest, size)
        alg, hexpart = parse_digest(digest)
        os.makedirs(os.path.join(path, "blobs", alg), exist_ok=True)
        mpath = os.path.join(path, "blobs", alg, hexpart)
        if not os.path.exists(mpath):
            _write_atomic(mpath, raw)
        if not os.path.exists(layout_file):
            _write_atomic(layout_file, b'{"imageLayoutVersion":"1.0.0"}')
        entry: dict[str, Any] = {"mediaType": media_type, "digest": digest, "size": len(raw)}
        if tag is not None:
            entry["annotations"] = {_REF_NAME: tag}

        def replaced(e: dict[str, Any]) -> bool:
            ann = e.get("annotations")
            name = ann.get(_REF_NAME) if isinstance(ann, dict) else None
            if tag is not None:
                return bool(name == tag)
            return name is None and e.get("digest") == digest

        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [e for e in entries if not replaced(e)] + [entry],
        }
        _write_atomic(
            os.path.join(path, "index.json"), json.dumps(index, separators=(",", ":")).encode()
        )
    except BaseException:
        if created:
            shutil.rmtree(path, ignore_errors=True)
        raise
    return digest


# -- the command -----------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    manifest_digest: str  # what the destination now holds
    config_digest: str
    destination: str
    rewritten: bool  # True when compressed layers were replaced by plain tars


def export_image(
    repo: Repository, ref: str, dest: str, *, registry_options: Any = None
) -> ExportResult:
    """Copy the stored image `ref` (tag or ``@DIGEST``) to `dest`:
    ``docker://HOST/NAME[:TAG]`` or ``oci:DIR[:TAG]``."""
    if dest.startswith("docker://"):
        from . import registry

        with StoredImageSource(repo, ref) as src:
            source = cast(StoredImageSource, src)
            digest = registry.push_image(source, dest[len("docker://") :], registry_options)
            return ExportResult(digest, source.config_digest, dest, source.rewritten)
    transport, sep, rest = dest.partition(":")
    if transport == "oci" and sep and rest:
        if registry_options is not None:
            raise OciError("registry options apply only to docker:// destinations")
        path, tag = split_path_tag(rest)
        with StoredImageSource(repo, ref) as src:
            source = cast(StoredImageSource, src)
            digest = write_oci_layout(source, path, tag)
            return ExportResult(digest, source.config_digest, dest, source.rewritten)
    raise OciError(f"unsupported destination {dest[:150]!r} (use docker://REF or oci:DIR[:TAG])")
