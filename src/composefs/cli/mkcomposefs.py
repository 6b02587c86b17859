"""mkcomposefs: build a composefs image (flag-compatible with C composefs 1.0.8).

    mkcomposefs [OPTIONS] SOURCE [IMAGE|-]

SOURCE is a directory, or with --from-file a dumpfile (`-` = stdin). IMAGE
`-` writes to stdout (never to a terminal). The image is written to a
temporary file next to IMAGE and renamed into place only when complete, so a
failed run leaves nothing behind.

As in C, a dumpfile is parsed leniently unless CFS_PARSE_STRICT is set in
the environment (to any value), and --use-epoch, --skip-devices,
--skip-xattrs and --user-xattrs only apply to directory input.
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from ..errors import ComposefsError, UsageError
from ._util import Parser, add_version, run

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing

if TYPE_CHECKING:  # typing costs milliseconds at every start
    from typing import BinaryIO

    from ..erofs.format import FormatVersion
    from ..tree import Directory

PROG = "mkcomposefs"




def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        usage="%(prog)s [OPTIONS] SOURCE [IMAGE|-]",
        description="Build a composefs image from a directory or a dumpfile.",
    )
    add_version(p)
    p.add_argument("source", metavar="SOURCE", help="directory, or dumpfile with --from-file")
    p.add_argument("image", metavar="IMAGE", nargs="?", help="output image path, - for stdout")
    p.add_argument("--digest-store", metavar="PATH", help="store content files in this directory")
    p.add_argument("--use-epoch", action="store_true", help="make all mtimes zero")
    p.add_argument("--skip-devices", action="store_true", help="don't store device nodes")
    p.add_argument("--skip-xattrs", action="store_true", help="don't store file xattrs")
    p.add_argument("--user-xattrs", action="store_true", help="only store user.* xattrs")
    p.add_argument("--print-digest", action="store_true", help="print the digest of the image")
    p.add_argument(
        "--print-digest-only",
        action="store_true",
        help="print the digest of the image, don't write image",
    )
    p.add_argument("--from-file", action="store_true", help="the source is a dump file")
    p.add_argument("--min-version", metavar="N", help="minimal format version (default 0)")
    p.add_argument("--max-version", metavar="N", help="maximal format version (default 1)")
    p.add_argument(
        "--erofs-version",
        metavar="N",
        choices=("0", "1", "2"),
        help="image format: 0 and 1 as C mkcomposefs, 2 = composefs-rs native (V2)",
    )
    p.add_argument(
        "--hardlinks",
        action="store_true",
        help="keep hardlinks of the source directory (C breaks them)",
    )
    p.add_argument(
        "--threads",
        metavar="N",
        help="threads used to compute digests and copy files (default: CPUs)",
    )
    return p


def _int_arg(value: str, what: str) -> int:
    # C uses strtol and insists on the whole string being a number.
    try:
        return int(value, 10)
    except ValueError:
        raise UsageError(f"Invalid {what} {value}") from None


def _versions(args: argparse.Namespace) -> tuple[FormatVersion, FormatVersion]:
    from ..erofs.format import FormatVersion

    if args.erofs_version is not None:
        if args.min_version is not None or args.max_version is not None:
            raise UsageError("--erofs-version cannot be combined with --min/--max-version")
        v = FormatVersion(int(args.erofs_version))
        return v, v
    if args.min_version is None and args.max_version is None:
        lo, hi = 0, 1  # C LCFS_DEFAULT_VERSION_MIN/MAX
    else:
        # C: once either is given, the other defaults to 0.
        lo = _int_arg(args.min_version, "min version") if args.min_version is not None else 0
        hi = _int_arg(args.max_version, "max version") if args.max_version is not None else 0
    for n in (lo, hi):
        if not 0 <= n <= 1:
            raise UsageError(f"unsupported format version {n} (C-compatible versions are 0 and 1)")
    hi = max(hi, lo)
    return FormatVersion(lo), FormatVersion(hi)


def _mkstemp(directory: str) -> tuple[int, str]:
    """`tempfile.mkstemp(prefix=".tmp-", dir=directory)` without importing
    tempfile (and random, shutil, bz2, lzma...): startup time counts for a
    command that runs in a fraction of a second."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        name = os.path.join(directory, ".tmp-" + os.urandom(6).hex())
        try:
            return os.open(name, flags, 0o600), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "No usable temporary file name found")


@contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A file object for `path` that appears there only if the block ends
    without an exception: it is a temporary file in the same directory,
    renamed into place on success and removed otherwise (C leaves a
    truncated file behind). Made up front, so a bad destination fails fast.
    """
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = _mkstemp(directory)
    except OSError as e:
        raise ComposefsError(f"failed to open output file '{path}': {e.strerror}") from None
    try:
        # mkstemp makes 0600; give the file the mode open(2) would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            yield f
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_tree(args: argparse.Namespace, threads: int | None, v2: bool) -> Directory:
    if args.from_file:
        from ..dumpfile import parse as _parse

        strict = "CFS_PARSE_STRICT" in os.environ

        def parse(src: BinaryIO, *, strict: bool) -> Directory:
            # C truncates a sha512 digest to a sha256 one no file has; refuse
            # it where only C's formats are written (V2 holds sha512)
            return _parse(src, strict=strict, sha256_only=not v2)
        if args.digest_store is not None:
            sys.stderr.write(f"{PROG}: warning: --digest-store is ignored with --from-file\n")
        if args.source == "-":
            return parse(sys.stdin.buffer, strict=strict)
        try:
            f = open(args.source, "rb")
        except OSError as e:
            raise ComposefsError(f"open `{args.source}`: {e.strerror}") from None
        with f:
            return parse(f, strict=strict)
    from ..fs import read_directory

    if not os.path.isdir(args.source):
        if not os.path.exists(args.source):
            raise ComposefsError(f"error accessing {args.source}: No such file or directory")
        raise ComposefsError(f"error accessing {args.source}: Not a directory")
    return read_directory(
        args.source,
        skip_devices=args.skip_devices,
        skip_xattrs=args.skip_xattrs,
        user_xattrs=args.user_xattrs,
        use_epoch=args.use_epoch,
        hardlinks=args.hardlinks,
        digest_store=args.digest_store,
        threads=threads,
    )


def _main(argv: Sequence[str]) -> int:
    # The tree and the image's inodes are ~5 acyclic objects per entry that
    # live until the process ends: the cyclic collector would only traverse
    # them all (parse and mkfs pause it, but the first allocation after
    # parse still triggers a collection of everything parse built).
    gc.disable()
    args = _parser().parse_args(argv)
    threads: int | None = None
    if args.threads is not None:
        threads = _int_arg(args.threads, "threads count")
        if threads <= 0:
            raise UsageError(f"Invalid threads count {threads}")
    version, max_version = _versions(args)
    if args.source == "":
        raise UsageError("Empty source path specified")
    if args.print_digest_only:
        if args.image is not None:
            raise UsageError("Cannot specify destination path with --print-digest-only")
    elif args.image is None:
        raise UsageError("No destination path specified")
    to_stdout = args.image == "-" and not args.print_digest_only
    if to_stdout and os.isatty(sys.stdout.fileno()):
        raise UsageError("stdout is a tty.  Refusing to use it")

    with ExitStack() as stack:
        out: BinaryIO | None = None
        if to_stdout:
            out = sys.stdout.buffer
        elif not args.print_digest_only:
            out = stack.enter_context(atomic_output(str(args.image)))
        root = _read_tree(args, threads, int(version) == 2)

        from ..erofs.writer import mkfs_buffer

        image = mkfs_buffer(root, version, max_version=max_version)
        if out is not None:
            out.write(image)
            out.flush()
    if args.print_digest or args.print_digest_only:
        from ..fsverity import digest_hex

        sys.stdout.write(digest_hex(image) + "\n")
        sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
