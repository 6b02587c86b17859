#!/usr/bin/env python3
"""Run the tests that need kernel fs-verity inside a QEMU VM.

The build machines' kernel has no fs-verity, so this boots Debian's
bookworm-backports kernel (which has it) under QEMU with software emulation
and runs ``pytest -m vm tests/vm`` there, from this very checkout and venv:

* the kernel package is fetched with a private apt configuration (the host's
  apt sources and state are never touched) from the mirror the host's apt
  already uses, unpacked once and cached under
  ``${XDG_CACHE_HOME:-~/.cache}/composefs-py/vm/kernels/<package>_<version>``;
* a busybox initramfs (built here, no cpio/kmod needed) loads the modules and
  runs ``tests/vm/init.sh``;
* the host's ``/`` is shared read-only over 9p and the guest chroots into it,
  so every path (checkout, venv, Python) is the same inside and outside;
* a writable 9p share at the same path on both sides carries the guest
  script, the JUnit XML and the exit status back;
* a virtio disk carries an ext4 filesystem made here with
  ``mke2fs -O verity -b 4096``; the guest mounts it at ``/run/verity`` and
  sets ``COMPOSEFS_VERITY_SCRATCH=/run/verity`` for the tests.

Usage: ``.venv/bin/python tests/vm/run.py [pytest args]`` (arguments go to the
in-guest pytest; without a path argument it runs ``tests/vm``).  It prints one
PASS/FAIL/SKIP line per test and exits non-zero on any failure.

Exit status and skips: the run is skipped (exit 0, a loud ``SKIP`` line) only
when QEMU cannot start at all (no ``qemu-system-x86_64`` binary, or the binary
cannot even start a machine with TCG).  Everything after that is a failure:
no apt mirror, a kernel download that fails with no cached kernel to fall back
on, a guest that does not boot or times out, a test that fails or errors, or
no test run at all.  ``COMPOSEFS_VM_REQUIRE=1`` turns the skip into a failure
too (for CI machines that must run these tests).

Environment knobs: ``COMPOSEFS_VM_CACHE`` (cache dir), ``COMPOSEFS_VM_TIMEOUT``
(guest wall-clock limit in seconds, default 480), ``COMPOSEFS_VM_KERNEL_DEB``
(use this kernel .deb instead of downloading one), ``COMPOSEFS_VM_MEM`` (MiB,
default 1536), ``COMPOSEFS_VM_PYTHON`` (the guest's Python, default: the one
running this script), ``COMPOSEFS_VM_KEEP=1`` (keep the run directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import lzma
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
QEMU = "qemu-system-x86_64"
SUITE = "bookworm-backports"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# What the guest needs, by module name; their `depends=` are added automatically.
# crc32c_generic is only a soft dependency of ext4 (metadata checksums).
MODULES = ("virtio_blk", "loop", "crc32c_generic", "ext4", "erofs", "overlay",
           "9pnet_virtio", "9p")
DISK_MB = 512
GUEST_SCRATCH = "/run/verity"
MARK = "COMPOSEFS-VM:"


class Skip(Exception):
    """QEMU cannot run here at all."""


# QEMU's multi-threaded TCG now and then runs a stale translation of kernel
# code that the guest kernel live-patches (static keys, alternatives): a vCPU
# executes the temporary int3 after the patch is done, and the kernel dies with
# "Oops: int3" (seen in sched_clock_cpu while booting and in
# kmem_cache_alloc under systemd, about 1 boot in 100). User space cannot cause
# a kernel int3 trap, so such a boot is run once more; so is one whose kernel
# faulted in any way before user space printed. A panic that a broken init
# causes, or any other fault once user space runs, still fails the boot.
_INT3 = re.compile(r"^(?:\[[\s\d.]+\] )?Oops: int3\b", re.M)
_KERNEL_FAULT = re.compile(r"^(?:\[[\s\d.]+\] )?(?:Oops: |BUG: |general protection fault)", re.M)
# The first lines the kernel's exec of init, initramfs-tools, dracut, our
# initramfs hooks, the test units and tests/vm/init.sh print.
_USERSPACE = re.compile(r"^(?:\[[\s\d.]+\] )?(?:Run /init|Loading, please wait|Welcome to "
                        rf"|composefs[:-]|CFSTEST|{MARK})", re.M)


def emulator_fault(console: str) -> bool:
    """True if the guest kernel died of the emulator, not of what the boot ran."""
    if _INT3.search(console):
        return True
    m = _KERNEL_FAULT.search(console)
    return m is not None and _USERSPACE.search(console, 0, m.start()) is None


class HarnessError(Exception):
    """The harness could not do its job: a failure, not a skip."""


def say(msg: str) -> None:
    print(f"test-vm: {msg}", flush=True)


def cache_dir() -> Path:
    env = os.environ.get("COMPOSEFS_VM_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "composefs-py" / "vm"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise kernel/initramfs preparation between concurrent runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload,no-any-return]


# ---------------------------------------------------------------- kernel (apt)


def apt_mirror() -> str:
    """The Debian mirror the host's apt already uses for bookworm main."""
    res = run(["apt-cache", "policy"])
    for line in res.stdout.splitlines():
        f = line.split()
        if len(f) >= 3 and re.match(r"https?://", f[1]) and f[2] == "bookworm/main":
            return f[1]
    raise HarnessError("cannot find the host's Debian bookworm mirror in `apt-cache policy`")


class PrivateApt:
    """apt-get/apt-cache with their own sources, lists and cache under `root`."""

    def __init__(self, root: Path, mirror: str) -> None:
        self.root = root
        for d in ("lists/partial", "cache/archives/partial", "etc/sources.list.d",
                  "etc/preferences.d"):
            (root / d).mkdir(parents=True, exist_ok=True)
        sources = root / "etc/sources.list"
        sources.write_text(f"deb [signed-by={KEYRING}] {mirror} {SUITE} main\n")
        self.opts = [
            "-o", f"Dir::Etc::sourcelist={sources}",
            "-o", f"Dir::Etc::sourceparts={root / 'etc/sources.list.d'}",
            "-o", f"Dir::Etc::preferencesparts={root / 'etc/preferences.d'}",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root / 'cache'}",
        ]

    def update(self) -> None:
        res = run(["apt-get", *self.opts, "-q", "update"])
        if res.returncode != 0 or re.search(r"^(E:|W: Failed)", res.stderr, re.M):
            raise HarnessError(f"apt-get update ({SUITE}) failed: {res.stderr.strip()[-400:]}")

    def field(self, package: str, name: str) -> str:
        res = run(["apt-cache", *self.opts, "show", package])
        m = re.search(rf"^{name}: (.*)$", res.stdout, re.M)
        if res.returncode != 0 or m is None:
            raise HarnessError(f"apt-cache show {package}: no {name} ({res.stderr.strip()})")
        return m.group(1).strip()

    def download(self, package: str, dest: Path) -> Path:
        res = run(["apt-get", *self.opts, "-q", "download", package], cwd=dest)
        debs = sorted(dest.glob(f"{package}_*.deb"))
        if res.returncode != 0 or not debs:
            raise HarnessError(f"apt-get download {package} failed: {res.stderr.strip()[-400:]}")
        return debs[0]


@dataclass
class Kernel:
    root: Path  # the unpacked package: boot/, lib/modules/<release>/
    release: str

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def moddir(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def unpack_kernel(deb: Path, dest: Path) -> Kernel:
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        res = run(["dpkg-deb", "-x", str(deb), str(tmp)])
        if res.returncode != 0:
            raise HarnessError(f"dpkg-deb -x {deb.name}: {res.stderr.strip()}")
        (tmp / ".complete").write_text(deb.name + "\n")
        os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_kernel(dest)


def load_kernel(root: Path) -> Kernel:
    releases = sorted(p.name for p in (root / "lib" / "modules").iterdir())
    if len(releases) != 1 or not (root / "boot" / f"vmlinuz-{releases[0]}").is_file():
        raise HarnessError(f"{root}: not an unpacked kernel package")
    return Kernel(root, releases[0])


def cached_kernels(kdir: Path) -> list[Path]:
    if not kdir.is_dir():
        return []
    found = [p for p in kdir.iterdir() if (p / ".complete").is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def prepare_kernel(cache: Path) -> Kernel:
    """The cached kernel for the current backports version, fetching it if needed."""
    kdir = cache / "kernels"
    kdir.mkdir(parents=True, exist_ok=True)
    local = os.environ.get("COMPOSEFS_VM_KERNEL_DEB")
    if local:
        dest = kdir / Path(local).name.removesuffix(".deb")
        if not (dest / ".complete").is_file():
            say(f"unpacking {local}")
            return unpack_kernel(Path(local), dest)
        return load_kernel(dest)

    apt = PrivateApt(cache / "apt", apt_mirror())
    try:
        apt.update()
        # linux-image-amd64 depends on linux-image-<abi>-amd64; the -unsigned
        # twin has the same kernel without the signed-package indirection.
        dep = apt.field("linux-image-amd64", "Depends")
        m = re.match(r"(linux-image-[^\s,(]+)", dep)
        if m is None:
            raise HarnessError(f"unexpected linux-image-amd64 Depends: {dep}")
        package = m.group(1) + "-unsigned"
        version = apt.field(package, "Version")
    except HarnessError as e:
        cached = cached_kernels(kdir)
        if not cached:
            raise
        say(f"WARNING: {e}; using the cached kernel {cached[0].name}")
        return load_kernel(cached[0])

    dest = kdir / f"{package}_{version}"
    if (dest / ".complete").is_file():
        say(f"kernel {package} {version} (cached)")
        return load_kernel(dest)
    say(f"downloading {package} {version} from {SUITE}")
    t0 = time.monotonic()
    dl = Path(tempfile.mkdtemp(prefix=".download-", dir=kdir))
    try:
        deb = apt.download(package, dl)
        kernel = unpack_kernel(deb, dest)
    finally:
        shutil.rmtree(dl, ignore_errors=True)
    say(f"kernel {kernel.release} ready in {time.monotonic() - t0:.1f}s")
    # Keep only the newest kernel: each unpacked package is ~115 MB.
    for old in cached_kernels(kdir):
        if old != dest:
            shutil.rmtree(old, ignore_errors=True)
    return kernel


# ------------------------------------------------------------ kernel modules


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """The `.modinfo` section of an ELF64 little-endian kernel module."""
    if ko[:6] != b"\x7fELF\x02\x01":
        raise HarnessError("kernel module is not ELF64 little-endian")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, off, size = section(i)
        if ko[stroff + name:ko.index(b"\0", stroff + name)] == b".modinfo":
            for entry in ko[off:off + size].split(b"\0"):
                key, sep, value = entry.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
    return info


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        res = subprocess.run(["zstd", "-dcq", str(path)], capture_output=True, check=True)
        return res.stdout
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def module_name(filename: str) -> str:
    return filename.split(".ko", 1)[0].replace("-", "_")


def resolve_modules(kernel: Kernel, wanted: Sequence[str]) -> list[tuple[str, bytes]]:
    """(file name, uncompressed module) in load order, dependencies first."""
    index = {module_name(p.name): p for p in (kernel.moddir / "kernel").rglob("*.ko*")}
    builtin_file = kernel.moddir / "modules.builtin"
    builtin = {module_name(Path(line).name) for line in
               builtin_file.read_text().split()} if builtin_file.exists() else set()
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            raise HarnessError(f"kernel {kernel.release} has no module {name}")
        data = read_module(index[name])
        for deps in modinfo(data).get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep)
        order.append((f"{name}.ko", data))

    for name in wanted:
        visit(name)
    return order


# ----------------------------------------------------------------- initramfs


class Cpio:
    """A minimal "newc" cpio writer (what the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        fields = (self.ino, mode, 0, 0, 2 if mode & 0o170000 == 0o040000 else 1, 0,
                  len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(name.encode() + b"\0")
        self.buf.write(b"\0" * (-self.buf.tell() % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-self.buf.tell() % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def is_static_elf(data: bytes) -> bool:
    """An ELF64 executable without a program interpreter (PT_INTERP)."""
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return all(struct.unpack_from("<I", data, phoff + i * phentsize)[0] != 3
               for i in range(phnum))


def find_busybox() -> bytes:
    # The initramfs has no libraries: busybox must be static.
    for cand in ("/bin/busybox", "/usr/bin/busybox"):
        p = Path(cand)
        if p.is_file() and is_static_elf(data := p.read_bytes()):
            return data
    raise HarnessError("no static busybox (Debian package busybox-static)")


def prepare_initramfs(cache: Path, kernel: Kernel) -> Path:
    init = (HERE / "init.sh").read_bytes()
    bb = find_busybox()
    key = hashlib.sha256(b"\0".join([
        init, bb, str(kernel.root).encode(), " ".join(MODULES).encode(),
        Path(__file__).read_bytes(),
    ])).hexdigest()[:16]
    path = cache / f"initramfs-{key}.cpio.gz"
    if path.is_file():
        return path
    cpio = Cpio()
    for d in ("bin", "dev", "modules", "proc", "sys", "tmp", "host"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.file("bin/busybox", bb, 0o755)
    cpio.file("init", init, 0o755)
    mods = resolve_modules(kernel, MODULES)
    for name, data in mods:
        cpio.file(f"modules/{name}", data)
    cpio.file("modules/order", "".join(f"{n}\n" for n, _ in mods).encode())
    for old in cache.glob("initramfs-*.cpio.gz"):
        old.unlink(missing_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(gzip.compress(cpio.finish(), compresslevel=1))
    os.rename(tmp, path)
    say(f"initramfs with modules: {' '.join(n.removesuffix('.ko') for n, _ in mods)}")
    return path


# --------------------------------------------------------------------- qemu


def probe_qemu() -> str:
    """The QEMU binary, or Skip when it cannot start a (TCG) machine at all."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        raise Skip(f"{QEMU} not found (Debian package qemu-system-x86)")
    try:
        res = subprocess.run(
            [qemu, "-machine", "none", "-accel", "tcg", "-nodefaults", "-display", "none",
             "-qmp", "stdio"],
            input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
            capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise Skip(f"{QEMU} cannot start: {e}") from e
    if res.returncode != 0:
        raise Skip(f"{QEMU} cannot start: {res.stderr.strip()[-300:]}")
    return qemu


def make_disk(path: Path) -> None:
    mke2fs = shutil.which("mke2fs") or "/usr/sbin/mke2fs"
    with open(path, "wb") as f:
        f.truncate(DISK_MB << 20)
    # 4 KiB blocks: with 1 KiB blocks (mke2fs' choice for small disks)
    # FS_IOC_ENABLE_VERITY fails, as fs-verity needs block size == page size here.
    res = run([mke2fs, "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "verity",
               "-L", "cfsverity", str(path)])
    if res.returncode != 0:
        raise HarnessError(f"mke2fs -O verity failed: {res.stderr.strip()}")


def guest_python() -> str:
    """The Python the guest runs pytest with (the same file, seen through 9p)."""
    python = os.environ.get("COMPOSEFS_VM_PYTHON") or sys.executable
    # Fail in a second here rather than after a boot.
    res = run([python, "-c", "import pytest, composefs"], cwd=REPO)
    if res.returncode != 0:
        raise HarnessError(f"{python} cannot import pytest and composefs (run with the "
                           f"project's venv: .venv/bin/python tests/vm/run.py): "
                           f"{(res.stderr.strip().splitlines() or ['?'])[-1]}")
    return python


def precompile(python: str) -> None:
    """Refresh the project's bytecode on the host: the checkout is read-only
    in the guest, where compiling a stale module costs seconds in every new
    process (a syntax error here is left for the tests to report)."""
    run([python, "-m", "compileall", "-q", "-j", "0", str(REPO / "src"), str(HERE)])


# The guest mounts fresh tmpfs over these (init.sh): host paths below them
# are hidden there unless init.sh bind-mounts them back (cfs.keep=).
GUEST_TMPFS = ("/tmp", "/run")


def keep_paths(python: str | None = None) -> list[str]:
    """The host paths the guest needs that lie under `GUEST_TMPFS`: the
    checkout and the Python (its venv and its installation), outermost
    only, so `make test-vm` works from a checkout anywhere, /tmp too."""
    python = python or sys.executable
    candidates = [REPO.resolve(), Path(python).absolute().parent.parent,
                  Path(python).resolve().parent.parent]
    under = [p for p in candidates
             if any(p == Path(t) or Path(t) in p.parents for t in GUEST_TMPFS)]
    out: list[Path] = []
    for p in sorted(set(under), key=lambda q: len(q.parts)):
        if any(q == p or q in p.parents for q in out):
            continue
        if re.search(r"[\s:]", str(p)):
            raise HarnessError(f"cannot share {p} with the VM: the path has a space or ':'")
        out.append(p)
    return [str(p) for p in out]


def guest_script(share: Path, pytest_args: Sequence[str], python: str | None = None) -> str:
    python = python or sys.executable
    args = list(pytest_args)
    if not any((REPO / a.split("::")[0]).exists() for a in args if not a.startswith("-")):
        args.append("tests/vm")
    env = {
        "PATH": f"{Path(python).parent}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",  # the checkout is read-only in the guest
        "PYTHONUNBUFFERED": "1",
        "COMPOSEFS_VERITY_SCRATCH": GUEST_SCRATCH,
        "COMPOSEFS_IN_VM": "1",
    }
    cmd = [python, "-m", "pytest", "-p", "no:cacheprovider", "-m", "vm", "-v",
           "--color=no", "--durations=5", "--timeout=180", f"--junitxml={share / 'junit.xml'}", *args]
    lines = ["# written by tests/vm/run.py; runs chrooted into the host's / in the VM",
             f"cd {shlex.quote(str(REPO))} || {{ echo 'COMPOSEFS-VM: SETUP-FAIL the checkout "
             f"{shlex.quote(str(REPO))} is not visible in the guest'; exit 98; }}",
             *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
             shlex.join(cmd)]
    return "\n".join(lines) + "\n"


def boot(qemu: str, kernel: Kernel, initramfs: Path, disk: Path, share: Path,
         timeout: float, log: Path, keep: Sequence[str] = (), scratch_disk: bool = True) -> int:
    """Boot the VM, echo its console, return the exit status the guest reported.

    A guest killed by the emulator fault is booted once more: on a fresh
    `disk` if it is our scratch disk, else (a disk the caller filled, e.g.
    examples/provision.py's image) on the same one."""
    mem = os.environ.get("COMPOSEFS_VM_MEM", "1536")
    cmdline = (f"console=ttyS0 panic=-1 quiet loglevel=4 8250.nr_uarts=1 "
               f"cfs.out={share} cfs.script={share / 'guest.sh'}")
    if keep:
        cmdline += f" cfs.keep={':'.join(keep)}"
    cmd = [qemu, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2", "-m", mem,
           "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
           "-monitor", "none",
           "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs), "-append", cmdline,
           "-drive", f"file={disk},if=virtio,format=raw,cache=unsafe",
           "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                      "multidevs=remap",
           "-virtfs", f"local,path={share},mount_tag=results,security_model=none"]
    for attempt in (1, 2):
        rc, timed_out, returncode = _run_vm(cmd, timeout, log)
        if rc is not None or timed_out or attempt == 2 \
                or not emulator_fault(log.read_text(errors="replace")):
            break
        crashed = log.with_name(f"{log.stem}-kernel-fault{log.suffix}")
        log.rename(crashed)
        say(f"the guest kernel died of a QEMU/TCG fault, not of the tests; running them once "
            f"more{' on a fresh disk' if scratch_disk else ''}. Crash log: {crashed}")
        if scratch_disk:
            make_disk(disk)
        (share / "junit.xml").unlink(missing_ok=True)
    if timed_out:
        raise HarnessError(f"the VM did not finish within {timeout:.0f}s "
                           f"(COMPOSEFS_VM_TIMEOUT); console log: {log}")
    if rc is None:
        raise HarnessError(f"the VM stopped (qemu exit {returncode}) without "
                           f"reporting a result; console log: {log}")
    return rc


def _run_vm(cmd: Sequence[str], timeout: float, log: Path) -> tuple[int | None, bool, int]:
    """Run QEMU, echoing and logging its console: (guest's rc, timed out, qemu's exit)."""
    rc: int | None = None
    timed_out = threading.Event()
    with open(log, "w") as logf, subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT) as proc:

        def kill() -> None:
            timed_out.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace").rstrip("\r\n").replace("\r", "")
                logf.write(line + "\n")
                print(f"  vm| {line}", flush=True)
                m = re.match(rf"{MARK} RC (\d+)", line)
                if m:
                    rc = int(m.group(1))
            proc.wait()
        finally:
            timer.cancel()
    return rc, timed_out.is_set(), proc.returncode


# ------------------------------------------------------------------- report


def node_id(classname: str, name: str) -> str:
    """pytest's node id (tests/x/test_y.py::Class::name) from JUnit's dotted classname."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (REPO / path).is_file():
            return "::".join([path, *parts[i:], name])
    return f"{classname}::{name}"


def report(junit: Path) -> tuple[int, int, int]:
    """Print one line per test; return (passed, failed, skipped)."""
    counts = [0, 0, 0]
    if not junit.is_file():
        raise HarnessError("the guest wrote no JUnit XML (pytest did not run)")
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = node_id(case.get("classname", ""), case.get("name", ""))
        outcome = "PASS"
        detail = ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "FAIL", "error": "ERROR", "skipped": "SKIP"}[child.tag]
                detail = next(iter((child.get("message") or "").splitlines()), "")[:200]
                break
        counts[{"PASS": 0, "SKIP": 2}.get(outcome, 1)] += 1
        print(f"test-vm: {outcome:5} {name}{f'  ({detail})' if detail else ''}", flush=True)
    return counts[0], counts[1], counts[2]


def main(argv: Sequence[str] | None = None) -> int:
    pytest_args = list(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()
    try:
        qemu = probe_qemu()
    except Skip as e:
        if os.environ.get("COMPOSEFS_VM_REQUIRE") == "1":
            say(f"FAIL: {e} (COMPOSEFS_VM_REQUIRE=1)")
            return 1
        say("=" * 70)
        say(f"SKIP: the fs-verity VM tests did NOT run: {e}")
        say("=" * 70)
        return 0

    cache = cache_dir()
    keep = os.environ.get("COMPOSEFS_VM_KEEP") == "1"
    rundir: Path | None = None
    try:
        python = guest_python()
        precompile(python)
        with locked(cache / "lock"):
            kernel = prepare_kernel(cache)
            initramfs = prepare_initramfs(cache, kernel)
        runs = cache / "runs"
        runs.mkdir(exist_ok=True)
        for old in runs.iterdir():  # leftovers of killed runs, older than a day
            if time.time() - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)
        rundir = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
        if re.search(r"\s", str(rundir)):
            raise HarnessError(f"the cache path must not contain whitespace: {rundir}")
        share = rundir / "share"
        share.mkdir()
        disk = rundir / "disk.img"
        make_disk(disk)
        (share / "guest.sh").write_text(guest_script(share, pytest_args, python))
        timeout = float(os.environ.get("COMPOSEFS_VM_TIMEOUT", "480"))
        say(f"booting {kernel.release} under QEMU/TCG (prepared in {time.monotonic() - t0:.1f}s)")
        rc = boot(qemu, kernel, initramfs, disk, share, timeout, rundir / "console.log",
                  keep_paths(python))
        passed, failed, skipped = report(share / "junit.xml")
    except HarnessError as e:
        say(f"FAIL: {e}")
        if rundir is not None:
            say(f"run directory kept for inspection: {rundir}")
        return 1
    wall = time.monotonic() - t0
    ok = rc == 0 and failed == 0 and passed > 0
    say(f"{'PASSED' if ok else 'FAILED'}: {passed} passed, {failed} failed, {skipped} skipped "
        f"(pytest rc {rc}) in {wall:.1f}s")
    if ok and not keep:
        shutil.rmtree(rundir, ignore_errors=True)
    else:
        say(f"run directory: {rundir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
