"""The OCI image model, IO-free: bytes in, objects out.

Media types, digests, `Platform`, `Descriptor`, `ImageManifest`, index
parsing, platform selection and `resolve_manifest` (which walks an index
through any `ImageSource`), plus the `ImageSource` protocol itself and the
pull progress events. Nothing here opens a file or a socket: the
transports (`composefs.oci.transports`), the registry client
(`composefs.oci.registry`), the pull pipeline and the exporter all build on
this module, and it depends on nothing of theirs.
"""

from __future__ import annotations

import hashlib
import platform as _platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, runtime_checkable

from .. import _json
from ..errors import DigestMismatch, OciError

# -- media types ---------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
IMAGE_CONFIG_MEDIA_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

# Layer media type -> compression ("none", "gzip", "zstd").
_LAYER_COMPRESSION = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}

# Limits for small JSON documents read whole (manifests, configs, indexes).
MAX_JSON_SIZE = 16 * 1024 * 1024


def read_at_most(f: Any, limit: int) -> bytes:
    """Read until EOF or `limit` bytes (raw streams may return short reads)."""
    out = bytearray()
    while len(out) < limit:
        data = f.read(limit - len(out))
        if not data:
            break
        out += data
    return bytes(out)


def layer_compression(media_type: str) -> str | None:
    """The compression ("none", "gzip", "zstd") of a tar layer media type, else None."""
    return _LAYER_COMPRESSION.get(media_type)


def is_tar_layer(media_type: str) -> bool:
    return media_type in _LAYER_COMPRESSION


# -- digests ---------------------------------------------------------------

_DIGEST_HEX_LEN = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")


def parse_digest(digest: str) -> tuple[str, str]:
    """Split and validate ``alg:hex``. Only sha256/sha512 with lowercase hex:
    digests become file names, so nothing else may pass."""
    alg, sep, hexpart = digest.partition(":")
    want = _DIGEST_HEX_LEN.get(alg)
    if not sep or want is None or len(hexpart) != want or not _HEX_RE.fullmatch(hexpart):
        raise OciError(f"invalid digest: {digest[:150]!r}")
    return alg, hexpart


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def digest_of(data: bytes, like: str) -> str:
    """The digest of `data` with the algorithm used by the digest `like`."""
    alg, _ = parse_digest(like)
    return f"{alg}:" + hashlib.new(alg, data).hexdigest()


def check_digest(data: bytes, digest: str, what: str) -> None:
    actual = digest_of(data, digest)
    if actual != digest:
        raise DigestMismatch(f"{what}: digest mismatch: expected {digest}, got {actual}")


# -- platforms ---------------------------------------------------------------

_ARCH_ALIASES = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "armv7l": "arm",
    "armv6l": "arm",
}


@dataclass(frozen=True)
class Platform:
    """An OCI platform (os/architecture[/variant])."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/amd64``, ``linux/arm64/v8`` or just ``arm64`` (os linux)."""
        parts = text.split("/")
        if len(parts) == 1 and parts[0]:
            return cls("linux", _ARCH_ALIASES.get(parts[0], parts[0]))
        if len(parts) in (2, 3) and all(parts):
            arch = _ARCH_ALIASES.get(parts[1], parts[1])
            return cls(parts[0], arch, parts[2] if len(parts) == 3 else None)
        raise OciError(f"invalid platform {text!r}: expected OS/ARCH[/VARIANT]")

    @classmethod
    def host(cls) -> Platform:
        machine = _platform.machine()
        arch = _ARCH_ALIASES.get(machine, machine)
        variant = None
        if machine.startswith("armv") and len(machine) >= 5:
            variant = "v" + machine[4]
        return cls("linux", arch, variant)

    @classmethod
    def from_json(cls, obj: Any) -> Platform | None:
        if not isinstance(obj, dict):
            return None
        os_ = obj.get("os")
        arch = obj.get("architecture")
        if not isinstance(os_, str) or not isinstance(arch, str):
            return None
        variant = obj.get("variant")
        return cls(os_, arch, variant if isinstance(variant, str) and variant else None)

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)

    def _norm_variant(self) -> str | None:
        # arm64 images usually omit "v8"; treat both spellings alike.
        if self.architecture == "arm64" and self.variant in (None, "v8"):
            return "v8"
        return self.variant

    def matches(self, candidate: Platform, *, strict_variant: bool) -> bool:
        if candidate.os != self.os or candidate.architecture != self.architecture:
            return False
        if strict_variant and self.variant is not None:
            return candidate._norm_variant() == self._norm_variant()
        return True


# -- descriptors and manifests -----------------------------------------------


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: Platform | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise OciError(f"{what}: descriptor is not a JSON object")
        digest = obj.get("digest")
        size = obj.get("size")
        media_type = obj.get("mediaType", "")
        if not isinstance(digest, str):
            raise OciError(f"{what}: descriptor has no digest")
        parse_digest(digest)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OciError(f"{what}: descriptor {digest} has no valid size")
        if not isinstance(media_type, str):
            raise OciError(f"{what}: descriptor {digest} has an invalid mediaType")
        ann = obj.get("annotations")
        annotations = (
            {k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(ann, dict)
            else {}
        )
        return cls(media_type, digest, size, Platform.from_json(obj.get("platform")), annotations)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


def load_json(raw: bytes, what: str) -> Any:
    """Untrusted JSON (manifests, indexes, configs) with bounded structure."""
    return _json.loads(raw, what, OciError)


def detect_media_type(raw: bytes, declared: str | None) -> str:
    """The manifest media type: the declared one, else the JSON's own
    ``mediaType``, else guessed from its shape (OCI allows omitting it)."""
    if declared:
        base = declared.split(";", 1)[0].strip()
        if base in INDEX_MEDIA_TYPES or base in MANIFEST_MEDIA_TYPES or base in DOCKER_SCHEMA1:
            return base
    obj = load_json(raw, "manifest")
    if not isinstance(obj, dict):
        raise OciError("manifest: not a JSON object")
    mt = obj.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if obj.get("schemaVersion") == 1:
        return DOCKER_SCHEMA1[0]
    if "manifests" in obj:
        return OCI_INDEX
    if "layers" in obj or "config" in obj:
        return OCI_MANIFEST
    raise OciError("manifest: cannot tell whether this is an image manifest or an index")


@dataclass(frozen=True)
class ImageManifest:
    """A parsed image manifest (OCI or Docker v2 schema 2)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str | None = None

    @property
    def is_container_image(self) -> bool:
        return self.config.media_type in IMAGE_CONFIG_MEDIA_TYPES

    @classmethod
    def parse(cls, raw: bytes, media_type: str | None = None) -> ImageManifest:
        obj = load_json(raw, "manifest")
        if not isinstance(obj, dict):
            raise OciError("manifest: not a JSON object")
        mt = media_type or obj.get("mediaType") or OCI_MANIFEST
        if mt in DOCKER_SCHEMA1 or obj.get("schemaVersion") == 1:
            raise OciError("Docker schema 1 manifests are not supported")
        if obj.get("schemaVersion") != 2:
            raise OciError("manifest: schemaVersion must be 2")
        if "manifests" in obj and "layers" not in obj:
            raise OciError("manifest: expected an image manifest, got an index")
        config = Descriptor.from_json(obj.get("config"), "manifest config")
        layers_obj = obj.get("layers", [])
        if not isinstance(layers_obj, list):
            raise OciError("manifest: layers is not a list")
        layers = tuple(
            Descriptor.from_json(x, f"manifest layer {i}") for i, x in enumerate(layers_obj)
        )
        ann = obj.get("annotations")
        annotations = (
            {k: v for k, v in ann.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(ann, dict)
            else {}
        )
        at = obj.get("artifactType")
        return cls(str(mt), config, layers, annotations, at if isinstance(at, str) else None)


def parse_index(raw: bytes) -> list[Descriptor]:
    obj = load_json(raw, "index")
    if not isinstance(obj, dict) or not isinstance(obj.get("manifests"), list):
        raise OciError("index: no manifests list")
    return [Descriptor.from_json(x, f"index entry {i}") for i, x in enumerate(obj["manifests"])]


def select_platform(entries: list[Descriptor], want: Platform | None) -> Descriptor:
    """Pick the index entry for `want` (default: this host)."""
    images = [
        d
        for d in entries
        if d.media_type in MANIFEST_MEDIA_TYPES | INDEX_MEDIA_TYPES or not d.media_type
    ]
    if not images:
        raise OciError("index lists no image manifests")
    with_platform = [d for d in images if d.platform is not None]
    if not with_platform:
        if len(images) == 1:
            return images[0]
        raise OciError(
            f"index lists {len(images)} images without platforms; name one (e.g. oci:DIR:TAG)"
        )
    target = want or Platform.host()
    for strict in (True, False):
        for d in with_platform:
            assert d.platform is not None
            if target.matches(d.platform, strict_variant=strict):
                return d
        if want is not None and want.variant is not None:
            break  # an explicit variant must match exactly
    avail = ", ".join(sorted({str(d.platform) for d in with_platform}))
    raise OciError(f"no image for platform {target} (available: {avail})")


@dataclass(frozen=True)
class ResolvedImage:
    """The image manifest a reference resolved to."""

    digest: str
    raw: bytes
    media_type: str
    manifest: ImageManifest


def resolve_manifest(source: ImageSource, platform: Platform | None = None) -> ResolvedImage:
    """Fetch the manifest `source` names, walking indexes by platform."""
    raw, declared = source.get_manifest(None)
    top = getattr(source, "top_entry", None)
    if isinstance(top, Descriptor) and top.platform is not None:
        # a single image for another platform is refused too (composefs-rs)
        select_platform([top], platform)
    expected: str | None = None
    for _ in range(4):  # nested indexes are legal but never deep
        if len(raw) > MAX_JSON_SIZE:
            raise OciError("manifest is too large")
        media_type = detect_media_type(raw, declared)
        digest = digest_of(raw, expected) if expected else sha256_digest(raw)
        if expected is not None and digest != expected:
            raise DigestMismatch(f"manifest digest mismatch: expected {expected}, got {digest}")
        if media_type in INDEX_MEDIA_TYPES:
            entry = select_platform(parse_index(raw), platform)
            expected = entry.digest
            raw, declared = source.get_manifest(entry.digest)
            if not declared:
                declared = entry.media_type or None
            continue
        if media_type in DOCKER_SCHEMA1:
            raise OciError("Docker schema 1 manifests are not supported")
        return ResolvedImage(digest, raw, media_type, ImageManifest.parse(raw, media_type))
    raise OciError("index nesting is too deep")


# -- progress ---------------------------------------------------------------


@dataclass(frozen=True)
class ProgressEvent:
    """What a pull reports: ``kind`` is "started", "progress", "skipped",
    "done" or "message"; ``id`` names the component (a layer diff_id or blob
    digest); byte counts are of the blob as transferred (compressed)."""

    kind: str
    id: str = ""
    total: int | None = None
    fetched: int = 0
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


# -- the protocol --------------------------------------------------------------


@runtime_checkable
class ImageSource(Protocol):
    """One opened image reference. See the module docstring for the contract."""

    @property
    def reference(self) -> str:
        """The reference as the user wrote it (for messages and default tags)."""
        ...

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str | None]: ...

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO: ...

    def close(self) -> None: ...


class BaseSource:
    """Convenience base class: context manager on top of ``close()``."""

    # The index entry the source itself picked the top-level manifest by
    # (an OCI layout's only image), so its platform is checked as an
    # index's would be. None when there was no such choice.
    top_entry: Descriptor | None = None

    def close(self) -> None:
        pass

    def __enter__(self) -> BaseSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
