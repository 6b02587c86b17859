#!/usr/bin/env python3
"""Pack directories as the layers of an OCI image in an image layout.

    oci_from_dir.py LAYOUT TAG DIR [DIR...]

Each DIR becomes one uncompressed tar layer (GNU tar, pax format, numeric
owners, xattrs, sorted names, no atime/ctime: the same tree gives the same
layer), in order; the image is tagged TAG in
LAYOUT/index.json next to the tags already there. Standard library + tar.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile


def _put_blob(layout: str, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.rename(path + ".tmp", path)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _tar_layer(layout: str, directory: str) -> dict[str, object]:
    """Stream `directory` as a tar into a blob; its sha256 is also the diff_id."""
    names = sorted(os.listdir(directory))
    blobs = os.path.join(layout, "blobs", "sha256")
    fd, tmp = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    h = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out, subprocess.Popen(
        ["tar", "--create", "--format=pax", "--numeric-owner", "--xattrs",
         "--xattrs-include=*", "--sort=name",
         # atime/ctime would make packing the same tree twice differ
         "--pax-option=delete=atime,delete=ctime", "--file=-", "-C", directory, "--", *names],
        stdout=subprocess.PIPE,
    ) as tar:
        assert tar.stdout is not None
        while chunk := tar.stdout.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
            size += len(chunk)
    if tar.returncode != 0:
        os.unlink(tmp)
        raise SystemExit(f"oci_from_dir: tar of {directory} failed")
    os.rename(tmp, os.path.join(blobs, h.hexdigest()))
    return {"digest": f"sha256:{h.hexdigest()}", "size": size}


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    layout, tag, dirs = argv[0], argv[1], argv[2:]
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    layers = [_tar_layer(layout, d) for d in dirs]
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/sbin/init"]},
        "rootfs": {"type": "layers", "diff_ids": [str(layer["digest"]) for layer in layers]},
    }
    cfg = _put_blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}
                   for layer in layers],
    }
    man = _put_blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index_path = os.path.join(layout, "index.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except FileNotFoundError:
        index = {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", **man,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    })
    with open(index_path + ".tmp", "w") as f:
        json.dump(index, f, indent=1)
    os.rename(index_path + ".tmp", index_path)
    print(man["digest"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
