"""Shared helpers for the FUSE tests: an image with every file type, mounts."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from composefs import dumpfile, fsverity
from composefs.erofs import writer
from composefs.erofs.format import FormatVersion

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"

# Content of the external files: several sizes around block boundaries, one
# spanning many 128 KiB FUSE reads.
EXTERNAL = {
    b"/ext/small": b"x" * 5001,
    b"/ext/block": bytes(range(256)) * 16,
    b"/ext/big": os.urandom(3 * 1024 * 1024 + 17),
}


def _digest(data: bytes) -> str:
    return fsverity.digest_hex(data, "sha256")


def every_type_dumpfile() -> bytes:
    """A dumpfile with every file type, hardlinks, whiteouts, xattrs, inline
    and external files, nanosecond mtimes, uids/gids beyond 16 bits."""
    lines = [
        b"/ 4096 40755 5 0 0 0 1700000000.123456789 - - - user.root=1",
        b"/dir 4096 40750 2 1000 1000 0 1700000001.5 - - - user.a=x trusted.t=secret",
        b"/dir/inline 5 100644 2 1000 1000 0 1700000002.999999999 - hello - user.k=v",
        b"/dir/hard 0 @100644 0 0 0 0 0.0 /dir/inline - -",
        b"/dir/empty 0 100600 1 70000 70001 0 1700000003.0 - - -",
        b"/dir/exec 3 104755 1 0 0 0 1700000003.000000001 - abc - security.capability=\\x01\\x00\\x00\\x02\\x00\\x20\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00",
        b"/dev 4096 40755 2 0 0 0 1700000004.0 - - -",
        b"/dev/null 0 20666 1 0 0 259 1700000005.0 - - -",
        b"/dev/sda 0 60660 1 0 6 2048 1700000006.0 - - -",
        b"/dev/fifo 0 10644 1 0 0 0 1700000007.0 - - -",
        b"/dev/sock 0 140755 1 0 0 0 1700000008.0 - - -",
        b"/dev/whiteout 0 20000 1 0 0 0 1700000009.0 - - -",
        b"/dev/blk0 0 60600 1 0 0 0 1700000009.5 - - -",
        b"/links 4096 40755 2 0 0 0 1700000010.0 - - -",
        b"/links/rel 6 120777 1 0 0 0 1700000011.0 ../dir - -",
        b"/links/abs 9 120777 1 0 0 0 1700000012.0 /dev/null - -",
        b"/ext 4096 40755 2 0 0 0 1700000013.0 - - -",
    ]
    for path, data in EXTERNAL.items():
        d = _digest(data)
        lines.append(
            path
            + f" {len(data)} 100644 {1 + (path == b'/ext/big')} 0 0 0 1700000014.25"
            f" {d[:2]}/{d[2:]} - {d}".encode()
        )
    lines.append(b"/ext/hardbig 0 @100644 0 0 0 0 0.0 /ext/big - -")
    lines.append(b"/ext/opaque 4096 40755 2 0 0 0 1700000015.0 - - - trusted.overlay.opaque=y")
    return b"\n".join(lines) + b"\n"


def write_objects(basedir: Path) -> None:
    for data in EXTERNAL.values():
        d = _digest(data)
        p = basedir / d[:2] / d[2:]
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def every_type_image(tmp: Path, version: FormatVersion = FormatVersion.V1) -> tuple[Path, Path]:
    """(image path, base dir) of the every-type tree."""
    image = tmp / "every.cfs"
    image.write_bytes(writer.mkfs(dumpfile.parse(every_type_dumpfile()), version))
    objects = tmp / "objects"
    write_objects(objects)
    return image, objects


def need_fuse() -> None:
    from composefs.fuse.server import available

    why = available()
    if why is not None:
        pytest.skip(f"FUSE unavailable: {why}")
    if os.geteuid() != 0:
        pytest.skip("needs root for kernel mounts and to pick test users")


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def wait_unmounted(path: Path, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not is_mounted(path):
            return True
        time.sleep(0.05)
    return False


def fuse_servers_for(mountpoint: Path) -> list[int]:
    """PIDs of live processes whose command line names `mountpoint`."""
    out = []
    needle = os.fsencode(mountpoint)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmd.split(b"\0") and state != b"Z":
            out.append(int(pid))
    return out


def fuse_mount(image: Path, basedir: Path, mnt: Path, *extra: str) -> None:
    subprocess.run(
        [str(VENV_BIN / "composefs-fuse"), "-o", f"source={image},basedir={basedir}", *extra,
         str(mnt)],
        check=True, timeout=60,
    )  # fmt: skip
    assert is_mounted(mnt)


def unmount(mnt: Path) -> None:
    if is_mounted(mnt):
        subprocess.run(["umount", str(mnt)], check=False)
    assert wait_unmounted(mnt), f"{mnt} still mounted"
    end = time.monotonic() + 10
    while fuse_servers_for(mnt) and time.monotonic() < end:
        time.sleep(0.05)
    assert not fuse_servers_for(mnt), "FUSE server left behind"
