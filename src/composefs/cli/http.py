"""``cfsctl fetch`` and ``cfsctl publish``: share repositories over HTTP.

Added to cfsctl by the extension hook (see `composefs.cli.cfsctl`)::

    cfsctl fetch URL NAME [--jobs N] [--no-verify-images] [--tls-verify=false] [--cert-dir DIR]
                          [--creds USER:PASS] [--proxy URL] [--timeout S] [--retries N]
    cfsctl publish DEST [NAME...] [--image NAME]... [--link-files]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ._util import add_connection_args, connection_tls_verify

if TYPE_CHECKING:
    from ..repository import Repository

RepoOpener = Callable[[], "Repository"]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _options(args: argparse.Namespace) -> Any:

    from ..http.client import HttpOptions

    tls_verify = connection_tls_verify(args, UsageError)
    if args.creds is not None and ":" not in args.creds:
        raise UsageError("--creds: expected USER:PASSWORD")
    if args.jobs < 1 or args.jobs > 256:
        raise UsageError("--jobs: expected 1 to 256")
    opts = HttpOptions(
        creds=args.creds,
        tls_verify=tls_verify,
        cert_dir=args.cert_dir,
        proxy=args.proxy,
        max_workers=args.jobs,
        retries=args.retries,
    )
    if args.timeout is not None:
        opts.transfer_timeout = args.timeout
        opts.read_timeout = min(opts.read_timeout, args.timeout)
        opts.connect_timeout = min(opts.connect_timeout, args.timeout)
    return opts


class _Progress:
    """``fetched N objects (X MiB)`` on one refreshed stderr line."""

    def __init__(self) -> None:
        import time

        self._time = time.monotonic
        self._last = 0.0

    def __call__(self, _kind: str, count: int, nbytes: int) -> None:
        now = self._time()
        if now - self._last < 0.2:
            return
        self._last = now
        sys.stderr.write(f"\rfetched {count} objects ({_human(nbytes)})\x1b[K")
        sys.stderr.flush()

    def done(self) -> None:
        if self._last:
            sys.stderr.write("\r\x1b[K")


def cmd_fetch(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..http.fetch import fetch

    options = _options(args)
    repo = opener()
    progress = _Progress() if sys.stderr.isatty() else None
    try:
        result = fetch(
            repo,
            args.url,
            args.name,
            options,
            progress=progress,
            verify_images=not args.no_verify_images,
        )
    finally:
        if progress is not None:
            progress.done()
    print(f"content {result.content_digest}")
    print(f"verity {result.verity}")
    rate = result.objects_fetched / result.seconds if result.seconds > 0 else 0.0
    print(
        f"fetched {result.objects_fetched} objects ({_human(result.bytes_fetched)}), "
        f"{result.objects_present} already present, in {result.seconds:.2f} s "
        f"({rate:.0f} objects/s); stream {result.content_id}",
        file=sys.stderr,
    )


def cmd_publish(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..http.publish import publish

    repo = opener()
    result = publish(repo, args.dest, args.names, images=args.image, link_files=args.link_files)
    print(
        f"published {len(result.streams)} streams, {len(result.images)} images, "
        f"{result.objects_written + result.objects_present} objects "
        f"({result.objects_written} new, {_human(result.bytes_written)}) to {result.dest}"
    )


def add_parser(sub: Any) -> None:
    def add(name: str, func: Callable[..., Any], help: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    sp = add(
        "fetch",
        cmd_fetch,
        "fetch a stream and everything it references from a repository served over HTTP",
    )
    sp.add_argument("url", metavar="URL", help="http:// or https:// URL of the served repository")
    sp.add_argument(
        "name",
        metavar="NAME",
        help="stream to fetch: a content id (oci-config-sha256:…) or refs/NAME "
        "(an OCI image: refs/oci/TAG)",
    )
    sp.add_argument("-j", "--jobs", type=int, default=32, help="parallel requests at most (default 32; added while they wait)")
    sp.add_argument("--retries", type=int, default=4, help="retries per request (default 4)")
    sp.add_argument(
        "--no-verify-images",
        action="store_true",
        help="take OCI images' composefs images as served (default: rebuild and compare)",
    )
    sp.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up on one transfer after SECONDS (default 900)",
    )
    g = sp.add_argument_group("connection options")
    g.add_argument("--creds", metavar="USER:PASS", help="HTTP basic auth for the URL's host only")
    add_connection_args(g, "verify TLS certificates (default true)")

    sp = add(
        "publish",
        cmd_publish,
        "write a static tree of some refs (and all they need) for a web server to serve",
    )
    sp.add_argument("dest", metavar="DEST", help="directory to write (created if missing)")
    sp.add_argument(
        "names",
        metavar="NAME",
        nargs="*",
        help="streams to publish: content ids or refs/NAME (refs/oci/TAG for an OCI image); "
        "without NAME and --image: every ref of the repository",
    )
    sp.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="NAME",
        help="also publish an image (id or refs/NAME) and its objects (repeatable)",
    )
    sp.add_argument(
        "--link-files",
        action="store_true",
        help="write symlinks as small files holding their target (for object stores; "
        "serve them as text/x-symlink-target)",
    )
