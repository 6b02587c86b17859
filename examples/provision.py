#!/usr/bin/env python3
"""Enable fs-verity on a disk image's composefs repository, in a VM.

    provision.py DISK [REPO-PATH-ON-DISK]   (default /composefs)

The build machine's kernel may lack fs-verity and ``mke2fs -d`` does not
carry it, so the repository on a freshly made ext4 (-O verity) image is
insecure. This boots the fs-verity test VM of tests/vm/run.py (Debian's
bookworm-backports kernel, the host's / shared read-only over 9p) with DISK
as its virtio disk and runs ``cfsctl enable-verity`` on the repository
there: one Python process, every object checked against its name, then
meta.json, which makes the repository secure.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "vm"))
import run as vm  # noqa: E402  (the fs-verity VM harness: kernel cache, initramfs, boot)


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    disk = Path(argv[0]).resolve()
    repo_path = argv[1] if len(argv) > 1 else "/composefs"
    t0 = time.monotonic()
    try:
        qemu = vm.probe_qemu()
        cache = vm.cache_dir()
        python = sys.executable
        vm.precompile(python)
        with vm.locked(cache / "lock"):
            kernel = vm.prepare_kernel(cache)
            initramfs = vm.prepare_initramfs(cache, kernel)
        runs = cache / "runs"
        runs.mkdir(parents=True, exist_ok=True)
        rundir = Path(tempfile.mkdtemp(prefix="provision-", dir=runs))
        share = rundir / "share"
        share.mkdir()
        target = vm.GUEST_SCRATCH + "/" + repo_path.strip("/")
        script = "\n".join([
            f"cd {shlex.quote(str(REPO))} || exit 98",
            f"export PYTHONDONTWRITEBYTECODE=1 PATH={shlex.quote(str(Path(python).parent))}:/usr/sbin:/usr/bin:/sbin:/bin",
            f"{shlex.quote(python)} -m composefs.cli.cfsctl --repo {shlex.quote(target)} enable-verity",
        ]) + "\n"
        (share / "guest.sh").write_text(script)
        timeout = float(os.environ.get("COMPOSEFS_VM_TIMEOUT", "900"))
        # the checkout and venv may lie under the guest's fresh /tmp or /run
        # Not a scratch disk: a second boot after an emulator fault must
        # find the repository where the first left it, not a blank disk.
        rc = vm.boot(qemu, kernel, initramfs, disk, share, timeout, rundir / "console.log",
                     vm.keep_paths(python), scratch_disk=False)
    except (vm.Skip, vm.HarnessError) as e:
        print(f"provision: error: {e}", file=sys.stderr)
        return 1
    shutil.rmtree(rundir, ignore_errors=True)
    print(f"provision: rc {rc} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
