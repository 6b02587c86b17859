"""composefs-dump: rewrite a composefs image (compatible with C composefs 1.0.8).

    composefs-dump SRC DEST

Reads the image SRC and writes it again to DEST in the same format version
(C uses this to check that images are reproducible). DEST appears only when
it is complete.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import UsageError
from ._util import Parser, add_version, run

PROG = "composefs-dump"




def _main(argv: Sequence[str]) -> int:
    p = Parser(
        prog=PROG,
        usage="%(prog)s SRC DEST",
        description="Read a composefs image and write it again.",
    )
    add_version(p)
    p.add_argument("src", metavar="SRC", nargs="?", help="source image")
    p.add_argument("dest", metavar="DEST", nargs="?", help="destination image")
    args = p.parse_args(argv)
    if args.src is None:
        raise UsageError("No source path specified")
    if args.dest is None:
        raise UsageError("No destination path specified")

    from ..erofs.reader import image_version
    from ..erofs.writer import mkfs
    from .composefs_info import load_image, read_tree
    from .mkcomposefs import atomic_output

    data = load_image(args.src)
    root = read_tree(args.src, data=data)
    # Same composefs_version, never bumped (C passes version as min and max).
    version = image_version(data)
    image = mkfs(root, version, max_version=version)
    with atomic_output(args.dest) as f:
        f.write(image)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
