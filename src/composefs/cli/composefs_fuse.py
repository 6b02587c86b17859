"""composefs-fuse: mount a composefs image with FUSE (C composefs 1.0.8's tool).

    composefs-fuse [options] -o source=IMAGE[,basedir=DIR] MOUNTPOINT

Options as C's ``tools/cfs-fuse.c`` (its libfuse command line): ``-f``
foreground, ``-d`` debug (implies ``-f``), ``-s`` single-threaded (always
true here), ``-h``/``--help``, ``-V``/``--version``; ``-o`` takes
``source=``, ``basedir=`` (here also ``DIR:DIR…``), ``allow_other``,
``fsname=``, ``noexec``, ``noatime``; libfuse's tuning options (``clone_fd``,
``max_read=``, ``noacl``…) are accepted and ignored.
Not in the foreground it returns once mounted and serves from a daemon.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from ..errors import UsageError
from ._util import run

PROG = "composefs-fuse"

_HELP = f"""\
usage: {PROG} [options] <mountpoint>

    -h   --help            print help
    -V   --version         print version
    -d   -o debug          enable debug output (implies -f)
    -f                     foreground operation
    -s                     disable multi-threaded operation
    -o source=IMAGE        composefs image to mount (required)
    -o basedir=DIR[:DIR]   where the image's external files live
    -o allow_other         let other users see the mount
    -o fsname=NAME         the mount's source name (default: the image path)
    -o noexec, noatime     generic mount flags
    -o nopassthrough       serve file data from this process even as root
                           (root mounts otherwise let the kernel read the
                           verified objects directly: FUSE passthrough)
"""

# libfuse options that only tune libfuse's own loop or restate what we do
# anyway: accepted and ignored.
_IGNORED = ("clone_fd", "max_idle_threads=", "max_threads=", "max_read=", "noacl", "ro",
            "default_permissions", "nosuid", "nodev", "auto_unmount", "subtype=")  # fmt: skip
# Mount options passed on to the mount.
_PASSED = ("allow_other", "noexec", "noatime")


def _split(value: str) -> list[str]:
    """Split at unescaped commas (libfuse's rule: backslash escapes)."""
    out: list[str] = []
    cur: list[str] = []
    it = iter(value)
    for ch in it:
        if ch == "\\":
            cur.append(next(it, ""))
        elif ch == ",":
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [o for o in out if o]


def _main(argv: Sequence[str]) -> int:
    foreground = debug = False
    passthrough = True
    source = fsname = None
    basedirs: list[str] = []
    mount_options: list[str] = []
    mountpoint = None
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        i += 1
        if a in ("-h", "--help"):
            sys.stdout.write(_HELP)
            return 0
        if a in ("-V", "--version"):
            from importlib.metadata import version

            print(f"{PROG} (composefs for Python) {version('composefs')}")
            return 0
        if a == "-f":
            foreground = True
        elif a == "-d":
            debug = True
        elif a == "-s":
            pass
        elif a.startswith("-o"):
            value = a[2:]
            if not value:
                if i >= len(args):
                    raise UsageError("missing argument after -o")
                value = args[i]
                i += 1
            for opt in _split(value):
                key, eq, val = opt.partition("=")
                if key == "source" and eq:
                    source = val
                elif key == "basedir" and eq:
                    basedirs.extend(d for d in val.split(":") if d)
                elif key == "debug":
                    debug = True
                elif opt == "nopassthrough":
                    passthrough = False
                elif key == "fsname" and eq:
                    fsname = val
                elif opt in _PASSED:
                    mount_options.append(opt)
                elif opt.startswith(_IGNORED):
                    pass
                else:
                    raise UsageError(f"unknown or unsupported option -o {opt}")
        elif a.startswith("-") and a != "-":
            raise UsageError(f"unknown option {a!r} (see --help)")
        elif mountpoint is None:
            mountpoint = a
        else:
            raise UsageError(f"invalid argument {a!r}")
    if mountpoint is None:
        raise UsageError(f"no mount point given (usage: {PROG} [options] <mountpoint>)")
    if source is None:
        raise UsageError("no image given: use -o source=IMAGE")

    from ..erofs.reader import MAX_IMAGE_SIZE
    from ..errors import ImageError
    from ..fuse.server import mount_image

    with open(source, "rb") as f:
        # An image is metadata only: refuse a huge file before reading it.
        if os.fstat(f.fileno()).st_size > MAX_IMAGE_SIZE:
            raise ImageError(f"{source}: larger than a composefs image can be")
        image = f.read()
    mount_image(
        image, basedirs, mountpoint, fsname=fsname or source, options=mount_options,
        foreground=foreground, debug=debug, passthrough=passthrough,
    )  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
