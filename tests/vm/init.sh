#!/bin/busybox sh
# /init of the composefs test VM (packed into the initramfs by tests/vm/run.py).
#
# Loads the kernel modules, mounts the host's / read-only over 9p at /host,
# gives it fresh /proc /sys /dev /tmp /run (keeping the cfs.keep= paths below
# them visible: a checkout under /tmp), mounts the writable results share
# at the same path as on the host and the verity-capable ext4 disk (made on
# the host with `mke2fs -O verity -b 4096`) at /run/verity, then runs the
# host-written guest script chrooted into the host's /.  Every line meant for
# the host starts with "COMPOSEFS-VM:"; the last one is "COMPOSEFS-VM: RC <n>".
/bin/busybox mkdir -p /bin /proc /sys /dev /tmp /host
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

say() { echo "COMPOSEFS-VM: $*"; }
cmdarg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^cfs\\.$1=//p" | tail -n 1; }
finish() {
    say "RC $1 (guest uptime $(cut -d' ' -f1 /proc/uptime)s)"
    [ -n "$OUT" ] && umount "/host$OUT" 2>/dev/null
    umount /host/run/verity 2>/dev/null
    sync
    poweroff -f
}
die() { say "SETUP-FAIL $*"; finish 99; }

OUT=$(cmdarg out)
SCRIPT=$(cmdarg script)
say "kernel $(uname -r), init at $(cut -d' ' -f1 /proc/uptime)s"

for m in $(cat /modules/order); do
    insmod "/modules/$m" 2>/tmp/insmod.err || die "insmod $m: $(cat /tmp/insmod.err)"
done

mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=512000 hostroot /host \
    2>/tmp/m.err || die "9p mount of the host's /: $(cat /tmp/m.err)"
mount -t proc proc /host/proc || die "mount /host/proc"
mount -t sysfs sys /host/sys || die "mount /host/sys"
mount -t devtmpfs dev /host/dev || die "mount /host/dev"
mkdir -p /host/dev/shm /host/dev/pts
mount -t tmpfs shm /host/dev/shm
mount -t devpts devpts /host/dev/pts 2>/dev/null
# Host paths under /tmp or /run that the guest needs (the checkout, its
# venv: cfs.keep=P1:P2) would vanish under the fresh tmpfs: hold them on
# bind mounts first and put them back at the same paths after.
KEEP=$(cmdarg keep)
i=0
for p in $(echo "$KEEP" | tr ':' ' '); do
    mkdir -p "/keep/$i"
    mount -o bind "/host$p" "/keep/$i" 2>/tmp/m.err || die "bind $p: $(cat /tmp/m.err)"
    i=$((i + 1))
done
mount -t tmpfs tmp /host/tmp || die "mount /host/tmp"
mount -t tmpfs run /host/run || die "mount /host/run"
i=0
for p in $(echo "$KEEP" | tr ':' ' '); do
    mkdir -p "/host$p" && mount -o bind "/keep/$i" "/host$p" 2>/tmp/m.err ||
        die "put $p back over the guest's tmpfs: $(cat /tmp/m.err)"
    i=$((i + 1))
done

# The results share: the host created $OUT, but it may lie under /tmp or /run,
# which are fresh tmpfs mounts here, so create the mount point if needed.
[ -n "$OUT" ] || die "no cfs.out= on the kernel command line"
mkdir -p "/host$OUT" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results "/host$OUT" \
    2>/tmp/m.err || die "9p mount of the results share: $(cat /tmp/m.err)"

mkdir -p /host/run/verity
[ -b /dev/vda ] || die "no /dev/vda (virtio_blk)"
mount -t ext4 /dev/vda /host/run/verity 2>/tmp/m.err || die "mount ext4 /dev/vda: $(cat /tmp/m.err)"
[ -e /sys/fs/ext4/features/verity ] || die "this kernel's ext4 has no verity feature"
say "ready at $(cut -d' ' -f1 /proc/uptime)s"

[ -n "$SCRIPT" ] || die "no cfs.script= on the kernel command line"
chroot /host /bin/sh "$SCRIPT" </dev/null
finish $?
