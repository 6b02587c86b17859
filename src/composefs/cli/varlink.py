"""``cfsctl varlink``: serve the varlink API (composefs.varlink)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UsageError


def _mode(value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid octal mode {value!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"invalid mode {value!r}")
    return mode


def cmd_varlink(args: argparse.Namespace, opener: Any) -> None:
    try:
        from ..varlink import server
    except ImportError as e:
        raise UsageError(f"varlink support is not installed ({e.name} missing)") from None
    server.run(
        args.address,
        socket_mode=args.socket_mode,
        insecure=args.insecure,
        require_verity=args.require_verity,
        no_upgrade=args.no_upgrade,
    )


def add_parser(sub: Any) -> None:
    sp = sub.add_parser(
        "varlink",
        help="serve the org.composefs.Repository and org.composefs.Oci varlink interfaces",
        description="Serve the varlink API on a Unix socket: the socket passed by systemd "
        "socket activation (LISTEN_FDS), else --address. Whoever can connect to the "
        "socket can use every repository this process can (see README).",
    )
    sp.set_defaults(func=cmd_varlink)
    sp.add_argument("--address", help="unix:PATH (or PATH) of the socket to create")
    sp.add_argument(
        "--socket-mode",
        type=_mode,
        default=0o600,
        help="permissions of the socket --address creates (octal, default 0600: owner only)",
    )
