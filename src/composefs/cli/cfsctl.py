"""cfsctl: manage a composefs repository (composefs-rs 0.7.0 command line).

Global options come before the command::

    cfsctl [--repo PATH | --user | --system] [--hash sha256|sha512]
           [--erofs-version 0|1|2] [--require-verity] [--no-upgrade] [--no-repo]
           COMMAND ...

Commands: init, transaction, cat, gc, import-image, mount, create-image,
compute-id, compute-karg, create-dumpfile, image-objects, dump-files, fsck,
``varlink`` (the varlink service, `composefs.cli.varlink`), ``fetch``/``publish``
(`composefs.cli.http`), and ``oci …`` when `composefs.cli.oci` is installed. Invoked as
``mkcomposefs`` or ``composefs-info`` (argv[0]), or with those names as the
command, the arguments go to those tools instead.

Extension hook (the ``oci`` command group)
-----------------------------------------
At parser construction cfsctl imports `composefs.cli.oci` (skipped if the
module does not exist) and calls::

    composefs.cli.oci.add_parser(subparsers) -> None

`subparsers` is cfsctl's ``argparse`` sub-parser action; the hook adds its
parser(s) (e.g. ``subparsers.add_parser("oci", help=...)`` with nested
sub-commands). Parsers it creates raise one-line usage errors. Every leaf
parser sets ``set_defaults(func=handler)`` where::

    handler(args: argparse.Namespace,
            repo_opener: Callable[[], composefs.repository.Repository]) -> int | None

`args` carries the global options too (``args.repo``, ``args.user``,
``args.system``, ``args.hash``, ``args.erofs_version`` (int or None),
``args.insecure``, ``args.require_verity``, ``args.no_upgrade``,
``args.no_repo``). `repo_opener()` opens the repository those options select
(auto-upgrading legacy repositories unless ``--no-upgrade``, applying
``--hash``/``--erofs-version``/``--insecure``/``--require-verity``); it
returns the same open `Repository` on every call and cfsctl closes it when
the handler returns. The return value is the exit status (None = 0);
`errors.ComposefsError` and `OSError` become ``cfsctl: message`` on stderr
with exit status 1. Keep imports inside handlers (help must stay fast).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..errors import ComposefsError, RepositoryError, UsageError
from ._util import Parser, add_version, fuse_options, run

if TYPE_CHECKING:
    from ..repository import Repository
    from ..tree import Directory

PROG = "cfsctl"
RepoOpener = Callable[[], "Repository"]
Handler = Callable[[argparse.Namespace, RepoOpener], "int | None"]

# Global options that take a value (for finding the command word by hand).
_VALUE_OPTIONS = ("--repo", "--hash", "--erofs-version")
_FORWARDED = ("mkcomposefs", "composefs-info")




# ---------------------------------------------------------------------------
# repository selection


def repo_path(args: argparse.Namespace) -> str:
    """--repo, --system, --user, or by uid (root: system) — composefs-rs order."""
    from ..repository import default_path, system_path, user_path

    if args.repo is not None:
        return str(args.repo)
    if args.system:
        return system_path()
    if args.user:
        return user_path()
    return default_path()


def make_repo_opener(args: argparse.Namespace) -> tuple[RepoOpener, Callable[[], None]]:
    """(opener, closer) for the repository the global options select."""
    opened: list[Repository] = []

    def opener() -> Repository:
        if not opened:
            from ..repository import Repository

            opened.append(
                Repository.open(
                    repo_path(args),
                    upgrade=not args.no_upgrade,
                    insecure=args.insecure,
                    require_verity=args.require_verity,
                    hash=args.hash,
                    erofs_version=args.erofs_version,
                )
            )
        return opened[0]

    def closer() -> None:
        for r in opened:
            r.close()

    return opener, closer


def _effective_hash(args: argparse.Namespace) -> str:
    """Hash for repository-less commands: --hash, else the repository's
    (when one resolves), else sha512 — as `run_cmd_without_repo`."""
    if args.hash:
        return str(args.hash)
    if not args.no_repo:
        from ..repository import peek_algorithm

        try:
            found = peek_algorithm(repo_path(args), infer=not args.no_upgrade)
        except ComposefsError:
            found = None
        if found:
            return found
    return "sha512"


# ---------------------------------------------------------------------------
# reading trees from disk (create-image, compute-id, create-dumpfile)


def _read_tree(
    args: argparse.Namespace,
    algorithm: str,
    sink: Callable[[str, int, str], None] | None,
    bootable: bool,
    repo: Repository | None = None,
) -> Directory:
    from .. import fs

    path = args.path
    if not os.path.isdir(path):
        raise RepositoryError(f"{path}: not a directory")
    if not args.no_propagate_usr_to_root:
        # Fail before storing anything: the root takes /usr's metadata.
        try:
            usr_is_dir = stat.S_ISDIR(os.lstat(os.path.join(path, "usr")).st_mode)
        except FileNotFoundError:
            usr_is_dir = False
        if not usr_is_dir:
            raise RepositoryError(
                f"{path}: /usr is missing or not a directory (the root takes its "
                "metadata; use --no-propagate-usr-to-root)"
            )
    if args.no_propagate_usr_to_root:
        root = fs.read_filesystem(path, algorithm=algorithm, object_sink=sink)
    else:
        root = fs.read_container_root(path, algorithm=algorithm, object_sink=sink)
    if bootable:
        _boot_transform(root, path, repo)
    return root


def _boot_transform(root: Directory, source: str, repo: Repository | None) -> None:
    try:
        from ..boot import transform_for_boot
    except ImportError:
        raise RepositoryError("--bootable is not available in this installation") from None
    transform_for_boot(root, source=source, repo=repo)


def _image_bytes(root: Directory, version: int) -> bytes | bytearray:
    from ..erofs.format import FormatVersion
    from ..erofs.writer import mkfs_buffer

    return mkfs_buffer(root, FormatVersion(version))


# ---------------------------------------------------------------------------
# commands


def cmd_init(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..repository import FormatConfig, Repository, algorithm_from_string

    algorithm = algorithm_from_string(args.algorithm)
    path = args.path if args.path is not None else repo_path(args)
    version = args.init_erofs_version
    if version is None:
        version = args.erofs_version if args.erofs_version is not None else 2
    insecure = args.init_insecure or args.insecure
    # parents are created as needed, and removed again if init fails
    made: list[str] = []
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        repo, created = Repository.init(
            path,
            algorithm=algorithm,
            insecure=insecure,
            formats=FormatConfig(version),
            reset_metadata=args.reset_metadata,
        )
    except BaseException:
        for d in made:  # deepest first
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    repo.close()
    if created:
        print(f"Initialized composefs repository at {path}")
        print(f"  algorithm: fsverity-{algorithm}-12")
        print("  verity:    " + ("not required (insecure)" if insecure else "required"))
    else:
        print(f"Repository already initialized at {path}")


def cmd_transaction(args: argparse.Namespace, opener: RepoOpener) -> None:
    opener()  # the shared lock is held while the repository is open
    while True:
        signal.pause()


def cmd_cat(args: argparse.Namespace, opener: RepoOpener) -> None:
    out = sys.stdout.buffer
    opener().cat_stream(args.name, out)
    out.flush()


def cmd_gc(args: argparse.Namespace, opener: RepoOpener) -> None:
    result = opener().gc(args.root or (), dry_run=args.dry_run)
    from ..limits import show

    for path, reason in result.unreadable:
        sys.stderr.write(f"cfsctl: warning: {show(path)}: {show(reason, 300)}\n")
    if result.unreadable:
        kept = (
            "every object and link kept"
            if result.kept_everything
            else "every object they name kept"
        )
        sys.stderr.write(f"cfsctl: warning: {len(result.unreadable)} unreadable; {kept}\n")
    if args.dry_run:
        print("Dry run (no files deleted):")
    print(f"Objects: {result.objects_removed} removed ({result.objects_bytes} bytes)")
    if result.images_pruned or result.streams_pruned:
        print(f"Pruned symlinks: {result.images_pruned} images, {result.streams_pruned} streams")


def cmd_enable_verity(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..boot.provision import enable_repository_verity

    result = enable_repository_verity(repo_path(args))
    print(f"fs-verity: {result.objects} objects ({result.enabled} enabled now), meta.json")


def cmd_import_image(args: argparse.Namespace, opener: RepoOpener) -> None:
    repo = opener()
    object_id = repo.import_image(sys.stdin.buffer, args.reference)
    print(repo.to_id(object_id))


def cmd_mount(args: argparse.Namespace, opener: RepoOpener) -> None:
    if (args.upperdir is None) != (args.workdir is None):
        raise UsageError("--upperdir and --workdir must be given together")
    if args.read_write and args.upperdir is None:
        raise UsageError("--read-write requires --upperdir and --workdir")
    from ..fuse.server import mount_from_repository, want_fuse

    if want_fuse(args.fuse):
        if args.upperdir is not None:
            raise UsageError("a FUSE mount is read-only: no --upperdir/--workdir")
        mount_from_repository(opener(), args.name, args.mountpoint, foreground=args.foreground)
        return
    opener().mount(
        args.name,
        args.mountpoint,
        upperdir=args.upperdir,
        workdir=args.workdir,
        read_write=args.read_write,
    )


def cmd_create_image(args: argparse.Namespace, opener: RepoOpener) -> None:
    repo = opener()
    if args.image_name is not None:
        from ..repository import _check_relpath

        _check_relpath(args.image_name, "image name")
    root = _read_tree(args, repo.algorithm, repo.object_sink(), args.bootable, repo)
    object_id = repo.commit_image(root, args.image_name)
    print(repo.to_id(object_id))


def cmd_compute_id(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..fsverity import digest_hex

    algorithm = _effective_hash(args)
    root = _read_tree(args, algorithm, None, args.bootable)
    version = args.erofs_version if args.erofs_version is not None else 2
    print(digest_hex(_image_bytes(root, version), algorithm))


def cmd_compute_karg(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..boot import make_cmdline_composefs
    from ..fsverity import digest_hex

    algorithm = _effective_hash(args)
    root = _read_tree(args, algorithm, None, True)
    version = args.erofs_version if args.erofs_version is not None else 2
    digest = digest_hex(_image_bytes(root, version), algorithm)
    insecure = args.insecure
    if not insecure and not args.no_repo:
        # the karg is for this repository: an insecure one gets "?"
        from ..repository import peek_insecure

        try:
            insecure = bool(peek_insecure(repo_path(args)))
        except ComposefsError:
            pass
    print(make_cmdline_composefs(digest, insecure, version, algorithm))


def cmd_create_dumpfile(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..dumpfile import write

    root = _read_tree(args, _effective_hash(args), None, args.bootable)
    out = sys.stdout.buffer
    write(root, out, style="rust")
    out.flush()


def cmd_image_objects(args: argparse.Namespace, opener: RepoOpener) -> None:
    repo = opener()
    for object_id in repo.objects_for_image(args.name):
        print(repo.to_id(object_id))


def cmd_dump_files(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..erofs.reader import read_image

    repo = opener()
    root = read_image(repo.read_image(args.image_name), keep_opaque_markers=False)
    out = sys.stdout.buffer
    if args.backing_path_only:
        for name in args.files:
            node = _lookup(root, name)
            out.write(_backing_line(name, node))
        out.flush()
        return
    text = b"".join(_dump_lines(root, name) for name in args.files)
    if text:
        out.write(text + b"\n")  # composefs-rs println!s the collected output
    out.flush()


def cmd_fsck(args: argparse.Namespace, opener: RepoOpener) -> int:
    import json

    result = opener().fsck(metadata_only=args.metadata_only)
    if args.json:
        # composefs-rs exits 0 here whatever it found; a checker that
        # passes a broken repository is a trap, so any problem exits 1.
        print(json.dumps(result.to_reply(), indent=2, ensure_ascii=False))
        return 0 if result.ok else 1
    sys.stdout.write(str(result))
    sys.stdout.flush()
    if not result.ok:
        raise RepositoryError("repository integrity check failed")
    return 0


# -- dump-files helpers ------------------------------------------------------


def _lookup(root: Directory, name: str) -> object:
    from ..tree import split_path

    node = root.lookup(os.fsencode(name))
    if node is None or not split_path(os.fsencode(name)):
        raise RepositoryError(f"{name} not found")
    return node


def _backing_line(name: str, node: object) -> bytes:
    from ..tree import Directory, Leaf, Regular

    if isinstance(node, Directory):
        raise RepositoryError(f"{name} is a directory")
    assert isinstance(node, Leaf)
    c = node.content
    where = b"inline"
    if isinstance(c, Regular) and c.data is None:
        path = c.backing_path()
        if path is not None:
            where = path
    return os.fsencode(name) + b" " + where + b"\n"


def _dump_lines(root: Directory, name: str) -> bytes:
    """The dumpfile lines of one file or directory subtree, with paths
    spelled from `name` (composefs-rs `dump_single_file`/`dump_single_dir`):
    link counts of the whole image, hardlinks tracked within this subtree."""
    from ..dumpfile import dumps, escape
    from ..tree import split_path

    _lookup(root, name)
    canon = b"/" + b"/".join(split_path(os.fsencode(name)))
    prefix = escape(canon)
    shown = escape(os.fsencode(name))
    shown_base = shown.rstrip(b"/") if len(shown) > 1 else shown
    full: dict[bytes, bytes] = {}
    lines: list[tuple[bytes, bytes]] = []
    for line in dumps(root, style="rust").splitlines():
        path, _, rest = line.partition(b" ")
        full[path] = rest
        if path == prefix or path.startswith(prefix + b"/"):
            lines.append((path, rest))
    inside = {p for p, _ in lines}
    moved: dict[bytes, bytes] = {}  # outside first-link path -> its stand-in here

    def rename(path: bytes) -> bytes:
        return shown if path == prefix else shown_base + path[len(prefix) :]

    out = []
    for path, rest in lines:
        fields = rest.split(b" ")
        if len(fields) > 1 and fields[1] == b"@120000":
            target = fields[7]
            if target in inside:
                fields[7] = rename(target)
            elif target in moved:
                fields[7] = moved[target]
            else:
                moved[target] = rename(path)
                out.append(rename(path) + b" " + full[target] + b"\n")
                continue
            rest = b" ".join(fields)
        out.append(rename(path) + b" " + rest + b"\n")
    return b"".join(out)


# ---------------------------------------------------------------------------
# the parser


_IMAGE_HELP = (
    "image id as printed (sha512:HEX, or HEX; digest verified), refs/NAME, or a ref NAME"
)


def build_parser(only: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """cfsctl's parser; with `only` (command words, as `_command_words`
    finds them), the parsers of other commands are left out."""
    p = Parser(
        prog=PROG,
        description="Manage a composefs repository: objects, images, splitstreams.",
    )
    p.only = tuple(only) if only else None
    add_version(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--repo", metavar="PATH", help="operate on the repository at PATH")
    where.add_argument(
        "--user",
        action="store_true",
        help="operate on the user repository $HOME/.var/lib/composefs",
    )
    where.add_argument(
        "--system",
        action="store_true",
        help="operate on the system repository /sysroot/composefs (default for root)",
    )
    p.add_argument(
        "--hash",
        choices=("sha256", "sha512"),
        help="digest type (default: from meta.json, else sha512)",
    )
    p.add_argument(
        "--erofs-version",
        type=int,
        choices=(0, 1, 2),
        help="EROFS format for images made by this command "
        "(0: C default, 1: C --min-version=1, 2: composefs-rs native)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="do not check fs-verity on the repository's objects and images (a repository "
        "without fs-verity is detected from meta.json); compute-karg: mark the karg '?'",
    )
    p.add_argument(
        "--require-verity",
        action="store_true",
        help="refuse a repository that does not enforce fs-verity",
    )
    p.add_argument(
        "--no-upgrade",
        action="store_true",
        help="do not write meta.json into an old-format repository",
    )
    p.add_argument(
        "--no-repo",
        action="store_true",
        help="do not open a repository (compute-id, compute-karg, create-dumpfile)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Handler, help: str, **kw: object) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help, **kw)
        sp.set_defaults(func=func)
        return sp

    sp = add("init", cmd_init, "initialize a repository (writes meta.json)")
    sp.add_argument(
        "path", nargs="?", help="repository directory (default: --repo/--user/--system)"
    )
    sp.add_argument(
        "--algorithm",
        default="fsverity-sha512-12",
        help="fs-verity algorithm: fsverity-sha512-12 (default) or fsverity-sha256-12",
    )
    sp.add_argument(
        "--insecure",
        dest="init_insecure",
        action="store_true",
        help="do not require fs-verity (filesystems without it, like this one)",
    )
    sp.add_argument(
        "--reset-metadata",
        action="store_true",
        help="drop streams/, images/ and meta.json (objects are kept) before initializing",
    )
    sp.add_argument(
        "--erofs-version",
        dest="init_erofs_version",
        type=int,
        choices=(0, 1, 2),
        help="default EROFS format of the repository's images (default 2)",
    )

    add(
        "transaction",
        cmd_transaction,
        "hold the repository open (shared lock) until interrupted; blocks gc",
    )

    sp = add("cat", cmd_cat, "write the reassembled content of a splitstream to stdout")
    sp.add_argument("name", help="stream content id, or refs/NAME")

    sp = add("gc", cmd_gc, "remove objects no ref (or --root) keeps alive")
    sp.add_argument(
        "-r", "--root", action="append", metavar="NAME",
        help="also keep this image or stream: an id as printed (sha512:HEX or HEX), refs/NAME"
        " or a ref NAME, a stream name; one that names nothing is an error (repeatable)",
    )  # fmt: skip
    sp.add_argument(
        "-n", "--dry-run", action="store_true", help="only report what would be removed"
    )

    sp = add("import-image", cmd_import_image, "store an EROFS image read from stdin (checked first)")
    sp.add_argument("reference", help="ref name (images/refs/REFERENCE)")

    sp = add("mount", cmd_mount, "mount an image from the repository")
    sp.add_argument("name", help=_IMAGE_HELP)
    sp.add_argument("mountpoint")
    sp.add_argument("--upperdir", metavar="DIR", help="writable overlayfs upper directory")
    sp.add_argument("--workdir", metavar="DIR", help="overlayfs work directory (with --upperdir)")
    sp.add_argument("--read-write", action="store_true", help="mount read-write (needs --upperdir)")
    fuse_options(sp)

    def tree_options(sp: argparse.ArgumentParser, bootable: bool = True) -> None:
        sp.add_argument("path", help="root of the directory tree")
        if bootable:
            sp.add_argument(
                "--bootable",
                action="store_true",
                help="transform for boot (SELinux labels, empty /boot and /sysroot)",
            )
        sp.add_argument(
            "--no-propagate-usr-to-root",
            action="store_true",
            help="keep the root's own metadata and all xattrs (no /usr copy, /run kept)",
        )

    sp = add(
        "create-image",
        cmd_create_image,
        "store a directory tree's files and its image; print the image id",
    )
    tree_options(sp)
    sp.add_argument("image_name", nargs="?", help="ref name for the image (refs/NAME elsewhere)")

    sp = add(
        "compute-id", cmd_compute_id, "print the image id of a directory tree (stores nothing)"
    )
    tree_options(sp)

    sp = add(
        "compute-karg",
        cmd_compute_karg,
        "print the kernel argument (composefs=… or composefs.digest=…) of a bootable tree",
    )
    tree_options(sp, bootable=False)

    sp = add("create-dumpfile", cmd_create_dumpfile, "print the dumpfile of a directory tree")
    tree_options(sp)

    add(
        "enable-verity",
        cmd_enable_verity,
        "enable fs-verity on every object and meta.json (provisioning a copied repository)",
    )

    sp = add("image-objects", cmd_image_objects, "list the objects an image refers to")
    sp.add_argument("name", help=_IMAGE_HELP)

    sp = add(
        "dump-files",
        cmd_dump_files,
        "print the dumpfile lines (or backing paths) of files in an image",
    )
    sp.add_argument("image_name", metavar="IMAGE", help=_IMAGE_HELP)
    sp.add_argument("files", nargs="*", metavar="FILES", help="paths inside the image")
    sp.add_argument(
        "--backing-path-only",
        action="store_true",
        help="print 'PATH inline' or 'PATH XX/…' (the object) instead",
    )

    sp = add("fsck", cmd_fsck, "check the repository's integrity (non-zero exit on problems)")
    sp.add_argument("--json", action="store_true", help="print the report as JSON (exit status 1 on any problem)")
    sp.add_argument(
        "--metadata-only",
        action="store_true",
        help="skip hashing object contents (structure and references only)",
    )

    # The OCI group is optional; a broken module must fail loudly, not vanish.
    if importlib.util.find_spec(f"{__package__}.oci") is not None:
        importlib.import_module(f"{__package__}.oci").add_parser(sub)
    importlib.import_module(f"{__package__}.varlink").add_parser(sub)
    # fetch/publish (composefs.cli.http): the same hook as the OCI group.
    if importlib.util.find_spec(f"{__package__}.http") is not None:
        importlib.import_module(f"{__package__}.http").add_parser(sub)
    return p


_NO_REPO_OK = {"compute-id", "compute-karg", "create-dumpfile"}


def _command_word(argv: Sequence[str]) -> int | None:
    """Index of the command word in argv (skipping global options)."""
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return i + 1 if i + 1 < len(argv) else None
        if a in _VALUE_OPTIONS:
            i += 2
            continue
        if a.startswith("-"):
            i += 1
            continue
        return i
    return None


def _command_words(argv: Sequence[str]) -> list[str]:
    """The command word and the one after it (a group's command), when
    nothing before them asks for the top-level help (which lists every
    command)."""
    idx = _command_word(argv)
    if idx is None or any(a in ("-h", "--help") for a in argv[:idx]):
        return []
    words = [argv[idx]]
    if idx + 1 < len(argv) and not argv[idx + 1].startswith("-"):
        words.append(argv[idx + 1])
    return words


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    """Parse with the parsers of the command at hand only; anything that
    does not parse that way (a misspelt command, an abbreviated option
    that hid the real command word) is parsed again with all of them, so
    messages and help are those of the whole parser."""
    words = _command_words(argv)
    if words:
        try:
            return build_parser(words).parse_args(argv)
        except UsageError:
            pass
    return build_parser().parse_args(argv)


def _forward(tool: str, argv: Sequence[str]) -> int:
    if tool == "mkcomposefs":
        from .mkcomposefs import main as tool_main
    else:
        try:
            from .composefs_info import main as tool_main
        except ImportError:
            raise RepositoryError(f"{tool} is not available in this installation") from None
    return tool_main(list(argv))


def _main(argv: Sequence[str]) -> int | None:
    idx = _command_word(argv)
    if idx is not None and argv[idx] in _FORWARDED:
        return _forward(argv[idx], argv[idx + 1 :])
    args = _parse(argv)
    if args.no_repo and args.command not in _NO_REPO_OK:
        raise UsageError("--no-repo is only supported for compute-id and create-dumpfile")
    opener, closer = make_repo_opener(args)
    try:
        func: Handler = args.func
        return func(args, opener)
    finally:
        closer()


def main(argv: Sequence[str] | None = None) -> int:
    tool = os.path.basename(sys.argv[0]) if sys.argv else ""
    if argv is None and tool in _FORWARDED:
        return run(tool, lambda a: _forward(tool, a), None)
    return run(PROG, _main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
