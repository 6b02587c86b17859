#!/bin/bash
# examples/uki/build.sh [OUT]: a Debian bookworm system booted from a
# composefs image through a unified kernel image (UKI) whose sealed
# .cmdline names the image: composefs=<id>.
#
# OUT/disk.img   ext4 (-O verity, label cfsroot): /composefs (fs-verity
#                enabled), /state/deploy/<id>/{etc,var}
# OUT/esp.img    FAT ESP: /EFI/BOOT/BOOTX64.EFI = the UKI (OVMF boots it)
# OUT/esp        the boot directory prepare-boot wrote (EFI/Linux/*.efi)
#
# No circular hash: the image id is computed first, from the OS tree alone
# (a bootable image leaves /boot out); the UKI carrying that id is then
# added to the OCI image under /boot/EFI/Linux, which does not change the
# id, and `cfsctl oci prepare-boot` checks the UKI's digest and installs it.
#   qemu-system-x86_64 -m 1536 -nographic \
#       -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
#       -drive if=pflash,format=raw,file=COPY-OF-OVMF_VARS_4M.fd \
#       -drive file=OUT/disk.img,if=virtio,format=raw -drive file=OUT/esp.img,if=virtio,format=raw
set -euo pipefail
. "$(dirname "$0")/../common.sh"
OUT=$(realpath -m "${1:-$CFS_CACHE/uki}")
mkdir -p "$OUT"
rm -rf "$OUT/oci" "$OUT/root" "$OUT/esp" "$OUT/uki-layer"
t0=$SECONDS
os_tree "$OUT/tree" 1
kver=$(ls "$OUT/tree/usr/lib/modules")
# The UKI replaces the plain kernel + initramfs as the image's boot entry.
mkdir -p "$OUT/kernel"
mv "$OUT/tree/usr/lib/modules/$kver/vmlinuz" "$OUT/tree/usr/lib/modules/$kver/initramfs.img" "$OUT/kernel/"

# 1. the image id of the OS alone
"$CFS_PYTHON" "$CFS_SRC/examples/oci_from_dir.py" "$OUT/oci" os-base "$OUT/tree" >/dev/null
mkdir -p "$OUT/root"
cfsctl init --insecure "$OUT/root/composefs" >/dev/null
cfsctl --repo "$OUT/root/composefs" oci pull "oci:$OUT/oci:os-base" os-base >&2
id=$(cfsctl --repo "$OUT/root/composefs" oci compute-id --bootable os-base)
id=${id#sha512:}
# 2. the UKI sealed to it
make_uki "$OUT/uki.efi" "$OUT/kernel/vmlinuz" "$OUT/kernel/initramfs.img" \
    "$OUT/tree/etc/os-release" "composefs=$id root=LABEL=cfsroot rw console=ttyS0 panic=-1"
mkdir -p "$OUT/uki-layer/boot/EFI/Linux"
cp "$OUT/uki.efi" "$OUT/uki-layer/boot/EFI/Linux/debian-composefs.efi"
# 3. the image with the UKI layer: same id; prepare-boot checks the UKI
KARGS=()   # a UKI's command line is sealed inside it
deployed=$(deploy "$OUT/tree" "$OUT/oci" os-v1 "$OUT/root" "$OUT/esp" "$OUT/uki-layer")
[ "$deployed" = "$id" ] || die "the UKI layer changed the image id ($id -> $deployed)"
cfsctl --repo "$OUT/root/composefs" oci untag os-base >/dev/null
make_esp "$OUT/esp.img" "$(find "$OUT/esp/EFI/Linux" -name '*.efi' | head -n 1)"
make_disk "$OUT/root" "$OUT/disk.img"
rm -rf "$OUT/root"
echo "$id" > "$OUT/image-id"
say "UKI $(du -k "$OUT/uki.efi" | cut -f1) KiB sealed to image $id; built $OUT in $((SECONDS - t0))s"
