#!/bin/bash
# examples/bls/build.sh [OUT]: a Debian bookworm system booted from a
# composefs image through a Boot Loader Specification (type 1) entry.
#
# OUT/disk.img   ext4 (-O verity, label cfsroot): /composefs (the repository,
#                fs-verity enabled), /state/deploy/<id>/{etc,var}
# OUT/esp        the boot directory prepare-boot wrote: loader/entries/*.conf
#                with `options composefs=<id> ...`, <id>/vmlinuz, initramfs.img
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
id=$(deploy "$OUT/tree" "$OUT/oci" os-v1 "$OUT/root" "$OUT/esp")
say "image $id; boot entry: $(ls "$OUT"/esp/loader/entries/)"
make_disk "$OUT/root" "$OUT/disk.img"
rm -rf "$OUT/root"   # now on the disk
echo "$id" > "$OUT/image-id"
say "built $OUT in $((SECONDS - t0))s"
