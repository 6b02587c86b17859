#!/bin/bash
# examples/bls/build.sh [OUT]: a Debian bookworm system booted from a
# composefs image through a Boot Loader Specification (type 1) entry.
#
# OUT/disk.img   ext4 (-O verity, label cfsroot): /composefs (the repository,
#                fs-verity enabled), /state/deploy/<id>/{etc,var}
# OUT/esp        the boot directory prepare-boot wrote: loader/entries/*.conf
#                with `options composefs=<id> ...`, <id>/vmlinuz, initramfs.img
#                (made by initramfs-tools with dist/initramfs-tools)
# OUT/dracut-initramfs.img   the same, made by dracut with dist/dracut/95composefs
# OUT/oci        OCI layout: os-v1 (deployed) and os-v2 (the upgrade)
#
# Boot it with the entry's kernel, initrd and options (what systemd-boot
# would do), e.g. tests/boot/vm_boot.py, or by hand:
#   qemu-system-x86_64 -m 1536 -nographic -kernel OUT/esp/<id>/vmlinuz \
#       -initrd OUT/esp/<id>/initramfs.img -append "<options>" \
#       -drive file=OUT/disk.img,if=virtio,format=raw
set -euo pipefail
. "$(dirname "$0")/../common.sh"
OUT=$(realpath -m "${1:-$CFS_CACHE/bls}")
mkdir -p "$OUT"
rm -rf "$OUT/oci" "$OUT/root" "$OUT/esp"
t0=$SECONDS
os_tree "$OUT/tree" 1
# The same system's initramfs made by dracut (95composefs), to boot the same
# entry with: OUT/dracut-initramfs.img.
dracut_initramfs "$OUT/tree" "$OUT/dracut-initramfs.img"
id=$(deploy "$OUT/tree" "$OUT/oci" os-v1 "$OUT/root" "$OUT/esp")
say "image $id; boot entry: $(ls "$OUT"/esp/loader/entries/)"
# The next version of the OS, for the upgrade path: the same tree plus one
# layer (the hello package, /usr/share/cfs-boot-version = 2), tagged os-v2
# in OUT/oci. The running system pulls it and prepare-boots it
# (tests/boot/vm_boot.py shares OUT/oci with the VM).
rm -rf "$OUT/v2-layer"; mkdir -p "$OUT/v2-layer/usr/share"
dpkg-deb -x "$(fetch_deb hello)" "$OUT/v2-layer"
echo 2 > "$OUT/v2-layer/usr/share/cfs-boot-version"
"$CFS_PYTHON" "$CFS_SRC/examples/oci_from_dir.py" "$OUT/oci" os-v2 "$OUT/tree" "$OUT/v2-layer" >/dev/null
make_disk "$OUT/root" "$OUT/disk.img"
rm -rf "$OUT/root"   # now on the disk
echo "$id" > "$OUT/image-id"
say "built $OUT in $((SECONDS - t0))s"
