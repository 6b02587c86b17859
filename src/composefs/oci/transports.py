"""Where images come from: the `ImageSource` protocol and the local transports.

An `ImageSource` is one opened image reference. It answers two questions:
"what is the manifest?" (raw bytes, possibly an index) and "give me blob
D as a byte stream". Everything else (platform resolution, digest checks,
decompression, storage) is shared code above it, so a new transport only
has to implement those two calls. The protocol and the image model it
serves (manifests, descriptors, platforms, `resolve_manifest`) live in
`composefs.oci.image`; the model's names stay importable from here.

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
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO, cast

from ..errors import OciError

# The image model lives in .image; these names stay importable from here.
from .image import (  # noqa: F401
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    IMAGE_CONFIG_MEDIA_TYPES,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_JSON_SIZE,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    BaseSource,
    Descriptor,
    ImageManifest,
    ImageSource,
    Platform,
    ProgressCallback,
    ProgressEvent,
    ResolvedImage,
    check_digest,
    detect_media_type,
    digest_of,
    is_tar_layer,
    layer_compression,
    load_json,
    parse_digest,
    parse_index,
    read_at_most,
    resolve_manifest,
    select_platform,
    sha256_digest,
)

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
            d = self.top_entry = entries[0]
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
    tag unless what follows contains ``/``; an empty tag stays an empty tag
    (``DIR:`` names the image tagged ""). A path that exists as a whole
    wins, so names containing ``:`` still work."""
    if os.path.exists(rest):
        return rest, None
    path, sep, tag = rest.rpartition(":")
    if not sep or "/" in tag or not path:
        return rest, None
    return path, tag


def open_source(imgref: str, registry_options: Any = None) -> ImageSource:
    """Open an image reference with its transport.

    `registry_options` (a `composefs.oci.registry.RegistryOptions`) tunes
    ``docker://`` (credentials, TLS, proxy); the other transports have no
    use for it, so passing it with them is an error rather than silently
    ignored.
    """
    if imgref.startswith("docker://"):
        # Imported here: the registry client (and urllib3) load only when used.
        from . import registry

        return registry.open_source(imgref[len("docker://") :], registry_options)
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
