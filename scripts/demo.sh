#!/bin/sh
# The `make demo` walk-through: build a tiny OCI image layout, pull it into a
# fresh composefs repository, list and inspect it, and (as root) mount it.
#
# Needs the project's `cfsctl` on PATH (the Makefile puts the venv first).
# Everything lands in build/demo (override with DEMO_DIR=...); nothing else is
# touched, and no server is started.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
work=${DEMO_DIR:-$top/build/demo}
repo=$work/repo
image=$work/oci-image
mnt=$work/mnt

if ! command -v cfsctl >/dev/null 2>&1; then
    echo "demo: cfsctl not found on PATH (run 'make demo', or activate .venv)" >&2
    exit 1
fi
python=$(command -v python3 || command -v python)

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

cleanup() {
    if [ -n "${mounted:-}" ]; then
        umount "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
    fi
}
trap cleanup EXIT INT TERM

# Start from scratch each time (an old mount first, if a previous run died).
if [ -d "$mnt" ] && grep -qs " $mnt " /proc/mounts; then
    umount "$mnt" 2>/dev/null || umount -l "$mnt"
fi
rm -rf "$work"
mkdir -p "$work"

step "Build a small two-layer OCI image layout (no registry needed)"
run "$python" "$here/make_demo_image.py" "$image"

step "Create a composefs repository"
# This machine's kernel may lack fs-verity; --insecure makes the repository
# compute digests in userspace instead of requiring them from the kernel.
run cfsctl --repo "$repo" init --insecure

step "Pull the image: layers become splitstreams, files become objects"
run cfsctl --repo "$repo" oci pull "oci:$image:latest" demo

step "List the images in the repository"
run cfsctl --repo "$repo" oci images

step "The merged filesystem as a composefs dumpfile (layer 2 applied)"
run cfsctl --repo "$repo" oci dump demo

step "The composefs image id (fs-verity digest of the EROFS image)"
run cfsctl --repo "$repo" oci compute-id demo

step "Check the repository and the image"
run cfsctl --repo "$repo" oci fsck

step "The C-compatible tools: an image of a directory that ships in this repo"
run mkcomposefs --digest-store "$work/objects" --print-digest "$top/scripts" "$work/src.cfs"
printf '$ composefs-info ls %s | head -n 5\n' "$work/src.cfs"
composefs-info ls "$work/src.cfs" | head -n 5

if [ "$(id -u)" != 0 ]; then
    step "Mounting needs root: skipped (try: sudo cfsctl --repo $repo oci mount demo DIR)"
    exit 0
fi

step "Mount the directory image with mount.composefs and compare it with its source"
mkdir -p "$mnt"
run mount.composefs -o "basedir=$work/objects" "$work/src.cfs" "$mnt"
mounted=1
run diff -r "$top/scripts" "$mnt"
echo "identical"
run umount "$mnt"
mounted=

step "Mount the OCI image (EROFS metadata + overlayfs over the object store)"
run cfsctl --repo "$repo" oci mount demo "$mnt"
mounted=1
run ls -l "$mnt" "$mnt/usr/bin" "$mnt/etc"
run cat "$mnt/etc/motd" "$mnt/etc/os-release"
run sh "$mnt/usr/bin/hello"
run umount "$mnt"
mounted=
step "Done. Everything is in $work (remove it when you like)."
