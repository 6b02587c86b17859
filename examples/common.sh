# Shared steps of examples/bls/build.sh and examples/uki/build.sh (sourced).
#
# Builds a Debian bookworm root (systemd, python3, the bookworm-backports
# kernel, which has fs-verity) with composefs and its initramfs-tools hook
# installed, packs it as an OCI image layout and stores it in a composefs
# repository on an ext4 (-O verity) root filesystem image.
# Needs root, debootstrap, e2fsprogs, python3 and network access to the
# Debian mirror apt uses. Caches under ${XDG_CACHE_HOME:-~/.cache}/composefs-py/boot.
set -euo pipefail

CFS_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CFS_CACHE=${COMPOSEFS_BOOT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/composefs-py/boot}
CFS_PYTHON=${CFS_PYTHON:-$CFS_SRC/.venv/bin/python}
SUITE=bookworm
MIRROR=${MIRROR:-$(apt-cache policy | awk '$3 ~ /^bookworm\/main$/ && $2 ~ /^https?:/ {print $2; exit}')}
# What the OS image is made of (changing this list rebuilds the base root).
BASE_PACKAGES=systemd,systemd-sysv,udev,kmod,initramfs-tools,zstd,python3,e2fsprogs,procps
KERNEL_PACKAGE=linux-image-amd64   # from bookworm-backports (6.12: fs-verity, overlay verity=)

say() { echo "example: $*" >&2; }
die() { echo "example: error: $*" >&2; exit 1; }
cfsctl() { "$CFS_PYTHON" -m composefs.cli.cfsctl "$@"; }

# chroot with /proc, /sys, /dev for maintainer scripts and update-initramfs.
in_chroot() {
    local root=$1; shift
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys"; mount --make-rslave "$root/sys"
    mount --rbind /dev "$root/dev"; mount --make-rslave "$root/dev"
    local rc=0
    LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive chroot "$root" "$@" || rc=$?
    umount -R "$root/dev" "$root/sys" "$root/proc"
    return $rc
}

# base_rootfs: debootstrap + backports kernel, once (cached by the inputs).
# Prints the directory.
base_rootfs() {
    local key dir tmp
    key=$(printf '%s\n' "$SUITE" "$MIRROR" "$BASE_PACKAGES" "$KERNEL_PACKAGE" v1 | sha256sum | cut -c1-16)
    dir=$CFS_CACHE/base-$key
    if [ -f "$dir/.complete" ]; then echo "$dir"; return; fi
    [ -n "$MIRROR" ] || die "no bookworm mirror in \`apt-cache policy\`"
    mkdir -p "$CFS_CACHE"
    tmp=$CFS_CACHE/.base-tmp-$$
    rm -rf "$tmp"
    say "debootstrap $SUITE ($BASE_PACKAGES) from $MIRROR"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$tmp" "$MIRROR" >"$CFS_CACHE/debootstrap.log" 2>&1 \
        || die "debootstrap failed, see $CFS_CACHE/debootstrap.log"
    echo "deb $MIRROR $SUITE-backports main" > "$tmp/etc/apt/sources.list.d/backports.list"
    say "installing $KERNEL_PACKAGE from $SUITE-backports"
    in_chroot "$tmp" sh -c "apt-get -q update && apt-get -q install -y --no-install-recommends -t $SUITE-backports $KERNEL_PACKAGE && apt-get clean" \
        >>"$CFS_CACHE/debootstrap.log" 2>&1 || die "kernel install failed, see $CFS_CACHE/debootstrap.log"
    rm -rf "$tmp"/var/lib/apt/lists/* "$tmp"/boot/initrd.img-*
    touch "$tmp/.complete"
    rm -rf "$dir"; mv "$tmp" "$dir"
    echo "$dir"
}

# python_deps: composefs's runtime dependencies as CPython 3.11 wheels
# (bookworm's python3) unpacked into a directory, once. Prints it.
python_deps() {
    local reqs key dir
    reqs=$("$CFS_PYTHON" -m pip freeze 2>/dev/null | grep -iE '^(xxhash|backports[._-]zstd|isal|urllib3)==' | sort)
    [ "$(echo "$reqs" | wc -l)" = 4 ] || die "cannot find composefs's dependencies in $CFS_PYTHON's environment (make venv)"
    key=$(echo "$reqs" | sha256sum | cut -c1-16)
    dir=$CFS_CACHE/pydeps-$key
    if [ ! -f "$dir/.complete" ]; then
        rm -rf "$dir"
        # shellcheck disable=SC2086
        "$CFS_PYTHON" -m pip install -q --no-warn-script-location --no-deps --no-compile --only-binary=:all: \
            --python-version 3.11 --implementation cp --platform manylinux2014_x86_64 \
            --platform manylinux_2_28_x86_64 --target "$dir" $reqs >&2 || die "pip install of $reqs failed"
        rm -rf "$dir"/bin "$dir"/*.dist-info
        touch "$dir/.complete"
    fi
    echo "$dir"
}

# os_tree DEST [VERSION]: the OS root, from the base: composefs (package,
# tools, initramfs-tools hook), the boot checks' unit, /sysroot, and an
# initramfs made by update-initramfs in the chroot; the kernel and
# initramfs go to /usr/lib/modules/<kver>/{vmlinuz,initramfs.img}, where
# `cfsctl oci prepare-boot` finds them (/boot is left out of the image).
os_tree() {
    local dest=$1 version=${2:-1} base deps kver
    base=$(base_rootfs)
    deps=$(python_deps)
    rm -rf "$dest"
    cp -a "$base" "$dest"
    rm -f "$dest/.complete"
    local py=$dest/usr/lib/composefs/python
    mkdir -p "$py"
    cp -a "$deps"/. "$py"/; rm -f "$py/.complete"
    (cd "$CFS_SRC/src" && find composefs -name '*.py' -o -name py.typed) | while read -r f; do
        install -D -m 644 "$CFS_SRC/src/$f" "$py/$f"
    done
    install -m 755 "$CFS_SRC/dist/bin/composefs-setup-root" "$dest/usr/sbin/composefs-setup-root"
    install -m 755 "$CFS_SRC/dist/bin/cfsctl" "$dest/usr/bin/cfsctl"
    install -m 755 "$CFS_SRC/dist/bin/composefs-initrd-python" "$dest/usr/lib/composefs/composefs-initrd-python"
    install -m 755 "$CFS_SRC/dist/initramfs-tools/hooks/composefs" "$dest/usr/share/initramfs-tools/hooks/composefs"
    install -D -m 755 "$CFS_SRC/dist/initramfs-tools/scripts/local-bottom/composefs" \
        "$dest/usr/share/initramfs-tools/scripts/local-bottom/composefs"
    mkdir -p "$dest/usr/lib/dracut/modules.d"
    cp -a "$CFS_SRC/dist/dracut/95composefs" "$dest/usr/lib/dracut/modules.d/"
    install -D -m 755 "$CFS_SRC/tests/boot/guest/cfs-boot-test" "$dest/usr/local/sbin/cfs-boot-test"
    install -m 644 "$CFS_SRC/tests/boot/guest/cfs-boot-test.service" "$dest/etc/systemd/system/"
    mkdir -p "$dest/etc/systemd/system/multi-user.target.wants"
    ln -sf ../cfs-boot-test.service "$dest/etc/systemd/system/multi-user.target.wants/"
    mkdir -p "$dest/sysroot"
    echo cfs-debian > "$dest/etc/hostname"
    echo "$version" > "$dest/usr/share/cfs-boot-version"
    : > "$dest/etc/machine-id"   # generated on first boot
    kver=$(ls "$dest/usr/lib/modules")
    in_chroot "$dest" update-initramfs -c -k "$kver" >"$dest.initramfs.log" 2>&1 \
        || die "update-initramfs failed: $(tail -n 5 "$dest.initramfs.log")"
    mv "$dest/boot/vmlinuz-$kver" "$dest/usr/lib/modules/$kver/vmlinuz"
    mv "$dest/boot/initrd.img-$kver" "$dest/usr/lib/modules/$kver/initramfs.img"
    say "initramfs: $(du -k "$dest/usr/lib/modules/$kver/initramfs.img" | cut -f1) KiB"
}

# deploy TREE LAYOUT TAG ROOT BOOTDIR [LAYER-DIR...]: pack TREE (+ extra
# layers) as LAYOUT:TAG, pull it into the repository ROOT/composefs (made
# insecure: this kernel may lack fs-verity; see provision) and prepare-boot
# it: the boot entry goes to BOOTDIR, the image's state directory
# ROOT/state/deploy/<id> gets /var seeded from the image. Prints the id.
# Kernel arguments for BLS entries (after composefs=<id>), as --cmdline options.
KARGS=(--cmdline root=LABEL=cfsroot --cmdline rw --cmdline console=ttyS0)
deploy() {
    local tree=$1 layout=$2 tag=$3 root=$4 bootdir=$5; shift 5
    "$CFS_PYTHON" "$CFS_SRC/examples/oci_from_dir.py" "$layout" "$tag" "$tree" "$@" >/dev/null
    mkdir -p "$root"
    [ -f "$root/composefs/meta.json" ] || cfsctl init --insecure "$root/composefs" >/dev/null
    cfsctl --repo "$root/composefs" oci pull "oci:$layout:$tag" "$tag" >&2
    local id
    id=$(cfsctl --repo "$root/composefs" oci compute-id --bootable "$tag")
    id=${id#sha512:}
    cfsctl --repo "$root/composefs" oci prepare-boot "$tag" --bootdir "$bootdir" "${KARGS[@]}" >&2
    # The repository becomes secure once provisioned (make_disk): drop the
    # insecure marker ("?") prepare-boot wrote for the insecure build copy.
    if [ -d "$bootdir/loader/entries" ]; then
        sed -i "s/ composefs=?/ composefs=/" "$bootdir"/loader/entries/*.conf
    fi
    [ -d "$root/state/deploy/$id/var" ] || die "prepare-boot made no state/deploy/$id"
    cp -a "$tree/var/." "$root/state/deploy/$id/var/"
    echo "$id"
}

# dracut_initramfs TREE OUT: the same system's initramfs made by dracut with
# the 95composefs module (dist/dracut), in a throwaway copy of TREE: dracut
# and initramfs-tools do not share a system (never on the host either).
# dracut-core's kpartx dependency is for multipath roots: not installed.
dracut_initramfs() {
    local tree=$1 out=$2 tmp=$CFS_CACHE/.dracut-tmp-$$ kver
    rm -rf "$tmp"; cp -a "$tree" "$tmp"
    cp "$(fetch_deb dracut-core)" "$(fetch_deb cpio)" "$tmp/tmp/"
    kver=$(ls "$tmp/usr/lib/modules")
    in_chroot "$tmp" sh -c "dpkg -i --force-depends /tmp/*.deb && dracut --force --no-hostonly \
        --kver $kver --add composefs --omit 'plymouth' /tmp/dracut.img" >"$out.log" 2>&1 \
        || { rm -rf "$tmp"; die "dracut failed: $(tail -n 5 "$out.log")"; }
    mv "$tmp/tmp/dracut.img" "$out"
    rm -rf "$tmp"
    say "dracut initramfs: $(du -k "$out" | cut -f1) KiB"
}

# fetch_deb PACKAGE: a bookworm .deb, downloaded once with the host's apt.
fetch_deb() {
    local d=$CFS_CACHE/debs
    mkdir -p "$d"
    ls "$d/$1"_*.deb >/dev/null 2>&1 || (cd "$d" && apt-get -q download "$1" >&2) || die "apt-get download $1 failed"
    ls "$d/$1"_*.deb | head -n 1
}

# make_disk ROOT DISK: an ext4 filesystem with fs-verity support holding
# ROOT (mke2fs -d: no loop mount), then fs-verity enabled on the repository
# in a VM (examples/provision.py).
make_disk() {
    local root=$1 disk=$2
    rm -f "$disk"
    mke2fs -q -F -t ext4 -b 4096 -O verity -L cfsroot -d "$root" "$disk" 4G \
        || die "mke2fs -d $root failed"
    "$CFS_PYTHON" "$CFS_SRC/examples/provision.py" "$disk" /composefs >"$disk.provision.log" 2>&1 \
        || die "provisioning fs-verity failed: $(tail -n 5 "$disk.provision.log")"
    say "provisioned: $(grep -o 'fs-verity: .*' "$disk.provision.log")"
}

# make_uki OUT.efi VMLINUZ INITRD OS-RELEASE CMDLINE: a unified kernel image
# from systemd-boot-efi's stub (ukify is not in bookworm): objcopy adds
# .osrel, .cmdline, .initrd and .linux (last: the kernel may grow in place)
# at page-aligned addresses after the stub's own sections.
make_uki() {
    local out=$1 vmlinuz=$2 initrd=$3 osrel=$4 cmdline=$5
    local stub=/usr/lib/systemd/boot/efi/linuxx64.efi.stub
    [ -f "$stub" ] || die "no $stub (Debian package systemd-boot-efi)"
    local end=0 size vma _
    while read -r _ _ size vma _; do
        [ $((16#$vma + 16#$size)) -gt "$end" ] && end=$((16#$vma + 16#$size))
    done < <(objdump -h "$stub" | awk '$1 ~ /^[0-9]+$/ {print}')
    local tmp; tmp=$(mktemp -d)
    printf '%s' "$cmdline" > "$tmp/cmdline"
    local args=() off=$end f name
    for f in ".osrel=$osrel" ".cmdline=$tmp/cmdline" ".initrd=$initrd" ".linux=$vmlinuz"; do
        name=${f%%=*}
        off=$(( (off + 0xfff) & ~0xfff ))
        args+=(--add-section "$f" --change-section-vma "$name=$(printf 0x%x "$off")")
        off=$((off + $(stat -Lc %s "${f#*=}")))
    done
    objcopy "${args[@]}" "$stub" "$out" || { rm -rf "$tmp"; die "objcopy (UKI) failed"; }
    rm -rf "$tmp"
}

# make_esp IMG EFI: a FAT EFI system partition image (no partition table,
# no loop mount: mtools) with EFI as the removable-media boot loader.
make_esp() {
    local img=$1 efi=$2 kib
    kib=$(( $(stat -c %s "$efi") / 1024 + 8192 ))
    rm -f "$img"
    mkfs.fat -C -n ESP "$img" "$kib" >/dev/null || die "mkfs.fat failed"
    mmd -i "$img" ::/EFI ::/EFI/BOOT
    mcopy -i "$img" "$efi" ::/EFI/BOOT/BOOTX64.EFI
}
