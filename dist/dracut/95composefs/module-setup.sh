#!/bin/bash
# dracut module: composefs-setup-root (and the Python it needs) in the
# initramfs, run by composefs-setup-root.service after /sysroot is mounted
# and before the switch to it (as composefs-rs's dracut module does).

check() {
    require_binaries python3 /usr/sbin/composefs-setup-root /usr/lib/composefs/composefs-initrd-python || return 1
    return 0
}

depends() {
    echo systemd
}

installkernel() {
    instmods erofs overlay loop
}

install() {
    local f
    # The interpreter and extension modules (with their libraries), then the
    # pure-Python modules as .pyc, written by composefs-initrd-python.
    # (inst_binary resolves an executable's libraries, not an extension
    # module's: those come from ldd.)
    for f in $(/usr/lib/composefs/composefs-initrd-python "$initdir"); do
        inst_binary "$f" || return 1
        for lib in $(ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'); do
            inst_library "$lib" || return 1
        done
    done
    ln -sf "$(readlink -f /usr/bin/python3)" "$initdir/usr/bin/python3"
    inst_simple /usr/sbin/composefs-setup-root
    [ -f /usr/lib/composefs/setup-root-conf.toml ] && inst_simple /usr/lib/composefs/setup-root-conf.toml
    inst_simple "$moddir/composefs-setup-root.service" "$systemdsystemunitdir/composefs-setup-root.service"
    $SYSTEMCTL -q --root "$initdir" add-wants initrd-root-fs.target composefs-setup-root.service
}
