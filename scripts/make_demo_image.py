#!/usr/bin/env python3
"""Write a tiny two-layer OCI image layout for the demo (standard library only).

    make_demo_image.py DIR        -> DIR is an OCI image layout, tag "latest"

Layer 1 is a miniature /usr-merged system; layer 2 changes it the way a
derived image would (a new file, a changed file, a whiteout). Everything is
deterministic, so the image (and its composefs image id) never changes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

MTIME = 1700000000

HELLO = b"""#!/bin/sh
echo "Hello from a composefs image!"
echo "Every file you see here is named by its fs-verity digest."
"""
README = b"""composefs demo image
====================

This small image was built by scripts/make_demo_image.py as an OCI image
layout with two layers. `cfsctl oci pull` stored its layers as splitstreams,
its file contents as content-addressed objects, and committed an EROFS
metadata image; `cfsctl oci mount` overlays that image on the object store.
"""
OS_RELEASE = b'NAME="composefs demo"\nID=cfsdemo\nVERSION_ID=1\n'


def _entry(
    name: str, kind: bytes, mode: int, data: bytes = b"", link: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.mtime = MTIME
    ti.uname = ti.gname = ""
    ti.linkname = link
    if kind == tarfile.REGTYPE:
        ti.size = len(data)
        return ti, data
    return ti, None


def _tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for ti, data in entries:
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def layers() -> list[bytes]:
    d, f, s = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
    base = _tar(
        [
            _entry("usr/", d, 0o755),
            _entry("usr/bin/", d, 0o755),
            _entry("usr/bin/hello", f, 0o755, HELLO),
            _entry("usr/lib/", d, 0o755),
            _entry("usr/lib/os-release", f, 0o644, OS_RELEASE),
            _entry("usr/share/", d, 0o755),
            _entry("usr/share/doc/", d, 0o755),
            _entry("usr/share/doc/README", f, 0o644, README),
            _entry("bin", s, 0o777, link="usr/bin"),
            _entry("etc/", d, 0o755),
            _entry("etc/os-release", s, 0o777, link="../usr/lib/os-release"),
            _entry("etc/hostname", f, 0o644, b"base\n"),
            _entry("etc/obsolete.conf", f, 0o644, b"removed by layer 2\n"),
        ]
    )
    derived = _tar(
        [
            _entry("etc/hostname", f, 0o644, b"composefs-demo\n"),
            _entry("etc/motd", f, 0o644, b"Welcome to the composefs demo image.\n"),
            _entry("etc/.wh.obsolete.conf", f, 0o644),
        ]
    )
    return [base, derived]


def _blob(layout: str, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as out:
        out.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_layout(layout: str) -> str:
    tars = layers()
    diff_ids = ["sha256:" + hashlib.sha256(t).hexdigest() for t in tars]
    layer_descs = [
        {
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            **_blob(layout, gzip.compress(t, mtime=0)),
        }
        for t in tars
    ]
    config = _json(
        {
            "architecture": "amd64",
            "os": "linux",
            "created": "2023-11-14T22:13:20Z",
            "config": {"Cmd": ["/usr/bin/hello"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    )
    manifest = _json(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                **_blob(layout, config),
            },
            "layers": layer_descs,
        }
    )
    mdesc = _blob(layout, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **mdesc,
                "annotations": {"org.opencontainers.image.ref.name": "latest"},
            }
        ],
    }
    with open(os.path.join(layout, "index.json"), "wb") as f:
        f.write(_json(index))
    with open(os.path.join(layout, "oci-layout"), "wb") as f:
        f.write(_json({"imageLayoutVersion": "1.0.0"}))
    return str(mdesc["digest"])


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: make_demo_image.py DIR\n")
        return 2
    os.makedirs(argv[0], exist_ok=True)
    digest = write_layout(argv[0])
    print(f"wrote OCI image layout {argv[0]} (manifest {digest})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
