"""Build OCI test images with nothing but tarfile, json and hashlib.

Stable helpers (other OCI tests import them):

- entry constructors: `file`, `directory`, `symlink`, `hardlink`, `chardev`,
  `blockdev`, `fifo`, `whiteout`, `opaque` -> `tarfile.TarInfo` + data;
- `tar_layer(entries, format=...)` -> uncompressed layer bytes;
- `compress(data, "gzip"|"zstd"|"none")`;
- `image_config(diff_ids, ...)`, `manifest(config_blob, layer_blobs, ...)`;
- `write_oci_layout(path, [ImageSpec...])` -> list of `BuiltImage`;
- `write_oci_archive(layout_dir, archive)` and `write_docker_archive(...)`;
- `write_artifact_layout(path)` -> `BuiltArtifact` (a non-image manifest);
- `run_cfsctl(capsysbinary, repo_path, *args)` -> (rc, stdout, stderr) of the
  in-process CLI, and `fields(stdout)` for its `key value` lines;
- `composefs_rs_test_layer()` and the ids `OCI_LAYOUT_V2_SHA512` /
  `OCI_LAYOUT_V1_SHA512` of composefs-rs's test OCI layout.

Everything is deterministic (fixed mtimes, sorted JSON) so digests repeat.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
MTIME = 1234567890

Member = tuple[tarfile.TarInfo, bytes | None]


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _info(
    name: str, kind: bytes, mode: int, uid: int, gid: int, mtime: int | float
) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.uid = uid
    ti.gid = gid
    ti.mtime = mtime
    ti.uname = ti.gname = ""
    return ti


def _xattrs(ti: tarfile.TarInfo, xattrs: dict[str, bytes | str] | None) -> None:
    if xattrs:
        for k, v in xattrs.items():
            # tarfile writes PAX values as UTF-8 (surrogateescape for bytes).
            val = v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v
            ti.pax_headers["SCHILY.xattr." + k] = val


def file(
    name: str,
    data: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime: int | float = MTIME,
    xattrs: dict[str, bytes | str] | None = None,
) -> Member:
    ti = _info(name, tarfile.REGTYPE, mode, uid, gid, mtime)
    ti.size = len(data)
    _xattrs(ti, xattrs)
    return ti, data


def directory(
    name: str,
    *,
    mode: int = 0o755,
    uid: int = 0,
    gid: int = 0,
    mtime: int | float = MTIME,
    xattrs: dict[str, bytes | str] | None = None,
) -> Member:
    ti = _info(name, tarfile.DIRTYPE, mode, uid, gid, mtime)
    _xattrs(ti, xattrs)
    return ti, None


def symlink(name: str, target: str, *, mtime: int | float = MTIME, uid: int = 0) -> Member:
    ti = _info(name, tarfile.SYMTYPE, 0o777, uid, 0, mtime)
    ti.linkname = target
    return ti, None


def hardlink(name: str, target: str) -> Member:
    ti = _info(name, tarfile.LNKTYPE, 0o644, 0, 0, MTIME)
    ti.linkname = target
    return ti, None


def chardev(name: str, major: int, minor: int, *, mode: int = 0o600) -> Member:
    ti = _info(name, tarfile.CHRTYPE, mode, 0, 0, MTIME)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def blockdev(name: str, major: int, minor: int, *, mode: int = 0o600) -> Member:
    ti = _info(name, tarfile.BLKTYPE, mode, 0, 0, MTIME)
    ti.devmajor, ti.devminor = major, minor
    return ti, None


def fifo(name: str, *, mode: int = 0o644) -> Member:
    return _info(name, tarfile.FIFOTYPE, mode, 0, 0, MTIME), None


def whiteout(path: str) -> Member:
    """An OCI whiteout hiding `path` of lower layers."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return file((parent + "/" if parent else "") + ".wh." + name)


def opaque(dirpath: str) -> Member:
    """An opaque marker for directory `dirpath`."""
    return file(dirpath.rstrip("/") + "/.wh..wh..opq")


def tar_layer(entries: list[Member], *, format: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as t:
        for ti, data in entries:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, compression: str) -> bytes:
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        try:
            from compression import zstd  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            from backports import zstd
        return zstd.compress(data)
    raise ValueError(compression)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def image_config(
    diff_ids: list[str], *, architecture: str = "amd64", os_name: str = "linux", **extra: Any
) -> bytes:
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "os": os_name,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "created": "2009-02-13T23:31:30Z",
    }
    cfg.update(extra)
    return dumps(cfg)


@dataclass
class ImageSpec:
    """One image of a layout: layers (uncompressed tars) and how to store them."""

    layers: list[bytes]
    compression: str | list[str] = "gzip"
    tag: str | None = "latest"
    architecture: str = "amd64"
    os_name: str = "linux"
    variant: str | None = None
    config_extra: dict[str, Any] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass
class BuiltImage:
    manifest_digest: str
    manifest: bytes
    config_digest: str
    config: bytes
    diff_ids: list[str]
    layer_digests: list[str]
    descriptor: dict[str, Any]


def _write_blob(layout: Path, data: bytes) -> str:
    digest = sha256(data)
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def build_image(layout: Path, spec: ImageSpec) -> BuiltImage:
    comps = (
        spec.compression
        if isinstance(spec.compression, list)
        else [spec.compression] * len(spec.layers)
    )
    diff_ids = [sha256(tar) for tar in spec.layers]
    layer_descs = []
    for tar, comp in zip(spec.layers, comps, strict=True):
        blob = compress(tar, comp)
        layer_descs.append(
            {
                "mediaType": LAYER_MEDIA_TYPES[comp],
                "digest": _write_blob(layout, blob),
                "size": len(blob),
            }
        )
    config = image_config(
        diff_ids, architecture=spec.architecture, os_name=spec.os_name, **spec.config_extra
    )
    config_digest = _write_blob(layout, config)
    manifest_obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": layer_descs,
    }
    if spec.annotations:
        manifest_obj["annotations"] = spec.annotations
    manifest = dumps(manifest_obj)
    manifest_digest = _write_blob(layout, manifest)
    platform: dict[str, str] = {"architecture": spec.architecture, "os": spec.os_name}
    if spec.variant:
        platform["variant"] = spec.variant
    desc: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": manifest_digest,
        "size": len(manifest),
        "platform": platform,
    }
    if spec.tag:
        desc["annotations"] = {"org.opencontainers.image.ref.name": spec.tag}
    return BuiltImage(
        manifest_digest, manifest, config_digest, config, diff_ids,
        [d["digest"] for d in layer_descs], desc,
    )  # fmt: skip


def write_oci_layout(path: str | os.PathLike[str], images: list[ImageSpec]) -> list[BuiltImage]:
    """An OCI image layout directory whose index lists every image."""
    layout = Path(path)
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_bytes(dumps({"imageLayoutVersion": "1.0.0"}))
    built = [build_image(layout, spec) for spec in images]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [b.descriptor for b in built]}
    (layout / "index.json").write_bytes(dumps(index))
    return built


def write_oci_archive(layout_dir: str | os.PathLike[str], archive: str | os.PathLike[str]) -> None:
    """Tar up a layout the way skopeo's oci-archive does (plain tar)."""
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as t:
        for root, dirs, files in os.walk(layout_dir):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(root, name)
                t.add(full, arcname=os.path.relpath(full, layout_dir))


def write_docker_archive(
    archive: str | os.PathLike[str],
    layers: list[bytes],
    *,
    repo_tags: list[str] | None = None,
    architecture: str = "amd64",
) -> tuple[str, list[str]]:
    """A `docker save` archive (legacy layout: <id>/layer.tar); returns
    (config digest, diff_ids)."""
    diff_ids = [sha256(tar) for tar in layers]
    config = image_config(diff_ids, architecture=architecture)
    config_name = sha256(config).split(":", 1)[1] + ".json"
    names = []
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as t:

        def add(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = MTIME
            t.addfile(ti, io.BytesIO(data))

        add(config_name, config)
        for tar in layers:
            layer_id = hashlib.sha256(tar + b"id").hexdigest()
            names.append(f"{layer_id}/layer.tar")
            add(f"{layer_id}/layer.tar", tar)
        add(
            "manifest.json",
            dumps([{"Config": config_name, "RepoTags": repo_tags or [], "Layers": names}]),
        )
    return sha256(config), diff_ids


@dataclass
class BuiltArtifact:
    payload: bytes
    blob: str  # digest of the one layer (the payload)
    config: str  # digest of the empty config
    manifest_digest: str


def write_artifact_layout(path: Path, payload: bytes = b"signature bytes" * 10) -> BuiltArtifact:
    """An OCI layout whose only manifest is an artifact (artifactType
    application/x-test, empty config, one application/x-sig layer)."""
    path.mkdir()
    (path / "oci-layout").write_bytes(dumps({"imageLayoutVersion": "1.0.0"}))
    blob = _write_blob(path, payload)
    config = _write_blob(path, b"{}")
    raw = dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/x-test",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/x-sig", "digest": blob, "size": len(payload)}],
    })  # fmt: skip
    mdigest = _write_blob(path, raw)
    (path / "index.json").write_bytes(
        dumps({"schemaVersion": 2, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": mdigest, "size": len(raw)}
        ]})
    )  # fmt: skip
    return BuiltArtifact(payload, blob, config, mdigest)


def run_cfsctl(capsysbinary: Any, repo_path: str, *args: str) -> tuple[int, str, str]:
    """`cfsctl --repo REPO ARGS...` in this process: (exit code, stdout, stderr)."""
    from composefs.cli import cfsctl

    capsysbinary.readouterr()
    try:
        rc = cfsctl.main(["--repo", repo_path, *args])
    except SystemExit as e:
        rc = int(e.code or 0)
    out, err = capsysbinary.readouterr()
    return rc, out.decode(), err.decode()


def fields(out: str) -> dict[str, str]:
    """The `key value` lines of a cfsctl report."""
    return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


# composefs-rs `create_oci_layout()`: its one layer and the fs-verity ids
# (sha512) of the V2 and V1 images it gives.
OCI_LAYOUT_V2_SHA512 = (
    "f7684c21050615c02cec250e0c7d4118fb0ff6340af5039e06f2f372a7614fff25dfd38cf7f28ad67"
    "d8b86e86371b7deafa9ae4bf543630322aee6196417de92"
)
OCI_LAYOUT_V1_SHA512 = (
    "d06f1f6a73f62ed48e05ce9442ff045cdf2a9f5ba1ec623795de3d6177a253d9"
    "1076459795d94f55d8c3d71dab458bb3fc0071255a50c0a4896d86ffdc870b9a"
)


def composefs_rs_test_layer() -> bytes:
    """The layer of composefs-rs's `create_oci_layout()` (GNU headers)."""
    return tar_layer(
        [
            directory("usr/"),
            file("hello.txt", b"hello from test layer\n"),
            hardlink("hello-link.txt", "hello.txt"),
        ],
        format=tarfile.GNU_FORMAT,
    )
