"""Host-side checks of the VM harness's pure parts (no VM is booted here)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testlib import load_module

runner = load_module("composefs_vm_run", Path(__file__).with_name("run.py"))


def test_cpio_is_readable_by_busybox(tmp_path: Path) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        pytest.skip("busybox not installed (make system-deps installs it)")
    cpio = runner.Cpio()
    cpio.dir("bin")
    cpio.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755)
    cpio.file("odd-size", b"x" * 4097)
    cpio.chardev("console", 5, 1)
    archive = cpio.finish()
    assert len(archive) % 4 == 0
    listing = subprocess.run([busybox, "cpio", "-t"], input=archive, capture_output=True,
                             check=True).stdout.decode().split()
    assert listing == ["bin", "bin/hello", "odd-size", "console"]
    subprocess.run([busybox, "cpio", "-i", "-d"], input=archive, cwd=tmp_path,
                   capture_output=True, check=False)
    assert (tmp_path / "bin/hello").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (tmp_path / "bin/hello").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "odd-size").read_bytes() == b"x" * 4097


def test_node_id() -> None:
    assert (runner.node_id("tests.vm.test_vm_verity", "test_x[sha256]")
            == "tests/vm/test_vm_verity.py::test_x[sha256]")
    assert (runner.node_id("tests.vm.test_vm_verity.TestA", "t")
            == "tests/vm/test_vm_verity.py::TestA::t")
    assert runner.node_id("nowhere.mod", "t") == "nowhere.mod::t"


@pytest.mark.parametrize(("args", "expect_default"), [
    ([], True),
    (["-k", "mount and not cfsctl"], True),
    (["tests/vm/test_vm_verity.py::test_measure_without_verity"], False),
])
def test_guest_script(tmp_path: Path, args: list[str], expect_default: bool) -> None:
    script = runner.guest_script(tmp_path, args)
    last = shlex.split(script.strip().splitlines()[-1])
    assert last[:3] == [sys.executable, "-m", "pytest"]
    assert last[last.index("-m", 3) + 1] == "vm"
    assert f"--junitxml={tmp_path / 'junit.xml'}" in last
    assert last[-len(args) - 1:-1] == args if expect_default else last[-len(args):] == args
    assert (last[-1] == "tests/vm") == expect_default
    assert "export COMPOSEFS_VERITY_SCRATCH=/run/verity" in script


def test_keep_paths_for_a_checkout_under_tmp(monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest mounts fresh tmpfs on /tmp and /run: a checkout or venv
    there is named on the kernel command line (cfs.keep=) to stay visible."""
    monkeypatch.setattr(runner, "REPO", Path("/tmp/co/composefs"))
    assert runner.keep_paths("/tmp/co/composefs/.venv/bin/python") == ["/tmp/co/composefs"]
    assert runner.keep_paths("/run/venvs/x/bin/python") == [
        "/run/venvs/x", "/tmp/co/composefs"
    ] or runner.keep_paths("/run/venvs/x/bin/python") == ["/tmp/co/composefs", "/run/venvs/x"]
    monkeypatch.setattr(runner, "REPO", Path("/work/composefs"))
    assert runner.keep_paths("/usr/bin/python3") == []
    monkeypatch.setattr(runner, "REPO", Path("/tmp/has space"))
    with pytest.raises(runner.HarnessError, match="space"):
        runner.keep_paths("/usr/bin/python3")


def test_guest_script_explains_a_missing_checkout(tmp_path: Path) -> None:
    script = runner.guest_script(tmp_path, [])
    assert "is not visible in the guest" in script


_FAULT = """\
[    3.381367] sched_clock: Marking stable (3328233464, 50816936)->(3384016647, -4966247)
[    3.384354] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI
[    3.384812] CPU: 0 UID: 0 PID: 1 Comm: swapper/0 Not tainted 6.12.95+deb12-amd64 #1
[    3.388540] Kernel panic - not syncing: Fatal exception in interrupt
"""


@pytest.mark.parametrize(("console", "retry"), [
    # the TCG flake seen in CI: the kernel faults while it still boots itself
    ("[    0.000000] Command line: composefs=abc root=LABEL=cfsroot\n" + _FAULT, True),
    ("BdsDxe: loading Boot0002\n" + _FAULT.replace("Oops: int3", "BUG: kernel NULL"), True),
    # the same int3 fault under systemd: user space cannot raise it
    ("[    4.759239] Run /init as init process\nWelcome to Debian\n" + _FAULT, True),
    # a panic that a broken init causes is ours to report, never retried
    ("[    4.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n",
     False),
    # once user space has printed, any other fault counts against the boot
    ("Loading, please wait...\n" + _FAULT.replace("Oops: int3", "Oops: general"), False),
    ("[    4.759239] Run /init as init process\n" + _FAULT.replace("int3", "0000"), False),
    ("composefs: setting up the root\n" + _FAULT.replace("Oops: int3", "BUG: unable"), False),
    ("COMPOSEFS-VM: guest up\n" + _FAULT.replace("Oops: int3", "Oops: general"), False),
    ("[    1.0] all fine\nCFSTEST: DONE\n", False),
])
def test_emulator_fault(console: str, retry: bool) -> None:
    assert runner.emulator_fault(console) is retry


@pytest.mark.parametrize("scratch", [True, False])
def test_a_boot_retried_after_the_fault_keeps_a_callers_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scratch: bool
) -> None:
    """The second boot after an emulator fault gets a fresh disk only when
    the disk is the harness's scratch disk: examples/provision.py's disk
    holds the repository it provisions (a blank one failed with "no
    meta.json")."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"the caller's filesystem")
    log = tmp_path / "console.log"
    share = tmp_path / "share"
    share.mkdir()
    attempts: list[bytes] = []

    def fake_run_vm(cmd: object, timeout: float, logpath: Path) -> tuple[int | None, bool, int]:
        attempts.append(disk.read_bytes())
        if len(attempts) == 1:
            logpath.write_text("[    2.39] x\n" + _FAULT)
            return None, False, 0
        logpath.write_text("COMPOSEFS-VM: RC 0\n")
        return 0, False, 0

    made: list[Path] = []
    monkeypatch.setattr(runner, "_run_vm", fake_run_vm)
    monkeypatch.setattr(runner, "make_disk", lambda p: (made.append(p), p.write_bytes(b"blank")))
    kernel = runner.Kernel(tmp_path, "6.1")
    rc = runner.boot("qemu", kernel, Path("initrd"), disk, share, 60, log, (),
                     scratch_disk=scratch)
    assert rc == 0 and len(attempts) == 2
    assert made == ([disk] if scratch else [])
    assert attempts[1] == (b"blank" if scratch else b"the caller's filesystem")
