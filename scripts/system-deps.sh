#!/bin/sh
# Install the Debian packages composefs's tests and demo need, only when missing.
# Usage: system-deps.sh [demo]   (demo: just what `make demo` needs)
set -eu
need=""
want() { # want COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || need="$need $2"
}
want fsck.erofs erofs-utils
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
    want unshare util-linux
    want qemu-system-x86_64 qemu-system-x86
    dpkg -s busybox-static >/dev/null 2>&1 || need="$need busybox-static"
    # make test-boot: the UKI (objcopy + systemd-boot-efi's stub), its ESP
    # (mtools, dosfstools) booted by OVMF, debugfs on the disk images.
    want objcopy binutils
    want mcopy mtools
    want mkfs.fat dosfstools
    want debugfs e2fsprogs
    [ -f /usr/lib/systemd/boot/efi/linuxx64.efi.stub ] || need="$need systemd-boot-efi"
    [ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || need="$need ovmf"
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
