"""Shared plumbing for the command-line tools: one-line errors, exit codes."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ComposefsError, UsageError

TYPE_CHECKING = False  # as typing.TYPE_CHECKING, without importing typing

if TYPE_CHECKING:  # typing costs milliseconds at every CLI start
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn


def _terminal_columns() -> int:
    """`shutil.get_terminal_size().columns`, without importing shutil (and
    with it bz2, lzma, fnmatch: milliseconds at every start, as argparse
    makes a formatter for every argument added)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        out = sys.__stdout__
        try:
            columns = os.get_terminal_size(out.fileno()).columns if out is not None else 0
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class Parser(argparse.ArgumentParser):
    """An argument parser whose mistakes are one-line errors (exit status 1).

    `only` (the command words of this run, e.g. ``("oci", "pull")``) makes
    `add_subparsers` build the parser of that command alone: cfsctl has
    some thirty, and building them all costs ~6 ms at every start (argparse
    looks for a translation catalogue on disk for each). None (or no word
    left for this level) builds them all."""

    only: tuple[str, ...] | None = None

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def add_subparsers(self, **kwargs: Any) -> Any:
        action = super().add_subparsers(**kwargs)
        return _OnlyCommand(action, self.only) if self.only else action

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse makes a formatter for every add_argument (to check its
        # metavar); the default one imports shutil (~2 ms at every start)
        # for the terminal width, found here as shutil would.
        width = _terminal_columns() - 2
        return self.formatter_class(prog=self.prog, width=width)  # type: ignore[call-arg]


class _Unused:
    """The parser of a command this run does not use (`Parser.only`):
    whatever is added to it is dropped."""

    def __getattr__(self, name: str) -> Callable[..., _Unused]:
        return self._drop

    def _drop(self, *args: object, **kwargs: object) -> _Unused:
        return self


class _OnlyCommand:
    """A subcommands action that adds the parser of `only[0]` and drops the
    others; that parser builds only `only[1:]` in turn."""

    def __init__(self, action: Any, only: tuple[str, ...]) -> None:
        self._action = action
        self._only = only

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        if name != self._only[0]:
            return _Unused()
        parser = self._action.add_parser(name, **kwargs)
        if isinstance(parser, Parser):
            parser.only = self._only[1:]
        return parser


class _Version(argparse.Action):
    """`--version`: `PROG VERSION`, the version read from the package
    metadata only when asked for (it costs an import)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(
            option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS,
            help="print the version and exit",
        )  # fmt: skip

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from .. import __version__

        sys.stdout.write(f"{parser.prog} {__version__}\n")
        parser.exit()


def add_version(p: argparse.ArgumentParser) -> None:
    """Give a tool's parser `--version`."""
    p.add_argument("--version", action=_Version)


def add_connection_args(g: argparse._ArgumentGroup, tls_help: str) -> None:
    """`--tls-verify`, `--cert-dir` and `--proxy`, as skopeo spells them
    (registry pulls and pushes, HTTP fetch)."""
    g.add_argument("--tls-verify", metavar="BOOL", nargs="?", const="true", help=tls_help)
    g.add_argument(
        "--cert-dir",
        metavar="DIR",
        help="directory of *.crt CA files and *.cert/*.key client certificates",
    )
    g.add_argument(
        "--proxy",
        metavar="URL",
        help="HTTP proxy for every request (default: $https_proxy etc.; '' for none)",
    )


def connection_tls_verify(args: argparse.Namespace, error: type[ComposefsError]) -> bool:
    """Check the `add_connection_args` values (an `error` naming the flag
    otherwise) and return what `--tls-verify` means."""
    tls_verify = True
    if args.tls_verify is not None:
        value = args.tls_verify.lower()
        if value not in ("true", "false", "1", "0", "yes", "no"):
            raise error(f"--tls-verify: expected true or false, got {args.tls_verify!r}")
        tls_verify = value in ("true", "1", "yes")
    if args.cert_dir is not None and not os.path.isdir(args.cert_dir):
        raise error(f"--cert-dir: no such directory: {args.cert_dir}")
    if args.proxy and not args.proxy.startswith(("http://", "https://")):
        raise error(f"--proxy: expected http://HOST:PORT, got {args.proxy!r}")
    return tls_verify


def _one_line(message: str) -> str:
    # Names from hostile input must neither split the line nor reach the
    # terminal raw (ESC, BEL, ...): control characters are shown escaped.
    if message.isprintable():
        return message
    return "".join(
        ch if ch.isprintable() else ("\\n" if ch == "\n" else f"\\x{ord(ch):02x}")
        if ord(ch) < 0x100
        else f"\\u{ord(ch):04x}"
        for ch in message
    )


def die(prog: str, message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(f"{prog}: {_one_line(message)}\n")
    raise SystemExit(code)


def _settle_heap() -> None:
    """For a tool running as the program: keep the cyclic garbage collector
    off what lives until exit.

    What exists before the command runs (the interpreter's and the tool's
    modules) is frozen, and so is everything at exit. The collector's full
    passes walk every tracked object: during a pull of a minbase image that
    was one more pass (~15 ms), and the interpreter's teardown spent ~25 ms
    in them, for memory the process gives back anyway. Garbage the command
    makes is collected as before; atexit handlers run as before (this one,
    registered first, runs last)."""
    import atexit
    import gc

    gc.freeze()
    atexit.register(gc.freeze)


def run(prog: str, func: Callable[[Sequence[str]], int | None], argv: Sequence[str] | None) -> int:
    """Run a CLI body; turn every expected failure into one line on stderr.

    ComposefsError and OSError are user-facing (bad input, missing file,
    permissions); anything else is a bug and keeps its traceback.
    `argv` None means the process's own arguments: the tool is the program
    (not called from Python), which also settles the heap (`_settle_heap`).
    """
    if argv is None:
        argv = sys.argv[1:]
        _settle_heap()
    try:
        return func(argv) or 0
    except BrokenPipeError:
        # Reader went away (e.g. `| head`): exit quietly like C tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except ComposefsError as e:
        die(prog, str(e))
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        die(prog, f"{e.strerror or e}{where}")
    except KeyboardInterrupt:
        die(prog, "interrupted", 130)


def fuse_options(sp: argparse.ArgumentParser) -> None:
    """`mount`'s FUSE choice (composefs-rs 0.8)."""
    sp.add_argument(
        "--fuse",
        choices=("auto", "yes", "no"),
        default="auto",
        help="mount with FUSE: auto (when the kernel mount is not allowed), yes, no",
    )
    sp.add_argument(
        "--foreground", action="store_true", help="FUSE: serve in the foreground until unmounted"
    )
