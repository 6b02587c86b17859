"""mount.composefs: mount a composefs image (compatible with C composefs 1.0.8).

    mount.composefs [-t composefs] [-o OPTIONS] IMAGE TARGET

Also works as a mount(8) helper (``mount -t composefs IMAGE TARGET -o ...``),
which calls it as ``mount.composefs IMAGE TARGET [-s] [-f] [-n] [-v]
[-N NS] -o OPTIONS``: options may follow the positional arguments, and the
generic flags mount(8) adds (``rw``, ``noatime``, ``nosuid``, ...) are
accepted.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from ._util import add_version, run

PROG = "mount.composefs"

USAGE_EXTRA = """\
Example:
  mount.composefs -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage
or, as a mount helper:
  mount -t composefs -o basedir=/composefs/objects exampleimage.cfs /mnt/exampleimage

Supported options (comma-separated; escape a comma in a value as \\,):
  basedir=PATH[:PATH]    Specify location of basedir(s)
  digest=DIGEST          Specify required image digest (implies verity; refused
                         where the kernel cannot measure the image's fs-verity)
  insecure               With digest=: if the kernel cannot measure fs-verity,
                         check the digest in userspace and mount without verity
  idmap=PATH             Specify path to a user namespace whose ID mapping should be used
  verity                 Require all files to have specified and valid fs-verity digests
  tryverity              If supported by kernel, require fs-verity (with digest=:
                         like insecure where the kernel has no fs-verity)
  ro                     Read only
  rw                     Read/write
  upperdir=PATH          Overlayfs upperdir
  workdir=PATH           Overlayfs workdir
  nosuid, nodev, noexec, noatime, relatime, strictatime, nodiratime, nosymfollow
                         Generic mount flags
"""

# Flags mount(8) may pass that mean "the default" here or only concern
# mount(8)/fstab itself; accepted and ignored, like other helpers do.
_IGNORED = frozenset(
    {
        "defaults", "auto", "noauto", "nofail", "user", "nouser", "users", "owner",
        "group", "_netdev", "suid", "dev", "exec", "atime", "diratime", "symfollow",
        "async", "silent", "loud", "nomand", "nolazytime", "nostrictatime", "norelatime",
    }
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # C mount.composefs exits 1 on usage errors.
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{PROG}: {message}\n")
        raise SystemExit(1)


def split_options(options: str) -> list[tuple[str, str | None]]:
    """Split ``a=b,c,d=e\\,f`` into [(key, value|None)], as C does: commas
    escaped with a backslash do not separate, and backslashes are removed
    from values."""
    out: list[tuple[str, str | None]] = []
    i, n = 0, len(options)
    while i < n:
        key: list[str] = []
        value: list[str] | None = None
        while i < n:
            c = options[i]
            if c == "\\" and i + 1 < n:
                (key if value is None else value).append(options[i + 1])
                i += 2
                continue
            i += 1
            if c == ",":
                break
            if c == "=" and value is None:
                value = []
                continue
            (key if value is None else value).append(c)
        k = "".join(key)
        if k or value is not None:
            out.append((k, None if value is None else "".join(value)))
    return out


@dataclass
class MountRequest:
    basedirs: list[str] = field(default_factory=list)
    digest: str | None = None
    verity: bool = False
    try_verity: bool = False
    insecure: bool = False
    upperdir: str | None = None
    workdir: str | None = None
    idmap: str | None = None
    readonly: bool = False
    attributes: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def parse_mount_options(options: str, *, sloppy: bool = False) -> MountRequest:
    """Interpret a mount.composefs ``-o`` string (raises MountError)."""
    from ..errors import MountError
    from ..mount import MOUNT_ATTRIBUTES

    req = MountRequest()
    basedir: str | None = None
    valued = {"basedir", "digest", "upperdir", "workdir", "idmap"}
    for key, value in split_options(options):
        if key in valued and value is None:
            raise MountError(f"no value specified for {key} option")
        if key == "basedir":
            basedir = value
        elif key == "digest":
            req.digest = value
        elif key == "verity":
            req.verity = True
        elif key == "tryverity":
            req.try_verity = True
        elif key == "insecure" and value is None:
            req.insecure = True
        elif key == "upperdir":
            req.upperdir = value
        elif key == "workdir":
            req.workdir = value
        elif key == "idmap":
            req.idmap = value
        elif key == "rw":
            req.readonly = False
        elif key == "ro":
            req.readonly = True
        elif key in MOUNT_ATTRIBUTES and value is None:
            req.attributes.append(key)
        elif (key in _IGNORED and value is None) or key.startswith("x-") or key == "comment":
            req.ignored.append(key)
        elif sloppy:
            req.ignored.append(key)
        else:
            raise MountError(f"unsupported option {key}")
    if basedir is not None:
        parts = basedir.split(":")
        if any(not p for p in parts):
            raise MountError("value for basedir option has incorrect format")
        req.basedirs = parts
    if not req.basedirs:
        raise MountError("no object dirs specified (use -o basedir=PATH)")
    if (req.upperdir is None) != (req.workdir is None):
        raise MountError("both workdir and upperdir must be specified if used")
    return req


def _enter_mount_namespace(ns: str) -> None:
    """Switch to another mount namespace (mount(8) -N): a PID or a path."""
    import ctypes

    from ..errors import MountError

    path = f"/proc/{ns}/ns/mnt" if ns.isdigit() else ns
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise MountError(f"cannot open mount namespace {path}: {e.strerror}") from None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        clone_newns = 0x00020000
        if libc.setns(fd, clone_newns) != 0:
            err = ctypes.get_errno()
            raise MountError(f"cannot enter mount namespace {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        usage=f"{PROG} [-t type] [-o opt[,opts..]] IMAGE MOUNTPOINT",
        description="Mount a composefs image (EROFS metadata + overlayfs over object dirs).",
        epilog=USAGE_EXTRA,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(p)
    p.add_argument("-t", dest="fstype", metavar="TYPE", help="filesystem type (composefs)")
    p.add_argument(
        "-o", dest="options", metavar="OPTIONS", action="append", default=[],
        help="comma-separated mount options (may be repeated)",
    )  # fmt: skip
    p.add_argument("-s", dest="sloppy", action="store_true", help="ignore unknown options")
    p.add_argument("-f", dest="fake", action="store_true", help="check everything, mount nothing")
    p.add_argument("-n", dest="nomtab", action="store_true", help="accepted (no mtab is written)")
    p.add_argument("-v", dest="verbose", action="store_true", help="describe what is done")
    p.add_argument("-N", dest="namespace", metavar="NS", help="mount namespace (PID or path)")
    p.add_argument("image", metavar="IMAGE", help="composefs (EROFS) image file")
    p.add_argument("target", metavar="MOUNTPOINT", help="directory to mount on")
    return p


def _main(argv: Sequence[str]) -> int:
    from ..errors import MountError

    args = build_parser().parse_args(argv)
    if args.fstype is not None and args.fstype != "composefs":
        if not args.fstype.startswith("composefs."):
            raise MountError(f"unsupported fs type '{args.fstype}'")
    req = parse_mount_options(",".join(args.options), sloppy=args.sloppy)
    if args.namespace is not None:
        _enter_mount_namespace(args.namespace)

    from ..mount import mount_composefs

    if args.verbose and req.ignored:
        print(f"{PROG}: ignoring options: {','.join(req.ignored)}")
    if args.fake:
        # mount -f: validate without mounting (the image must still open).
        with open(args.image, "rb"):
            pass
        return 0
    mount_composefs(
        args.image,
        args.target,
        req.basedirs,
        digest=req.digest,
        verity=req.verity,
        try_verity=req.try_verity,
        upperdir=req.upperdir,
        workdir=req.workdir,
        readonly=req.readonly,
        idmap=req.idmap,
        attributes=req.attributes,
        insecure=req.insecure,
    )
    if args.verbose:
        print(f"{PROG}: {args.image} mounted on {args.target}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
