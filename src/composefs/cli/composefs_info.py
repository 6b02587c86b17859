"""composefs-info: inspect composefs images (compatible with C composefs 1.0.8).

    composefs-info [--basedir=PATH] [--filter=NAME]... COMMAND ARGS...

Commands: `ls IMAGES...`, `dump IMAGES...`, `objects IMAGES...`,
`missing-objects --basedir=DIR IMAGES...`, `measure-file FILES...`.
Output formats are those of C composefs-info; `--filter` keeps only the
named top-level entries (ls, dump, objects).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import ComposefsError, UsageError
from ._util import Parser, add_version, run

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing (~3 ms)

if TYPE_CHECKING:
    from typing import BinaryIO

    from ..tree import Directory

PROG = "composefs-info"
COMMANDS = ("ls", "dump", "objects", "missing-objects", "measure-file")


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        usage="%(prog)s [--basedir=path] [--filter=name]... "
        "[ls|objects|dump|missing-objects|measure-file] IMAGES...",
        description="Show the contents of composefs images.",
    )
    add_version(p)
    p.add_argument("command", metavar="COMMAND", nargs="?", help=", ".join(COMMANDS))
    p.add_argument("paths", metavar="IMAGES", nargs="*", help="images (files for measure-file)")
    p.add_argument("--basedir", metavar="PATH", help="object directory (missing-objects)")
    p.add_argument(
        "--filter",
        metavar="NAME",
        action="append",
        help="only show this top-level entry (repeatable)",
    )
    return p


# -- C print_escaped ------------------------------------------------------
_ESC_SPECIAL = {0x5C: b"\\\\", 0x0A: b"\\n", 0x0D: b"\\r", 0x09: b"\\t"}


def _table(keep_space: bool) -> list[bytes]:
    out = []
    for c in range(256):
        if c in _ESC_SPECIAL:
            out.append(_ESC_SPECIAL[c])
        elif 0x21 <= c <= 0x7E or (keep_space and c == 0x20):
            out.append(bytes((c,)))
        else:
            out.append(b"\\x%02x" % c)
    return out


_STANDARD = _table(False)
_KEEP_SPACE = _table(True)


_PLAIN_STANDARD = bytes(range(0x21, 0x7F)).replace(b"\\", b"")
_PLAIN_KEEP_SPACE = _PLAIN_STANDARD + b" "


def escape(value: bytes, *, keep_space: bool = False) -> bytes:
    """C composefs-info escaping (ESCAPE_STANDARD, or NOESCAPE_SPACE)."""
    plain = _PLAIN_KEEP_SPACE if keep_space else _PLAIN_STANDARD
    if not value.translate(None, plain):
        return value  # nothing to escape (the usual case), no per-byte work
    table = _KEEP_SPACE if keep_space else _STANDARD
    return b"".join([table[c] for c in value])


# -- image access ---------------------------------------------------------
def load_image(path: str) -> bytes:
    """An image file's bytes, refusing files no composefs image can be."""
    from ..erofs.reader import MAX_IMAGE_SIZE

    try:
        f = open(path, "rb")
    except OSError as e:
        raise ComposefsError(f"Failed to open '{path}': {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_IMAGE_SIZE:
            raise ComposefsError(f"Failed to load '{path}': image larger than 1 GiB")
        # the size it has (reading MAX+1 would reserve a whole GiB up front)
        return f.read(size + 1)


def read_tree(
    path: str,
    toplevel: Sequence[bytes] | None = None,
    *,
    data: bytes | None = None,
    inline_data: bool = True,
) -> Directory:
    """The tree of the image at `path` (its bytes `data` if already loaded);
    without `inline_data` inline file contents are not read."""
    from ..erofs.reader import read_image
    from ..errors import ImageError

    if data is None:
        data = load_image(path)
    try:
        return read_image(data, toplevel=toplevel, inline_data=inline_data)
    except ImageError as e:
        raise ImageError(f"Failed to load '{path}': {e}") from None


# -- commands -------------------------------------------------------------
def _dump(path: str, toplevel: Sequence[bytes] | None, out: BinaryIO) -> None:
    """Dump the image at `path`, streamed from the image (no tree): erofs.dump
    gives what dumpfile.write(read_tree(...)) would, about twice as fast."""
    from ..dumpfile import write
    from ..erofs.dump import dump_lines
    from ..errors import ImageError

    data = load_image(path)
    try:
        # The lines are held until the image is validated: at most a few
        # times the image (a real dump is smaller than its image).
        lines = dump_lines(data, toplevel=toplevel, max_bytes=4 * len(data) + (16 << 20))
    except ImageError as e:
        raise ImageError(f"Failed to load '{path}': {e}") from None
    if lines is None:
        write(read_tree(path, toplevel, data=data), out)
        return
    for i in range(0, len(lines), 1024):
        out.write(b"".join(lines[i : i + 1024]))


def _ls(root: Directory, out: BinaryIO) -> None:
    """C's listing. The escaped path is built incrementally in one buffer
    (each name escaped once, the parent's path never copied per level), and
    output is flushed by size: memory stays O(deepest path), time O(output)."""
    from ..tree import Directory, Regular, Symlink

    seen: set[int] = set()
    buf: list[bytes] = []
    buffered = 0
    path = bytearray()
    # (length of the parent's escaped path, remaining sorted entries)
    stack = [(0, iter(root.sorted_entries()))]
    while stack:
        base, it = stack[-1]
        nxt = next(it, None)
        if nxt is None:
            stack.pop()
            continue
        name, node = nxt
        del path[base:]
        path += b"/"
        path += escape(name, keep_space=True)
        line = bytes(path)
        if isinstance(node, Directory):
            line += b"/\t"
            stack.append((len(path), iter(node.sorted_entries())))
        elif id(node) not in seen:
            # C loads later names of a hardlinked inode as bare links with
            # no type, and prints just their path.
            seen.add(id(node))
            c = node.content
            if isinstance(c, Symlink):
                line += b"\t-> " + escape(c.target)
            elif isinstance(c, Regular) and c.data is None:
                payload = c.backing_path()
                if payload:
                    line += b"\t@ " + escape(payload)
        buf.append(line + b"\n")
        buffered += len(line)
        if buffered >= 1 << 20 or len(buf) >= 4096:
            out.write(b"".join(buf))
            buf.clear()
            buffered = 0
    out.write(b"".join(buf))


def _objects(root: Directory, found: set[bytes], basedir: str | None) -> None:
    from ..tree import Regular, iter_leaves

    for leaf in iter_leaves(root):
        c = leaf.content
        if not isinstance(c, Regular) or c.data is not None:
            continue
        payload = c.backing_path()
        if not payload or payload in found:
            continue
        # C fstatat()s the object, following symlinks.
        if basedir is not None and os.path.exists(
            os.path.join(basedir, payload.lstrip(b"/").decode("utf-8", "surrogateescape"))
        ):
            continue
        found.add(payload)


def _measure(files: Sequence[str], out: BinaryIO) -> None:
    from ..fsverity import measure_or_compute

    if not files:
        raise UsageError("No files specified")
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ComposefsError(f"Failed to open '{path}': {e.strerror}") from None
        try:
            digest = measure_or_compute(fd)
        except OSError as e:
            raise ComposefsError(f"failed to measure '{path}': {e.strerror}") from None
        finally:
            os.close(fd)
        out.write(digest.hex().encode() + b"\n")


def _main(argv: Sequence[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    filters: list[bytes] | None = None
    for name in args.filter or ():
        if "/" in name:
            raise UsageError(f"Filter must be a single name: {name}")
        filters = (filters or []) + [os.fsencode(name)]
    if args.command is None:
        raise UsageError("No command specified")
    if args.command not in COMMANDS:
        raise UsageError(f"Unknown command '{args.command}'")
    out = sys.stdout.buffer
    if args.command == "measure-file":
        _measure(args.paths, out)
        return 0
    if args.command == "missing-objects" and args.basedir is None:
        raise UsageError("missing-objects needs --basedir=PATH")
    if args.basedir is not None and not os.path.isdir(args.basedir):
        raise ComposefsError(f"Can't open basedir `{args.basedir}`")
    if not args.paths:
        raise UsageError("No image path specified")
    if args.command in ("objects", "missing-objects"):
        found: set[bytes] = set()
        basedir = args.basedir if args.command == "missing-objects" else None
        for path in args.paths:
            _objects(read_tree(path, filters, inline_data=False), found, basedir)
        out.write(b"".join(p + b"\n" for p in sorted(found)))
        return 0
    for path in args.paths:
        if args.command == "ls":
            _ls(read_tree(path, filters, inline_data=False), out)
        else:
            _dump(path, filters, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
