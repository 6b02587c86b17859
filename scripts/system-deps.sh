#!/bin/sh
# Install the Debian packages composefs's tests and demo need, only when missing.
# Usage: system-deps.sh [demo]   (demo: just what `make demo` needs)
# SYSTEM_DEPS_EXTRA="PKG ...": more packages to install with them.
# Another apt or dpkg at work (unattended-upgrades, a second shell) is waited
# for, up to SYSTEM_DEPS_LOCK_TIMEOUT seconds (default 300), not failed on.
set -eu
need="${SYSTEM_DEPS_EXTRA:-}"
lock_timeout="${SYSTEM_DEPS_LOCK_TIMEOUT:-300}"
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

# apt-get waits for the dpkg locks itself when told to (DPkg::Lock::Timeout),
# but `update` fails at once on the lists lock: retry it while that is busy.
apt_update() {
    waited=0
    while :; do
        if out=$(apt-get -o DPkg::Lock::Timeout="$lock_timeout" update -qq 2>&1); then
            return 0
        fi
        case "$out" in
        *"Could not get lock"* | *"Unable to lock"* | *"Unable to acquire"*)
            if [ "$waited" -ge "$lock_timeout" ]; then
                echo "$out" >&2
                echo "system-deps: another apt is still running after ${lock_timeout}s" >&2
                return 1
            fi
            [ "$waited" = 0 ] &&
                echo "system-deps: waiting for another apt or dpkg to finish (up to ${lock_timeout}s)" >&2
            sleep 2
            waited=$((waited + 2))
            ;;
        *)
            echo "$out" >&2
            return 1
            ;;
        esac
    done
}
apt_update
# shellcheck disable=SC2086
apt-get -o DPkg::Lock::Timeout="$lock_timeout" install -y -qq --no-install-recommends $need >/dev/null
