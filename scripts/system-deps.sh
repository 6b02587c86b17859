#!/bin/sh
# Install the Debian packages composefs's tests and demo need, only when missing.
# Usage: system-deps.sh [demo]   (demo: just what `make demo` needs)
set -eu
need=""
want() { # want COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || need="$need $2"
}
want fsck.erofs erofs-utils
# FUSE mounts by unprivileged users (composefs-fuse, cfsctl mount --fuse)
want fusermount3 fuse3
if [ "${1:-}" != demo ]; then
    want fsverity fsverity
    want mkfs.ext4 e2fsprogs
    want docker-registry docker-registry
    want skopeo skopeo
    want umoci umoci
    want htpasswd apache2-utils
    want openssl openssl
    want debootstrap debootstrap  # bench: a Debian minbase image to pull
    want zstd zstd
    want nginx nginx  # tests/http: serves published repositories
    want wget wget  # bench: wget --mirror of a published tree
    want unshare util-linux
    want systemd-socket-activate systemd  # varlink socket-activation tests
    want capsh libcap2-bin  # C's test-random-fuse.sh looks for FUSE with it
    want qemu-system-x86_64 qemu-system-x86
    want meson meson            # bench: builds C composefs 1.0.8 as the same-run reference
    want ninja ninja-build
    [ -x /usr/bin/time ] || need="$need time"  # bench: a child's own peak RSS
    dpkg -s libssl-dev >/dev/null 2>&1 || need="$need libssl-dev"
    dpkg -s busybox-static >/dev/null 2>&1 || need="$need busybox-static"
fi
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "system-deps: missing packages:$need (run as root to install them)" >&2
    exit 0
fi
echo "system-deps: installing$need" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $need >/dev/null
