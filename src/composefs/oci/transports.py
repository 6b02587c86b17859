"""Where images come from: the `ImageSource` protocol and the local transports.

An `ImageSource` is one opened image reference. It answers two questions:
"what is the manifest?" (raw bytes, possibly an index) and "give me blob
D as a byte stream". Everything else (platform resolution, digest checks,
decompression, storage) is shared code above it, so a new transport only
has to implement those two calls.

Transports here (no network): ``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``,
``docker-archive:FILE[:REPO:TAG|:@N]`` and ``containers-storage:REF`` (via
skopeo). ``docker://`` is `composefs.oci.registry` (a native registry
client), reached through `open_source` like the others.

Contract for implementers (the registry client follows it too):
- ``get_manifest(None)`` returns the manifest the reference names: an image
  manifest or an index/manifest list. ``get_manifest(digest)`` returns the
  manifest with that digest (an entry of an index). Both return
  ``(raw_bytes, media_type_or_None)``; raw bytes are exactly what was stored
  or served, since the manifest digest is the sha256 of those bytes.
  If the reference itself pins a digest, the source checks it.
- ``open_blob(digest, size)`` returns a readable binary stream of the blob
  as stored (compressed layers stay compressed). The caller verifies the
  digest and size while reading; the source may check too.
- ``close()`` releases whatever the source holds (files, temp dirs,
  connections). Sources are also context managers.
- Failures raise `errors.OciError` (or a subclass) with a one-line message.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform as _platform
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol, cast, runtime_checkable

from ..errors import OciError

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
    from ..errors import DigestMismatch

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
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise OciError(f"{what}: invalid JSON: {e}") from None


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
    expected: str | None = None
    for _ in range(4):  # nested indexes are legal but never deep
        if len(raw) > MAX_JSON_SIZE:
            raise OciError("manifest is too large")
        media_type = detect_media_type(raw, declared)
        digest = digest_of(raw, expected) if expected else sha256_digest(raw)
        if expected is not None and digest != expected:
            from ..errors import DigestMismatch

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

    def close(self) -> None:
        pass

    def __enter__(self) -> BaseSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- OCI image layouts (directory and tar archive) ---------------------------------

_REF_NAME = "org.opencontainers.image.ref.name"


class _LayoutSource(BaseSource):
    """Shared logic of ``oci:`` and ``oci-archive:``: index.json -> manifest."""

    def __init__(self, reference: str, tag: str | None) -> None:
        self._reference = reference
        self._tag = tag

    @property
    def reference(self) -> str:
        return self._reference

    # storage access, implemented by subclasses
    def _open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def _read_small(self, name: str) -> bytes:
        with self._open(name) as f:
            data = read_at_most(f, MAX_JSON_SIZE + 1)
        if len(data) > MAX_JSON_SIZE:
            raise OciError(f"{self._reference}: {name} is too large")
        return data

    def _check_layout(self) -> None:
        try:
            obj = load_json(self._read_small("oci-layout"), "oci-layout")
        except FileNotFoundError:
            raise OciError(
                f"{self._reference}: not an OCI image layout (no oci-layout file)"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("imageLayoutVersion"), str):
            raise OciError(f"{self._reference}: invalid oci-layout file")

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str | None]:
        if digest is not None:
            return self._read_blob_small(digest), None
        try:
            index_raw = self._read_small("index.json")
        except FileNotFoundError:
            raise OciError(f"{self._reference}: no index.json") from None
        entries = parse_index(index_raw)
        if self._tag is not None:
            tagged = [d for d in entries if d.annotations.get(_REF_NAME) == self._tag]
            if not tagged:
                names = sorted(
                    {d.annotations[_REF_NAME] for d in entries if _REF_NAME in d.annotations}
                )
                hint = f" (tags: {', '.join(names)})" if names else ""
                raise OciError(f"{self._reference}: no image tagged {self._tag!r}{hint}")
            entries = tagged
        if len(entries) == 1:
            d = entries[0]
            return self._read_blob_small(d.digest), d.media_type or None
        if not entries:
            raise OciError(f"{self._reference}: index.json lists no images")
        # Several candidates: hand back an index of them and let platform
        # resolution choose (it explains the choices when it cannot).
        synthetic = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {**d.to_json(), **({"platform": _platform_json(d.platform)} if d.platform else {})}
                for d in entries
            ],
        }
        return json.dumps(synthetic).encode(), OCI_INDEX

    def _blob_name(self, digest: str) -> str:
        alg, hexpart = parse_digest(digest)
        return f"blobs/{alg}/{hexpart}"

    def _read_blob_small(self, digest: str) -> bytes:
        try:
            data = self._read_small(self._blob_name(digest))
        except FileNotFoundError:
            raise OciError(f"{self._reference}: blob {digest} is missing") from None
        check_digest(data, digest, f"{self._reference}: blob")
        return data

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        try:
            return self._open(self._blob_name(digest))
        except FileNotFoundError:
            raise OciError(f"{self._reference}: blob {digest} is missing") from None


def _platform_json(p: Platform | None) -> dict[str, str]:
    if p is None:
        return {}
    out = {"os": p.os, "architecture": p.architecture}
    if p.variant:
        out["variant"] = p.variant
    return out


class OciLayoutSource(_LayoutSource):
    """``oci:DIR[:TAG]``: an OCI image layout directory."""

    def __init__(self, path: str, tag: str | None = None, reference: str | None = None) -> None:
        super().__init__(reference or f"oci:{path}", tag)
        self._path = path
        if not os.path.isdir(path):
            raise OciError(f"{self._reference}: no such directory")
        self._check_layout()

    def _open(self, name: str) -> BinaryIO:
        full = os.path.join(self._path, name)
        # Blobs must be regular files inside the layout, not devices/FIFOs.
        fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            import stat

            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OciError(f"{self._reference}: {name} is not a regular file")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise


class _TarMembers:
    """Read members of a tar archive by name without extracting it."""

    def __init__(self, path: str, what: str) -> None:
        self._what = what
        try:
            self._tar = tarfile.open(path, "r:*")
        except FileNotFoundError:
            raise
        except (tarfile.TarError, EOFError, OSError) as e:
            raise OciError(f"{what}: not a readable tar archive: {e}") from None
        self._members: dict[str, tarfile.TarInfo] = {}
        try:
            for m in self._tar:
                # Last wins, like extraction would; names normalised.
                self._members[_norm_member(m.name)] = m
        except (tarfile.TarError, EOFError, OSError) as e:
            self._tar.close()
            raise OciError(f"{what}: corrupt tar archive: {e}") from None

    def names(self) -> list[str]:
        return list(self._members)

    def open(self, name: str) -> BinaryIO:
        m = self._members.get(_norm_member(name))
        if m is None:
            raise FileNotFoundError(name)
        try:
            f = self._tar.extractfile(m)
        except (tarfile.TarError, KeyError) as e:
            raise OciError(f"{self._what}: cannot read {name}: {e}") from None
        if f is None:
            raise OciError(f"{self._what}: {name} is not a regular file")
        return cast(BinaryIO, f)

    def close(self) -> None:
        self._tar.close()


def _norm_member(name: str) -> str:
    parts = [p for p in name.split("/") if p and p != "."]
    return "/".join(parts)


class OciArchiveSource(_LayoutSource):
    """``oci-archive:FILE[:TAG]``: a tar of an OCI image layout, read in place."""

    def __init__(self, path: str, tag: str | None = None, reference: str | None = None) -> None:
        super().__init__(reference or f"oci-archive:{path}", tag)
        try:
            self._tar = _TarMembers(path, self._reference)
        except FileNotFoundError:
            raise OciError(f"{self._reference}: no such file") from None
        try:
            self._check_layout()
        except BaseException:
            self._tar.close()
            raise

    def _open(self, name: str) -> BinaryIO:
        return self._tar.open(name)

    def close(self) -> None:
        self._tar.close()


# -- docker save archives -----------------------------------------------------------


class DockerArchiveSource(BaseSource):
    """``docker-archive:FILE[:REPO:TAG|:@N]``: the `docker save` format.

    The archive has no registry manifest, so one is synthesised (an OCI
    image manifest with compact JSON): the config digest is the sha256 of
    the config file, a layer's digest is its blob name when the archive
    stores blobs by digest (Docker >= 25), else its diff_id when the layer
    is an uncompressed tar (then they are equal), else the hash of the file.
    The manifest digest is therefore ours, not skopeo's; image ids do not
    depend on it.
    """

    def __init__(
        self, path: str, selector: str | None = None, reference: str | None = None
    ) -> None:
        self._reference = reference or f"docker-archive:{path}"
        try:
            self._tar = _TarMembers(path, self._reference)
        except FileNotFoundError:
            raise OciError(f"{self._reference}: no such file") from None
        try:
            self._blobs: dict[str, str] = {}
            self._manifest = self._synthesise(selector)
        except BaseException:
            self._tar.close()
            raise

    @property
    def reference(self) -> str:
        return self._reference

    def _read_small(self, name: str) -> bytes:
        with self._tar.open(name) as f:
            data = read_at_most(f, MAX_JSON_SIZE + 1)
        if len(data) > MAX_JSON_SIZE:
            raise OciError(f"{self._reference}: {name} is too large")
        return data

    def _synthesise(self, selector: str | None) -> bytes:
        try:
            entries = load_json(
                self._read_small("manifest.json"), f"{self._reference}: manifest.json"
            )
        except FileNotFoundError:
            raise OciError(f"{self._reference}: not a docker archive (no manifest.json)") from None
        if (
            not isinstance(entries, list)
            or not entries
            or not all(isinstance(e, dict) for e in entries)
        ):
            raise OciError(f"{self._reference}: manifest.json lists no images")
        entry = self._select(entries, selector)
        config_name = entry.get("Config")
        layer_names = entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(layer_names, list):
            raise OciError(f"{self._reference}: manifest.json entry lacks Config or Layers")
        try:
            config_raw = self._read_small(config_name)
        except FileNotFoundError:
            raise OciError(f"{self._reference}: config {config_name} is missing") from None
        config_digest = sha256_digest(config_raw)
        self._blobs[config_digest] = config_name
        config = load_json(config_raw, f"{self._reference}: config")
        diff_ids: list[Any] = []
        if isinstance(config, dict) and isinstance(config.get("rootfs"), dict):
            d = config["rootfs"].get("diff_ids")
            diff_ids = d if isinstance(d, list) else []
        layers = []
        for i, name in enumerate(layer_names):
            if not isinstance(name, str):
                raise OciError(f"{self._reference}: invalid layer name in manifest.json")
            layers.append(self._layer_descriptor(name, diff_ids[i] if i < len(diff_ids) else None))
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
            "layers": layers,
        }
        return json.dumps(manifest, separators=(",", ":")).encode()

    def _select(self, entries: list[dict[str, Any]], selector: str | None) -> dict[str, Any]:
        if selector is None:
            if len(entries) > 1:
                raise OciError(
                    f"{self._reference}: archive holds {len(entries)} images; "
                    "name one (docker-archive:FILE:REPO:TAG or :@N)"
                )
            return entries[0]
        if selector.startswith("@"):
            try:
                n = int(selector[1:])
            except ValueError:
                raise OciError(f"{self._reference}: invalid image index {selector!r}") from None
            if not 0 <= n < len(entries):
                raise OciError(f"{self._reference}: no image @{n} (archive holds {len(entries)})")
            return entries[n]
        wanted = {selector, _docker_normalize(selector)}
        for e in entries:
            tags = e.get("RepoTags") or []
            if isinstance(tags, list) and any(
                isinstance(t, str) and (t in wanted or _docker_normalize(t) in wanted) for t in tags
            ):
                return e
        raise OciError(f"{self._reference}: no image tagged {selector!r}")

    def _layer_descriptor(self, name: str, diff_id: Any) -> dict[str, Any]:
        try:
            f = self._tar.open(name)
        except FileNotFoundError:
            raise OciError(f"{self._reference}: layer {name} is missing") from None
        with f:
            magic = f.read(4)
        compression = (
            "gzip"
            if magic[:2] == b"\x1f\x8b"
            else "zstd"
            if magic == b"\x28\xb5\x2f\xfd"
            else "none"
        )
        media_type = {
            "none": "application/vnd.oci.image.layer.v1.tar",
            "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
            "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
        }[compression]
        parts = _norm_member(name).split("/")
        digest: str | None = None
        if len(parts) == 3 and parts[0] == "blobs":
            candidate = f"{parts[1]}:{parts[2]}"
            try:
                parse_digest(candidate)
                digest = candidate
            except OciError:
                digest = None
        if digest is None and compression == "none" and isinstance(diff_id, str):
            parse_digest(diff_id)
            digest = diff_id
        size = 0
        if digest is None:
            h = hashlib.sha256()
            with self._tar.open(name) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            digest = "sha256:" + h.hexdigest()
        else:
            size = self._member_size(name)
        self._blobs[digest] = name
        return {"mediaType": media_type, "digest": digest, "size": size}

    def _member_size(self, name: str) -> int:
        with self._tar.open(name) as f:
            f.seek(0, io.SEEK_END)
            return f.tell()

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str | None]:
        if digest is not None and digest != sha256_digest(self._manifest):
            raise OciError(f"{self._reference}: no manifest {digest}")
        return self._manifest, OCI_MANIFEST

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        name = self._blobs.get(digest)
        if name is None:
            raise OciError(f"{self._reference}: blob {digest} is missing")
        return self._tar.open(name)

    def close(self) -> None:
        self._tar.close()


def _docker_normalize(ref: str) -> str:
    """Docker's reference normalisation: ``demo:v1`` is
    ``docker.io/library/demo:v1``; a missing tag is ``latest``."""
    name, at, digest = ref.partition("@")
    last = name.rsplit("/", 1)[-1]
    if not at and ":" not in last:
        name += ":latest"
    first, slash, _rest = name.partition("/")
    if not slash:
        name = "docker.io/library/" + name
    elif "." not in first and ":" not in first and first != "localhost":
        name = "docker.io/" + name
    return name + at + digest


# -- containers-storage via skopeo -----------------------------------------------


class ContainersStorageSource(OciLayoutSource):
    """``containers-storage:REF``: copied out by ``skopeo copy`` into a
    temporary OCI layout, then read like ``oci:``."""

    def __init__(self, ref: str, reference: str | None = None) -> None:
        skopeo = shutil.which("skopeo")
        full = reference or f"containers-storage:{ref}"
        if skopeo is None:
            raise OciError(f"{full}: needs skopeo, which is not installed (apt-get install skopeo)")
        self._tmp = tempfile.mkdtemp(prefix="cfs-cstor-")
        try:
            dest = os.path.join(self._tmp, "layout")
            proc = subprocess.run(
                [skopeo, "copy", "--quiet", f"containers-storage:{ref}", f"oci:{dest}:image"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
            )
            if proc.returncode != 0:
                msg = proc.stderr.decode(errors="replace").strip().splitlines()
                raise OciError(f"{full}: skopeo copy failed: {msg[-1] if msg else proc.returncode}")
            super().__init__(dest, "image", reference=full)
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise

    def close(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


# -- reference parsing ----------------------------------------------------------------

TRANSPORTS = ("oci:", "oci-archive:", "docker-archive:", "containers-storage:", "docker://")


def split_path_tag(rest: str) -> tuple[str, str | None]:
    """``PATH[:TAG]`` the way composefs-rs splits it: the last ``:`` starts a
    tag unless what follows contains ``/``. A path that exists as a whole
    wins, so names containing ``:`` still work."""
    if os.path.exists(rest):
        return rest, None
    path, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag or not path:
        return rest, None
    return path, tag or None


def open_source(imgref: str, registry_options: Any = None) -> ImageSource:
    """Open an image reference with its transport.

    `registry_options` (a `composefs.oci.registry.RegistryOptions`) tunes
    ``docker://`` (credentials, TLS, proxy); the other transports have no
    use for it, so passing it with them is an error rather than silently
    ignored.
    """
    if imgref.startswith("docker://"):
        import importlib

        # The native registry client; looked up by name so this module does
        # not depend on it at import time.
        registry = importlib.import_module(".registry", __package__)
        opener = getattr(registry, "open_source", None)
        if opener is None:
            raise OciError("docker:// is not available in this build")
        return cast(ImageSource, opener(imgref[len("docker://") :], registry_options))
    if registry_options is not None:
        raise OciError(
            f"registry options (credentials, TLS, proxy) apply only to docker:// images, "
            f"not {imgref[:150]!r}"
        )
    transport, sep, rest = imgref.partition(":")
    if not sep or not rest:
        raise OciError(
            f"invalid image reference {imgref!r}: expected TRANSPORT:NAME ({', '.join(TRANSPORTS)})"
        )
    if transport == "oci":
        path, tag = split_path_tag(rest)
        return OciLayoutSource(path, tag, reference=imgref)
    if transport == "oci-archive":
        path, tag = split_path_tag(rest)
        return OciArchiveSource(path, tag, reference=imgref)
    if transport == "docker-archive":
        # docker-archive:PATH[:REPO:TAG] -- the path is up to the first ':'
        # unless the whole thing names a file.
        if os.path.exists(rest):
            return DockerArchiveSource(rest, None, reference=imgref)
        path, sep, selector = rest.partition(":")
        return DockerArchiveSource(path, selector if sep and selector else None, reference=imgref)
    if transport == "containers-storage":
        return ContainersStorageSource(rest, reference=imgref)
    raise OciError(
        f"unsupported transport {transport!r} in {imgref!r} (use {', '.join(TRANSPORTS)})"
    )


def iter_blob(f: BinaryIO, chunk: int = 1 << 20) -> Iterator[bytes]:
    while data := f.read(chunk):
        yield data
