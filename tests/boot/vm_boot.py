#!/usr/bin/env python3
"""``make test-boot``: build the boot examples and boot them under QEMU.

Builds ``examples/bls`` and ``examples/uki`` (cached under
``${XDG_CACHE_HOME:-~/.cache}/composefs-py/boot/<example>-<key>``, where the
key hashes every input: the example scripts, ``dist/``, the composefs
package, the in-guest checks; a changed input rebuilds) and boots them with
QEMU/TCG. Prints one ``PASS``/``FAIL`` line per check and a summary
``N passed, N failed``; exits non-zero on any failure.

Checks inside the booted system come from ``tests/boot/guest/cfs-boot-test``
(a systemd unit ordered after multi-user.target, prints ``CFSTEST:`` lines);
the driver adds the host-side ones: the state on the disk image, a tampered
object, a wrong or missing digest, a UKI whose image changed after sealing.
Each boot's console log is kept in the run directory named at the end.

Usage: ``.venv/bin/python tests/boot/vm_boot.py [bls] [uki]`` (default:
both). ``COMPOSEFS_BOOT_TIMEOUT`` (seconds per boot, default 600).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "tests" / "vm"))
import run as vm  # noqa: E402  (probe_qemu, cache_dir)

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
TAMPER_FILE = "/usr/share/common-licenses/GPL-3"
INPUTS = ("examples", "dist", "src/composefs", "tests/boot/guest", "tests/vm/run.py",
          "tests/vm/init.sh")


def cache_root() -> Path:
    return vm.cache_dir().parent / "boot"


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.figures: list[str] = []

    def check(self, ok: bool, name: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS {name}", flush=True)
        else:
            self.failed += 1
            print(f"FAIL {name}{f'  ({detail})' if detail else ''}", flush=True)
        return ok

    def figure(self, text: str) -> None:
        self.figures.append(text)
        print(f"INFO {text}", flush=True)


# ------------------------------------------------------------------- build


def inputs_key(example: str) -> str:
    h = hashlib.sha256(example.encode())
    for top in INPUTS:
        base = REPO / top
        paths = [base] if base.is_file() else sorted(base.rglob("*"))
        for p in paths:
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def build(example: str, report: Report) -> Path | None:
    """The example's output directory, built unless cached."""
    root = cache_root()
    out = root / f"{example}-{inputs_key(example)}"
    if (out / ".complete").is_file():
        print(f"test-boot: {example}: cached build {out}", flush=True)
        return out
    for old in root.glob(f"{example}-*"):
        shutil.rmtree(old, ignore_errors=True)
    print(f"test-boot: {example}: building into {out}", flush=True)
    t0 = time.monotonic()
    env = dict(os.environ, CFS_PYTHON=sys.executable)
    res = subprocess.run(["bash", str(REPO / "examples" / example / "build.sh"), str(out)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         check=False)
    (root / f"{example}-build.log").write_text(res.stdout)
    wall = time.monotonic() - t0
    tail = " | ".join(res.stdout.strip().splitlines()[-3:])
    if not report.check(res.returncode == 0, f"{example}: build the example disk image",
                        f"exit {res.returncode}: {tail}"):
        return None
    report.figure(f"{example}: build {wall:.0f}s")
    (out / "build-seconds").write_text(f"{wall:.1f}\n")
    (out / ".complete").touch()
    return out


# -------------------------------------------------------------------- boot


@dataclass
class Entry:
    linux: Path
    initrd: Path
    options: str


def bls_entry(out: Path) -> Entry:
    confs = sorted((out / "esp" / "loader" / "entries").glob("*.conf"))
    if len(confs) != 1:
        raise RuntimeError(f"expected one boot entry in {out / 'esp'}, found {len(confs)}")
    keys: dict[str, str] = {}
    for line in confs[0].read_text().splitlines():
        k, _, v = line.strip().partition(" ")
        if k and not k.startswith("#"):
            keys[k] = v.strip()
    esp = out / "esp"
    return Entry(esp / keys["linux"].lstrip("/"), esp / keys["initrd"].lstrip("/"),
                 keys["options"])


@dataclass
class Boot:
    name: str
    console: str
    wall: float
    timed_out: bool
    guest: list[tuple[str, str]] = field(default_factory=list)  # (PASS|FAIL, text)

    def lines(self, prefix: str) -> list[str]:
        return [m.group(1) for m in re.finditer(rf"{re.escape(prefix)}(.*)", self.console)]

    @property
    def done(self) -> bool:
        return any(x.startswith("DONE") for x in self.lines("CFSTEST: "))


def qemu_boot(name: str, rundir: Path, disk: Path, *, entry: Entry | None = None,
              append: str = "", esp: Path | None = None, fw_cfg: dict[str, str] | None = None,
              snapshot: bool = False, share: Path | None = None) -> Boot:
    """Boot the example: direct kernel boot of a BLS entry, or OVMF + ESP."""
    qemu = shutil.which(vm.QEMU) or vm.QEMU
    drive = f"file={disk},if=virtio,format=raw,cache=unsafe" + (",snapshot=on" if snapshot else "")
    cmd = [qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", "1536",
           "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
           "-monitor", "none", "-drive", drive]
    if entry is not None:
        cmd += ["-kernel", str(entry.linux), "-initrd", str(entry.initrd), "-append", append]
    if esp is not None:
        vars_copy = rundir / f"{name}-OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, vars_copy)
        cmd += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
                "-drive", f"file={esp},if=virtio,format=raw,readonly=on"]
    if share is not None:
        cmd += ["-virtfs", f"local,path={share},mount_tag=update,security_model=none,readonly=on"]
    for k, v in (fw_cfg or {}).items():
        cmd += ["-fw_cfg", f"name=opt/{k},string={v}"]
    timeout = float(os.environ.get("COMPOSEFS_BOOT_TIMEOUT", "600"))
    t0 = time.monotonic()
    # A boot that dies of the emulator is run once more from the same start:
    # the disk as it was (0.3 s to copy; a snapshot boot never writes it).
    before = None if snapshot else rundir / f"{name}-disk-before.img"
    if before is not None:
        copy_disk(disk, before)
    for attempt in (1, 2):
        console, timed_out = _run_qemu(cmd, timeout)
        if attempt == 2 or timed_out or not vm.emulator_fault(console):
            break
        crashed = rundir / f"{name}-kernel-fault.log"
        crashed.write_text(console)
        print(f"test-boot: boot {name}: the guest kernel died of a QEMU/TCG fault, not of "
              f"the boot; booting once more. Crash log: {crashed}", flush=True)
        if before is not None:
            copy_disk(before, disk)
        if esp is not None:  # the firmware may have written boot variables
            shutil.copyfile(OVMF_VARS, rundir / f"{name}-OVMF_VARS.fd")
    if before is not None:
        before.unlink()
    (rundir / f"{name}.log").write_text(console)
    boot = Boot(name, console, time.monotonic() - t0, timed_out)
    for line in boot.lines("CFSTEST: "):
        verdict, _, text = line.partition(" ")
        if verdict in ("PASS", "FAIL"):
            boot.guest.append((verdict, text.strip()))
    print(f"test-boot: boot {name}: {boot.wall:.1f}s"
          f"{' (TIMED OUT)' if boot.timed_out else ''}, log {rundir / (name + '.log')}", flush=True)
    return boot


def _run_qemu(cmd: Sequence[str], timeout: float) -> tuple[str, bool]:
    """Run QEMU to its end: (the console without escape sequences, timed out)."""
    timed_out = threading.Event()
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as proc:

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            raw = proc.stdout.read()
            proc.wait()
        finally:
            timer.cancel()
    console = raw.decode("utf-8", "replace").replace("\r", "")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", console), timed_out.is_set()


def guest_checks(report: Report, boot: Boot, label: str, expect: Sequence[str]) -> None:
    """Report the guest's PASS/FAIL lines; every check named in `expect`
    (a prefix like "root:") must have passed."""
    for verdict, text in boot.guest:
        report.check(verdict == "PASS", f"{label}: {text}")
    for prefix in expect:
        if not any(v == "PASS" and t.startswith(prefix) for v, t in boot.guest):
            if not any(t.startswith(prefix) for _, t in boot.guest):
                report.check(False, f"{label}: {prefix} check ran",
                             "the guest did not report it (timeout or boot failure; see log)")
    report.check(boot.done and not boot.timed_out, f"{label}: the test unit ran to the end",
                 "no DONE line" + (" (timed out)" if boot.timed_out else ""))


def setup_root_time(report: Report, boot: Boot, label: str) -> None:
    for line in boot.lines("composefs: root set up in "):
        report.figure(f"{label}: setup-root {line}")
        break
    for line in boot.lines("CFSTEST: INFO phase="):
        m = re.search(r"multi-user-uptime=([\d.]+)s", line)
        if m:
            report.figure(f"{label}: multi-user.target at uptime {m.group(1)}s "
                          f"(boot wall time incl. QEMU start {boot.wall:.1f}s)")


def refused(report: Report, boot: Boot, label: str, message: str) -> None:
    """A boot that composefs-setup-root must stop in the initramfs."""
    err = boot.lines("composefs-setup-root: ")
    report.check(any(message in e for e in err), f"{label}: setup-root names the problem",
                 f"console has {err!r}, expected {message!r}")
    report.check(any("REFUSING TO BOOT" in x for x in boot.lines("composefs: ")),
                 f"{label}: the initramfs refuses to boot")
    left = boot.lines("composefs: mounts at /root after the failure: ")
    report.check(left == ["none"], f"{label}: no root left mounted", f"{left!r}")
    report.check("Welcome to" not in boot.console and "CFSTEST" not in boot.console
                 and not boot.timed_out, f"{label}: systemd never started",
                 "timed out" if boot.timed_out else "the system came up")


def debugfs(disk: Path, request: str) -> str:
    res = subprocess.run(["debugfs", "-R", request, str(disk)], capture_output=True, text=True,
                         check=False)
    return res.stdout


def object_path(tree: Path, path: str) -> str:
    """The repository object holding `path` of the OS tree (sha512 fs-verity)."""
    res = subprocess.run(["fsverity", "digest", "--hash-alg=sha512", "--compact",
                          str(tree / path.lstrip("/"))], capture_output=True, text=True,
                         check=True)
    d = res.stdout.strip()
    return f"/composefs/objects/{d[:2]}/{d[2:]}"


def corrupt(disk: Path, ino_path: str) -> tuple[int, bytes]:
    """Overwrite the first data block of `ino_path` on the disk image; returns
    (offset, original bytes) for `restore`."""
    out = debugfs(disk, f"bmap {ino_path} 0").strip().splitlines()
    block = int(out[-1]) if out and out[-1].isdigit() else 0
    if block <= 0:
        raise RuntimeError(f"no data block for {ino_path}: {out}")
    with open(disk, "r+b") as f:
        f.seek(block * 4096)
        orig = f.read(4096)
        f.seek(block * 4096)
        f.write(bytes(b ^ 0x5A for b in orig))
    return block * 4096, orig


def restore(disk: Path, offset: int, data: bytes) -> None:
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(data)


def copy_disk(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "--sparse=always", str(src), str(dst)], check=True)


# ---------------------------------------------------------------- examples

EXTRA = "panic=-1 loglevel=4"
FIRST = ("root:", "systemd:", "sysroot:", "binaries:", "usr:", "etc:", "var:")


def test_bls(report: Report, rundir: Path) -> None:
    out = build("bls", report)
    if out is None:
        return
    image_id = (out / "image-id").read_text().strip()
    entry = bls_entry(out)
    report.check(f"composefs={image_id}" in entry.options.split(),
                 "bls: the entry's options carry composefs=<digest>", entry.options)
    disk = rundir / "bls-disk.img"
    copy_disk(out / "disk.img", disk)

    first = qemu_boot("bls-first", rundir, disk, entry=entry,
                      append=f"{entry.options} {EXTRA} cfs.test=first")
    guest_checks(report, first, "bls boot 1", FIRST)
    setup_root_time(report, first, "bls")
    # Boot 2: the reboot; an object was also changed on the disk meanwhile.
    obj = object_path(out / "tree", TAMPER_FILE)
    offset, orig = corrupt(disk, obj)
    try:
        second = qemu_boot("bls-second", rundir, disk, entry=entry,
                           append=f"{entry.options} {EXTRA} cfs.test=second cfs.tamper={TAMPER_FILE}")
    finally:
        restore(disk, offset, orig)
    guest_checks(report, second, "bls boot 2 (reboot, one object tampered)",
                 ("root:", "etc:", "var:", "tamper:"))
    state = debugfs(disk, f"cat /state/deploy/{image_id}/etc/upper/cfs-boot-test").strip()
    report.check(state == f"first {image_id}",
                 "bls: the /etc change is on the disk in state/deploy/<digest>/etc", repr(state))

    # The same entry with the initramfs dracut made (dist/dracut/95composefs).
    dracut = Entry(entry.linux, out / "dracut-initramfs.img", entry.options)
    boot = qemu_boot("bls-dracut", rundir, disk, entry=dracut, snapshot=True,
                     append=f"{entry.options} {EXTRA} cfs.test=dracut")
    guest_checks(report, boot, "bls dracut initramfs", ("root:", "systemd:", "binaries:"))
    setup_root_time(report, boot, "bls (dracut)")
    for name, img in (("initramfs-tools", entry.initrd), ("dracut", dracut.initrd)):
        report.figure(f"initramfs ({name}): {img.stat().st_size / 2**20:.1f} MiB")

    wrong = hashlib.sha512(b"not the image").hexdigest()
    opts = entry.options.replace(f"composefs={image_id}", f"composefs={wrong}")
    boot = qemu_boot("bls-wrong-digest", rundir, disk, entry=entry, snapshot=True,
                     append=f"{opts} {EXTRA}")
    refused(report, boot, "bls wrong digest", f"no composefs image found in /root/composefs/images (tried: {wrong})")
    opts = entry.options.replace(f"composefs={image_id}", "")
    boot = qemu_boot("bls-missing-digest", rundir, disk, entry=entry, snapshot=True,
                     append=f"{opts} {EXTRA}")
    refused(report, boot, "bls missing digest", "no composefs karg found")

    upgrade(report, rundir, out, disk, entry, image_id)


def uki_section(efi: Path, name: str) -> bytes:
    """A section of the UKI, read with objcopy (an independent PE reader)."""
    with tempfile.NamedTemporaryFile() as tmp:
        subprocess.run(["objcopy", "-O", "binary", f"--only-section={name}", str(efi), tmp.name],
                       check=True, capture_output=True)
        return Path(tmp.name).read_bytes()


def test_uki(report: Report, rundir: Path) -> None:
    out = build("uki", report)
    if out is None:
        return
    image_id = (out / "image-id").read_text().strip()
    ukis = sorted((out / "esp" / "EFI" / "Linux").glob("*.efi"))
    if not report.check(len(ukis) == 1, "uki: prepare-boot installed one UKI", f"{ukis}"):
        return
    cmdline = uki_section(ukis[0], ".cmdline").decode(errors="replace").strip("\0")
    report.check(f"composefs={image_id}" in cmdline.split(),
                 "uki: the UKI's .cmdline carries composefs=<digest>", cmdline)
    disk = rundir / "uki-disk.img"
    copy_disk(out / "disk.img", disk)
    first = qemu_boot("uki-first", rundir, disk, esp=out / "esp.img", fw_cfg={"cfs.test": "first"})
    guest_checks(report, first, "uki boot (OVMF)", FIRST)
    setup_root_time(report, first, "uki")

    # The image changed after the UKI was sealed: its first block on disk
    # differs from what the sealed digest covers.
    image_obj = f"/composefs/objects/{image_id[:2]}/{image_id[2:]}"
    offset, orig = corrupt(disk, image_obj)
    try:
        boot = qemu_boot("uki-image-changed", rundir, disk, esp=out / "esp.img",
                         fw_cfg={"cfs.test": "first"})
    finally:
        restore(disk, offset, orig)
    refused(report, boot, "uki image changed after sealing", image_id)


def infos(boot: Boot) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in boot.lines("CFSTEST: INFO "):
        k, sep, v = line.partition("=")
        if sep and " " not in k:
            out[k] = v.strip()
    return out


def upgrade(report: Report, rundir: Path, out: Path, disk: Path, entry: Entry, v1: str) -> None:
    """The running v1 system pulls and prepare-boots v2 (OUT/oci:os-v2, shared
    over 9p); boot v2 from its new entry, then roll back to v1's entry."""
    boot = qemu_boot("bls-upgrade", rundir, disk, entry=entry, share=out / "oci",
                     append=f"{entry.options} {EXTRA} cfs.test=upgrade")
    guest_checks(report, boot, "bls upgrade (in the running v1)", ("upgrade:", "gc:"))
    v2 = infos(boot).get("upgraded-to", "")
    if not report.check(bool(re.fullmatch(r"[0-9a-f]{128}", v2)), "upgrade: new image id reported", v2):
        return
    conf = debugfs(disk, "cat /boot/loader/entries/os-v2.conf")
    keys = dict(line.split(" ", 1) for line in conf.splitlines() if " " in line and not line.startswith("#"))
    files = rundir / "v2-boot"
    files.mkdir(exist_ok=True)
    for k in ("linux", "initrd"):
        debugfs(disk, f"dump /boot{keys.get(k, '/missing')} {files / k}")
    if not report.check((files / "linux").is_file() and (files / "initrd").is_file()
                        and f"composefs={v2}" in keys.get("options", "").split(),
                        "upgrade: the os-v2 entry (kernel, initrd, composefs=<new id>) is on the disk",
                        conf.strip()[:200]):
        return
    entry2 = Entry(files / "linux", files / "initrd", keys["options"])
    new = qemu_boot("bls-v2", rundir, disk, entry=entry2,
                    append=f"{entry2.options} {EXTRA} cfs.test=deployment")
    guest_checks(report, new, "bls v2 boot", ("root:", "systemd:"))
    i = infos(new)
    report.check(i.get("version") == "2" and i.get("hello", "").startswith("Hello"),
                 "upgrade: v2 runs (version 2, the new package's hello runs)", f"{i}")
    report.check(i.get("etc-marker") == "none", "upgrade: v2 has its own /etc state (v1's change absent)",
                 f"{i.get('etc-marker')}")
    old = qemu_boot("bls-rollback", rundir, disk, entry=entry,
                    append=f"{entry.options} {EXTRA} cfs.test=deployment")
    guest_checks(report, old, "bls rollback boot", ("root:", "systemd:"))
    i = infos(old)
    report.check(i.get("version") == "1" and i.get("etc-marker") == f"first {v1}",
                 "rollback: the old entry boots v1 with its own /etc state", f"{i}")
    s1 = debugfs(disk, f"cat /state/deploy/{v1}/etc/upper/cfs-boot-test").strip()
    s2 = debugfs(disk, f"cat /state/deploy/{v2}/etc/upper/cfs-boot-test").strip()
    report.check(s1 == f"first {v1}" and s2 == f"deployed {v2}",
                 "upgrade: each deployment's /etc change is in its own state/deploy/<id>/etc",
                 f"v1 {s1!r}, v2 {s2!r}")


def main(argv: Sequence[str] | None = None) -> int:
    which = list(sys.argv[1:] if argv is None else argv) or ["bls", "uki"]
    t0 = time.monotonic()
    report = Report()
    try:
        vm.probe_qemu()
    except vm.Skip as e:
        report.check(False, "qemu can start", str(e))
        which = []
    runs = cache_root() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for old in runs.iterdir():
        if time.time() - old.stat().st_mtime > 86400:
            shutil.rmtree(old, ignore_errors=True)
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
    tests = {"bls": test_bls, "uki": test_uki}
    for name in which:
        if name not in tests:
            report.check(False, f"{name}: known example", f"choose from {', '.join(tests)}")
            continue
        try:
            tests[name](report, rundir)
        except (OSError, RuntimeError, subprocess.CalledProcessError, KeyError) as e:
            report.check(False, f"{name}: test driver", f"{type(e).__name__}: {e}")
    wall = time.monotonic() - t0
    report.figure(f"test-boot total {wall:.0f}s")
    ok = report.failed == 0 and report.passed > 0
    for img in rundir.glob("*.img"):  # disk copies; the console logs stay
        img.unlink()
    print(f"test-boot: console logs in {rundir}", flush=True)
    print(f"test-boot: {report.passed} passed, {report.failed} failed in {wall:.1f}s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
