"""composefs-setup-root: mount the composefs image named on the kernel
command line as the new root, in the initramfs (composefs-rs 0.7.0
``composefs-setup-root``).

Usage::

    composefs-setup-root [--sysroot /sysroot]
        [--config /usr/lib/composefs/setup-root-conf.toml]
        [--root-fs PATH] [--cmdline STR] [--target PATH] [CMD...]

1. Every ``composefs.digest=[?]vN-<alg>-12:<hex>`` and ``composefs=[?]<hex>``
   karg, in order; the first whose image exists in ``<sysroot>/composefs``
   is mounted (``?``: the repository need not have fs-verity).
2. The image goes over ``<sysroot>`` (the kernels this targets cannot
   assemble a detached tree, composefs-rs's ``pre-6.15`` default); the old
   sysroot is bind-mounted at ``<new root>/sysroot``.
3. ``/etc`` is an overlay (upper/work in ``state/deploy/<hex>/etc``), ``/var``
   a bind mount of ``state/deploy/<hex>/var``, per the config file::

       [root]  transient = false   # tmpfs overlay over the whole root
       [etc]   mount = "overlay"   # none | bind | overlay | transient
       [var]   mount = "bind"      # (or transient = true)

``--root-fs`` (testing) bind-mounts a directory instead of the image and
``--cmdline`` replaces ``/proc/cmdline``; ``--target`` and CMD are accepted
and ignored, as in composefs-rs. If a step fails, the mounts made so far are
undone.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import BootError, ComposefsError, NotFoundError
from ._util import add_version, run

PROG = "composefs-setup-root"
MOUNT_TYPES = ("none", "bind", "overlay", "transient")
DEFAULT_CONFIG = "/usr/lib/composefs/setup-root-conf.toml"


@dataclass
class MountConfig:
    mount: str | None = None
    transient: bool = False

    def effective(self, default: str) -> str:
        if self.mount is not None:
            return self.mount
        return "transient" if self.transient else default


@dataclass
class Config:
    root_transient: bool = False
    etc: MountConfig | None = None
    var: MountConfig | None = None


def parse_config(text: str) -> Config:
    """The setup-root TOML (unknown keys are ignored, like composefs-rs)."""
    import tomllib

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BootError(f"config: {e}") from None

    def table(name: str) -> dict[str, Any]:
        t = data.get(name, {})
        if not isinstance(t, dict):
            raise BootError(f"config: [{name}] must be a table")
        return t

    def boolean(t: dict[str, Any], section: str) -> bool:
        v = t.get("transient", False)
        if not isinstance(v, bool):
            raise BootError(f"config: {section}.transient must be a boolean")
        return v

    def mount_config(section: str) -> MountConfig:
        t = table(section)
        m = t.get("mount")
        if m is not None and m not in MOUNT_TYPES:
            raise BootError(
                f"config: {section}.mount must be one of {', '.join(MOUNT_TYPES)} (got {m!r})"
            )
        return MountConfig(m, boolean(t, section))

    return Config(boolean(table("root"), "root"), mount_config("etc"), mount_config("var"))


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return Config()
    except UnicodeDecodeError:
        raise BootError(f"config {path}: not UTF-8") from None
    return parse_config(text)


class _Mounts:
    """Mount helpers that remember what they attached (undone on failure)."""

    def __init__(self) -> None:
        self.attached: list[str] = []

    def attach(self, mnt_fd: int, target: str) -> None:
        from ..mount import mount_at

        try:
            mount_at(mnt_fd, target)
        finally:
            os.close(mnt_fd)
        self.attached.append(target)

    def bind(self, source: str, target: str) -> None:
        from ..mount import AT_EMPTY_PATH, OPEN_TREE_CLONE, open_tree

        fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mnt = open_tree(fd, "", OPEN_TREE_CLONE | AT_EMPTY_PATH | os.O_CLOEXEC)
        finally:
            os.close(fd)
        self.attach(mnt, target)

    def overlay(self, lower: str, upper: str, work: str, source: str, target: str) -> None:
        from ..mount import FsContext, _mount_error

        with FsContext("overlay") as ctx:
            try:
                ctx.set_string("source", source)
                ctx.set_string("lowerdir", lower)
                ctx.set_string("upperdir", upper)
                ctx.set_string("workdir", work)
                ctx.create()
                mnt = ctx.mount()
            except OSError as e:
                raise _mount_error(f"overlay on {target}", e, ctx) from None
        self.attach(mnt, target)

    def tmpfs(self) -> int:
        from ..mount import FsContext

        with FsContext("tmpfs") as ctx:
            ctx.create()
            return ctx.mount()

    def undo(self) -> None:
        from ..mount import MNT_DETACH, sys_umount2

        for target in reversed(self.attached):
            try:
                sys_umount2(target, MNT_DETACH)
            except OSError:
                pass
        self.attached.clear()


def _ensure_dir(path: str, mode: int) -> str:
    try:
        os.mkdir(path, mode)
        os.chmod(path, mode)  # not subject to the umask
    except FileExistsError:
        pass
    return path


def _overlay_state(m: _Mounts, base: str, state: str, source: str) -> None:
    # upper 0755: the merged view takes upperdir's mode (composefs-rs #287);
    # work is kernel-internal.
    upper = _ensure_dir(os.path.join(state, "upper"), 0o755)
    work = _ensure_dir(os.path.join(state, "work"), 0o700)
    m.overlay(base, upper, work, source, base)


def _overlay_transient(m: _Mounts, base: str) -> None:
    mnt = m.tmpfs()
    try:
        tmp = f"/proc/self/fd/{mnt}"
        _overlay_state(m, base, tmp, "transient")
    finally:
        os.close(mnt)  # the overlay keeps the (detached) tmpfs alive


def _mount_subdir(m: _Mounts, new_root: str, state: str, subdir: str, mount_type: str) -> None:
    target = os.path.join(new_root, subdir)
    if mount_type == "none":
        return
    if mount_type == "bind":
        m.bind(os.path.join(state, subdir), target)
    elif mount_type == "overlay":
        sub_state = os.path.join(state, subdir)
        if not os.path.isdir(sub_state):
            raise BootError(f"state directory {sub_state} does not exist")
        _overlay_state(m, target, sub_state, "overlay")
    else:
        _overlay_transient(m, target)


def _gpt_workaround() -> None:
    """systemd's gpt-auto wants /run/systemd/volatile-root (systemd #35017)."""
    st = os.stat("/dev/gpt-auto-root")
    target = f"/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    os.symlink(target, "/run/systemd/volatile-root")


def _mount_image(
    m: _Mounts, sysroot_path: str, hex_id: str, insecure: bool, target: str, shown: str
) -> bool:
    """Mount images/<hex_id> of <sysroot>/composefs at target; False if
    absent. `shown` is the sysroot's path for messages."""
    from ..repository import Repository

    algorithm = {64: "sha256", 128: "sha512"}.get(len(hex_id))
    if algorithm is None:
        raise BootError(f"Invalid composefs digest length: {len(hex_id)}")
    repo = Repository.open(
        os.path.join(sysroot_path, "composefs"),
        upgrade=False,
        insecure=insecure,
        require_verity=not insecure,
        hash=algorithm,
    )
    try:
        try:
            repo.mount(hex_id, target)
        except NotFoundError:
            return False
        except ComposefsError as e:
            raise BootError(
                f"Failed to mount composefs image {hex_id} from {shown}/composefs: {e}"
            ) from None
    finally:
        repo.close()
    m.attached.append(target)
    return True


def setup_root(args: argparse.Namespace) -> None:
    from ..boot.cmdline import parse_composefs_kargs

    config = load_config(args.config)
    sysroot = args.sysroot
    try:
        sysroot_fd = os.open(sysroot, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise BootError(f"Failed to open sysroot {sysroot}: {e.strerror}") from None
    m = _Mounts()
    try:
        if args.cmdline is not None:
            cmdline = args.cmdline
        else:
            with open("/proc/cmdline", encoding="utf-8", errors="surrogateescape") as f:
                cmdline = f.read()
        kargs = parse_composefs_kargs(cmdline)
        if not kargs:
            raise BootError(
                "no composefs karg found in the kernel command line "
                "(want composefs=<digest> or composefs.digest=…)"
            )
        # The old sysroot stays reachable through this fd after the new
        # root covers its path; the clone becomes <new root>/sysroot.
        from ..mount import AT_EMPTY_PATH, OPEN_TREE_CLONE, open_tree

        old = f"/proc/self/fd/{sysroot_fd}"
        sysroot_clone = open_tree(sysroot_fd, "", OPEN_TREE_CLONE | AT_EMPTY_PATH | os.O_CLOEXEC)
        image_addr = kargs[0][0]
        try:
            if args.root_fs is not None:
                m.bind(args.root_fs, sysroot)
            else:
                for i, (addr, insecure) in enumerate(kargs):
                    if _mount_image(m, old, addr, insecure, sysroot, sysroot):
                        image_addr = addr
                        break
                    if i + 1 < len(kargs):
                        sys.stderr.write(f"composefs: image {addr} not found, trying next karg\n")
                else:
                    tried = ", ".join(a for a, _ in kargs)
                    raise BootError(
                        f"no composefs image found in {sysroot}/composefs/images "
                        f"(tried: {tried})"
                    )
            if config.root_transient:
                _overlay_transient(m, sysroot)
            target = os.path.join(sysroot, "sysroot")
            if os.path.isdir(target):
                m.attach(sysroot_clone, target)
                sysroot_clone = -1
        finally:
            if sysroot_clone >= 0:
                os.close(sysroot_clone)
        state = os.path.join(old, "state", "deploy", image_addr)
        if not stat.S_ISDIR(os.stat(state).st_mode):
            raise BootError(f"{state} is not a directory")
        etc = config.etc or MountConfig()
        var = config.var or MountConfig()
        _mount_subdir(m, sysroot, state, "etc", etc.effective("overlay"))
        _mount_subdir(m, sysroot, state, "var", var.effective("bind"))
    except FileNotFoundError as e:
        m.undo()
        raise BootError(f"{e.filename}: {e.strerror}") from None
    except BaseException:
        m.undo()
        raise
    finally:
        os.close(sysroot_fd)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Mount the composefs image named on the kernel command line."
    )
    add_version(p)
    p.add_argument("cmd", nargs="*", help="ignored (composefs-rs testing hook)")
    p.add_argument("--sysroot", default="/sysroot", help="sysroot directory in the initramfs")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (TOML)")
    p.add_argument("--root-fs", help="bind-mount this directory as the new root (testing)")
    p.add_argument("--cmdline", help="kernel command line (testing; default /proc/cmdline)")
    p.add_argument("--target", help="ignored (composefs-rs testing option)")
    return p


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        _gpt_workaround()
    except OSError:
        pass  # best effort
    setup_root(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
