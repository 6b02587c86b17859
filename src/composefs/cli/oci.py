"""``cfsctl oci …``: OCI images in a composefs repository (composefs-rs 0.7.0).

Registered through cfsctl's `add_parser(subparsers)` hook. References:
a tag name, or ``@DIGEST``. composefs-rs reads ``@DIGEST`` as a config digest
in ``dump``/``compute-id`` and as a manifest digest in ``inspect``; here
every command accepts either (a stored manifest with that digest wins,
otherwise the one tagged image whose config has it).

Differences from composefs-rs, on purpose: ``pull`` prints the final
manifest verity (composefs-rs prints a stale one), ``import-layer`` checks
the layer against its diff_id and accepts gzip/zstd input, ``pull`` takes
``--platform``, ``prepare-boot`` roots the image it commits for GC
(``images/refs/boot/<id>``; composefs-rs leaves it unreferenced).
``pull`` and ``push`` take skopeo-style registry flags (``--creds``,
``--authfile``, ``--tls-verify``, ``--cert-dir``, ``--proxy``); ``push``
(not in composefs-rs, its issue #15) copies a stored image to
``docker://`` or ``oci:DIR[:TAG]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import OciError
from ._util import add_connection_args, connection_tls_verify, fuse_options

if TYPE_CHECKING:
    from ..oci.image import ProgressEvent
    from ..repository import Repository
    from ..tree import Directory

    RepoOpener = Callable[[], Repository]


# -- helpers ----------------------------------------------------------------


def _json_out(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _boot_transform_fn(repo: Repository) -> Callable[[Directory], None]:
    """The boot transformation (composefs.boot), or a clear error."""
    try:
        from .. import boot
    except ImportError:
        boot = None  # type: ignore[assignment]
    fn = getattr(boot, "transform_for_boot", None) if boot is not None else None
    if fn is None:
        raise OciError("--bootable is not available in this installation")

    def transform(root: Directory) -> None:
        fn(root, repo=repo)

    return transform


def _boot_transform(repo: Repository, root: Directory) -> None:
    _boot_transform_fn(repo)(root)


def _tree(args: argparse.Namespace, repo: Repository) -> Directory:
    from ..oci import stored

    root = stored.resolve_tree(repo, args.reference, args.config_verity)
    if getattr(args, "bootable", False):
        _boot_transform(repo, root)
    return root


class _Progress:
    """One status line on stderr (only used when stderr is a terminal).

    Events come from the layer fetch threads: a lock keeps lines whole. The
    line is redrawn at most every `INTERVAL` seconds; an update that falls
    inside that window is drawn when it ends (a timer), so the last frame
    on screen always shows the latest counts. `close()` (also on errors and
    Ctrl-C) clears the line before anything else is printed.
    """

    INTERVAL = 0.1

    def __init__(self) -> None:
        import threading

        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.finished: set[str] = set()
        self.last = 0.0
        self.shown = False
        self.pending = False
        self.closed = False
        self._lock = threading.RLock()
        self._timer: Any = None

    def __call__(self, ev: ProgressEvent) -> None:
        from ..oci.pull import human_bytes

        with self._lock:
            if self.closed:
                return
            if ev.kind in ("message", "skipped", "done"):
                self._clear()
                if ev.kind == "message":
                    sys.stderr.write(ev.message + "\n")
                elif ev.kind == "skipped":
                    sys.stderr.write(f"{ev.id[:19]}: already present\n")
                else:
                    self.done[ev.id] = ev.fetched
                    self.finished.add(ev.id)
                    sys.stderr.write(f"{ev.id[:19]}: {human_bytes(ev.fetched)} done\n")
                if self._active():
                    self._draw()  # the other layers are still coming
                sys.stderr.flush()
                return
            if ev.kind == "started":
                self.totals[ev.id] = ev.total or 0
                self.done[ev.id] = 0
            elif ev.kind == "progress":
                self.done[ev.id] = ev.fetched
            wait = self.last + self.INTERVAL - time.monotonic()
            if wait <= 0:
                self._draw()
            else:
                self.pending = True
                if self._timer is None:
                    import threading

                    self._timer = threading.Timer(wait, self._flush)
                    self._timer.daemon = True
                    self._timer.start()

    def _active(self) -> int:
        return sum(1 for k in self.done if k not in self.finished)

    def _draw(self) -> None:
        from ..oci.pull import human_bytes

        self.last = time.monotonic()
        self.pending = False
        got = sum(self.done.values())
        total = sum(self.totals.values())
        sys.stderr.write(
            f"\r\x1b[Kfetching {self._active()} layer(s): "
            f"{human_bytes(got)} / {human_bytes(total)}"
        )
        sys.stderr.flush()
        self.shown = True

    def _flush(self) -> None:
        with self._lock:
            self._timer = None
            if self.pending and not self.closed:
                self._draw()

    def _clear(self) -> None:
        with self._lock:
            if self.shown:
                sys.stderr.write("\r\x1b[K")
                sys.stderr.flush()
                self.shown = False

    def close(self) -> None:
        """Stop drawing and clear the line (idempotent)."""
        with self._lock:
            self.closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._clear()


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A table drawn like comfy-table's UTF8_FULL preset (what cfsctl prints)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(left: str, fill: str, mid: str, right: str) -> str:
        return left + mid.join(fill * (w + 2) for w in widths) + right

    def row(cells: list[str]) -> str:
        return "│" + "┆".join(f" {c.ljust(w)} " for c, w in zip(cells, widths, strict=True)) + "│"

    out = [line("┌", "─", "┬", "┐"), row(header), line("╞", "═", "╪", "╡")]
    for i, r in enumerate(rows):
        if i:
            out.append(line("├", "╌", "┼", "┤"))
        out.append(row(r))
    out.append(line("└", "─", "┴", "┘"))
    return "\n".join(out)


# -- commands -----------------------------------------------------------------


_REGISTRY_FLAGS = ("creds", "authfile", "tls_verify", "cert_dir", "proxy", "transfer_timeout")


def _registry_options(args: argparse.Namespace, image: str) -> Any:
    """`registry.RegistryOptions` from the registry flags (None when none was given)."""
    if all(getattr(args, k) is None for k in _REGISTRY_FLAGS):
        return None
    if not image.startswith("docker://"):
        given = [
            "--" + k.replace("_", "-") for k in _REGISTRY_FLAGS if getattr(args, k) is not None
        ]
        raise OciError(f"{', '.join(given)}: only for docker:// images, not {image[:150]!r}")
    import os

    from ..oci.registry import RegistryOptions

    tls_verify = connection_tls_verify(args, OciError)
    creds = args.creds
    if creds is not None:
        user, sep, _password = creds.partition(":")
        if not user:
            raise OciError("--creds: expected USER[:PASSWORD]")
        if not sep:
            # Like skopeo: a bare user name asks for the password.
            if not sys.stdin.isatty():
                raise OciError(
                    "--creds: no password given (USER:PASSWORD), and stdin is no terminal"
                )
            import getpass

            creds = f"{user}:{getpass.getpass(f'Password for {user}: ')}"
    if args.authfile is not None and not os.path.isfile(args.authfile):
        raise OciError(f"--authfile: no such file: {args.authfile}")
    extra: dict[str, Any] = {}
    if args.transfer_timeout is not None:
        if not args.transfer_timeout > 0:
            raise OciError("--transfer-timeout: expected a positive number of seconds")
        extra["transfer_timeout"] = args.transfer_timeout
    return RegistryOptions(
        creds=creds,
        auth_file=args.authfile,
        tls_verify=tls_verify,
        cert_dir=args.cert_dir,
        proxy=args.proxy,
        **extra,
    )


def _registry_args(sp: argparse.ArgumentParser) -> None:
    """The skopeo-style flags for talking to a docker:// registry."""
    g = sp.add_argument_group("registry options (docker:// only)")
    g.add_argument(
        "--creds",
        metavar="USER[:PASS]",
        help="credentials (without :PASS, asks for the password)",
    )
    g.add_argument(
        "--authfile",
        metavar="PATH",
        help="auth.json to use instead of the usual containers/docker auth files",
    )
    add_connection_args(g, "verify TLS certificates (default true); false also allows plain HTTP")
    g.add_argument(
        "--transfer-timeout",
        metavar="SECONDS",
        type=float,
        help="give up a blob download not finished after this long (default 3600)",
    )


def cmd_pull(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..oci import pull as _pull

    if args.local_fetch == "zerocopy":
        raise OciError("--local-fetch=zerocopy is not supported (objects are always copied)")
    options = _registry_options(args, args.image)
    repo = opener()
    boot = _boot_transform_fn(repo) if args.bootable else None
    tag = args.name if args.name is not None else args.image
    progress = _Progress() if sys.stderr.isatty() else None
    try:
        result = _pull.pull(
            repo,
            args.image,
            tag,
            platform=args.platform,
            progress=progress,
            registry_options=options,
            boot=boot,
        )
    finally:
        # also on errors and Ctrl-C: the message must not land on the line
        if progress is not None:
            progress.close()
    print(f"manifest {result.manifest_digest}")
    print(f"config   {result.config_digest}")
    print(f"verity   {result.manifest_verity}")
    print(f"tagged   {tag}")
    print(f"objects  {result.stats}")
    if boot is not None:
        print(f"Boot image: {result.boot_image_ids[repo.erofs_version]}")


def cmd_push(args: argparse.Namespace, opener: RepoOpener) -> None:
    """Not in composefs-rs 0.7.0 (its issue #15): copy a stored image out."""
    from ..oci import export

    options = _registry_options(args, args.dest)
    result = export.export_image(opener(), args.image, args.dest, registry_options=options)
    if result.rewritten:
        sys.stderr.write(
            "note: compressed layers are sent uncompressed (the repository keeps only "
            "the uncompressed tars), so the manifest digest changed; the config digest "
            "and the composefs image id did not\n"
        )
    print(f"manifest {result.manifest_digest}")
    print(f"config   {result.config_digest}")
    print(f"pushed   {result.destination}")


def cmd_images(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..oci import stored

    images = stored.list_images(opener())
    if args.json:
        _json_out({"images": [i.to_json() for i in images]})
        return
    if not images:
        print("No images found")
        return
    rows = []
    for i in images:
        short = i.manifest_digest.split(":", 1)[-1][:12]
        rows.append(
            [i.name, short, i.architecture or "artifact", str(i.layer_count), str(i.referrer_count)]
        )
    print(_table(["NAME", "DIGEST", "ARCH", "LAYERS", "REFS"], rows))


def cmd_inspect(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..oci import stored

    repo = opener()
    img = stored.open_image_ref(repo, args.image)
    out = sys.stdout.buffer
    if args.manifest:
        out.write(img.manifest_raw + b"\n")
    elif args.config:
        out.write(img.config_raw + b"\n")
    else:
        _json_out(stored.inspect_json(repo, img))


def cmd_tag(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..oci import stored

    digest = args.manifest_digest.removeprefix("@")
    stored.tag_image(opener(), digest, args.name)
    print(f"Tagged {digest} as {args.name}")


def cmd_untag(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..oci import stored

    stored.untag_image(opener(), args.name)
    print(f"Removed tag {args.name}")


def cmd_layer(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..oci import stored
    from ..oci.image import parse_digest

    parse_digest(args.layer)
    repo = opener()
    out = sys.stdout.buffer
    if args.json:
        _json_out(stored.layer_info(repo, args.layer))
    elif args.dumpfile:
        stored.layer_dumpfile(repo, args.layer, out)
    else:
        if out.isatty():
            raise OciError(
                "Refusing to write tar data to terminal. "
                "Redirect to a file, pipe to tar, or use --json for metadata."
            )
        stored.layer_tar(repo, args.layer, out)
    out.flush()


def cmd_dump(args: argparse.Namespace, opener: RepoOpener) -> None:
    from .. import dumpfile

    root = _tree(args, opener())
    dumpfile.write(root, sys.stdout.buffer, style="rust")
    sys.stdout.buffer.flush()


def cmd_compute_id(args: argparse.Namespace, opener: RepoOpener) -> None:
    from .. import fsverity
    from ..erofs.format import FormatVersion
    from ..erofs.writer import mkfs_buffer

    repo = opener()
    root = _tree(args, repo)
    image = mkfs_buffer(root, FormatVersion(repo.erofs_version))
    print(fsverity.digest_hex(image, repo.algorithm))


def cmd_mount(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..oci import stored

    if (args.upperdir is None) != (args.workdir is None):
        raise OciError("--upperdir and --workdir must be given together")
    if args.read_write and args.upperdir is None:
        raise OciError("--read-write requires --upperdir and --workdir")
    repo = opener()
    ref = args.image
    if not ref.startswith("@") and ref.startswith(("sha256:", "sha512:")):
        ref = "@" + ref  # composefs-rs: a bare digest here is a manifest digest
    img = stored.open_image_ref(repo, ref)
    version = repo.erofs_version
    image_id = img.boot_image_id(version) if args.bootable else img.image_id(version)
    if image_id is None:
        if args.bootable:
            raise OciError("No boot EROFS image linked — try pulling with --bootable")
        raise OciError("No composefs EROFS image linked — try re-pulling the image")
    from ..fuse.server import mount_from_repository, want_fuse

    if want_fuse(args.fuse):
        if args.upperdir is not None:
            raise OciError("a FUSE mount is read-only: no --upperdir/--workdir")
        mount_from_repository(repo, image_id, args.mountpoint, foreground=args.foreground)
        return
    repo.mount(
        image_id,
        args.mountpoint,
        upperdir=args.upperdir,
        workdir=args.workdir,
        read_write=args.read_write,
    )


def cmd_prepare_boot(args: argparse.Namespace, opener: RepoOpener) -> None:
    """composefs-rs ``oci prepare-boot``, except that the boot image is GC-rooted
    (``images/refs/boot/<id>`` for every committed format)."""
    import os

    from .. import boot
    from ..oci import stored

    repo = opener()
    root = stored.resolve_tree(repo, args.reference, args.config_verity)
    entries = boot.transform_for_boot(root, repo=repo)
    if not entries:
        raise OciError("No boot entries!")
    ids = repo.commit_images(root)
    created = []
    try:
        for image_id in ids.values():
            ref = f"images/refs/boot/{image_id}"
            if not os.path.lexists(os.path.join(repo.path, ref)):
                repo.symlink(ref, f"images/{image_id}")
                created.append(ref)
        # composefs-rs prefers the V1 image, then V2 (V0 as a last resort here).
        image_id = next(ids[v] for v in (1, 2, 0) if v in ids)
        fmt = repo.format_config()
        version = 1 if fmt.default in (0, 1) and 2 not in fmt.extra else 2
        karg = boot.ComposefsCmdline(version, image_id, repo.algorithm, repo.insecure)
        boot.write_boot_simple(
            boot.repo_file_opener(repo),
            entries[0],
            karg,
            args.bootdir,
            None,
            args.entry_id,
            list(args.cmdline or []),
        )
        base = os.path.dirname(os.path.abspath(args.repo)) if args.repo else "/sysroot"
        state = os.path.join(base, "state", "deploy", image_id)
        for sub in ("var", "etc/upper", "etc/work"):
            os.makedirs(os.path.join(state, sub), 0o755, exist_ok=True)
    except BaseException:
        # a failed prepare-boot roots nothing (the images it committed are
        # left for gc)
        for ref in created:
            try:
                os.unlink(os.path.join(repo.path, ref))
            except FileNotFoundError:
                pass
        raise


def cmd_fsck(args: argparse.Namespace, opener: RepoOpener) -> int:
    from ..oci.fsck import oci_fsck

    result = oci_fsck(opener(), args.image)
    if args.json:
        _json_out(result.to_json())
        return 0 if result.ok else 1  # non-zero on any problem, JSON or not
    sys.stdout.write(str(result))
    sys.stdout.flush()
    if not result.ok:
        raise OciError("OCI integrity check failed")
    return 0


def cmd_import_layer(args: argparse.Namespace, opener: RepoOpener) -> None:
    from ..oci import pull as _pull
    from ..oci.image import parse_digest

    parse_digest(args.digest)
    repo = opener()
    stdin = sys.stdin.buffer
    # Peek (without consuming) to accept compressed layers too.
    head = stdin.peek(4)[:4] if hasattr(stdin, "peek") else b""
    compression = "none"
    if head[:2] == b"\x1f\x8b":
        compression = "gzip"
    elif head == b"\x28\xb5\x2f\xfd":
        compression = "zstd"
    verity, _stats = _pull.import_layer(
        repo, args.digest, stdin, compression=compression, name=args.name
    )
    print(repo.to_id(verity))


# -- parser ----------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """cfsctl's hook: add the ``oci`` command group."""
    oci = subparsers.add_parser(
        "oci",
        help="OCI images: pull, list, inspect, mount",
        description="OCI images in a composefs repository. REF is a tag or @DIGEST "
        "(a manifest or a config digest).",
    )
    sub = oci.add_subparsers(dest="oci_command", metavar="COMMAND", required=True)

    def add(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    def tree_args(sp: argparse.ArgumentParser, bootable: bool = True) -> None:
        sp.add_argument(
            "reference", metavar="REF", help="tag, or @DIGEST (manifest or config digest)"
        )
        sp.add_argument(
            "config_verity",
            nargs="?",
            metavar="CONFIG_VERITY",
            help="fs-verity id of the config stream (with @CONFIG: skip re-hashing)",
        )
        if bootable:
            sp.add_argument("--bootable", action="store_true", help="apply the boot transformation")

    sp = add("pull", cmd_pull, "pull an image into the repository and tag it")
    sp.add_argument(
        "image",
        help="oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE, "
        "containers-storage:REF or docker://REF",
    )
    sp.add_argument("name", nargs="?", help="tag to give the image (default: IMAGE itself)")
    sp.add_argument("--bootable", action="store_true", help="also commit a bootable image")
    sp.add_argument(
        "--platform", metavar="OS/ARCH[/VARIANT]", help="platform to pick from an index"
    )
    sp.add_argument(
        "--local-fetch",
        choices=("disabled", "auto", "zerocopy"),
        default="disabled",
        help="accepted for compatibility; local images are always copied",
    )
    _registry_args(sp)

    sp = add(
        "push",
        cmd_push,
        "copy a stored image to a registry (docker://REF) or an OCI layout (oci:DIR[:TAG])",
    )
    sp.add_argument("image", metavar="REF", help="tag, or @DIGEST (manifest or config digest)")
    sp.add_argument("dest", metavar="DEST", help="docker://HOST/NAME[:TAG] or oci:DIR[:TAG]")
    _registry_args(sp)

    sp = add("images", cmd_images, "list tagged images")
    sp.add_argument("--json", action="store_true", help="print JSON")

    sp = add("inspect", cmd_inspect, "show an image's manifest, config and composefs image")
    sp.add_argument("image", metavar="REF", help="tag, or @DIGEST (manifest or config digest)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--manifest", action="store_true", help="print only the raw manifest")
    g.add_argument("--config", action="store_true", help="print only the raw config")

    sp = add("tag", cmd_tag, "give a stored image (by manifest digest) a tag")
    sp.add_argument("manifest_digest", metavar="MANIFEST_DIGEST")
    sp.add_argument("name", metavar="NAME")

    sp = add("untag", cmd_untag, "remove a tag")
    sp.add_argument("name", metavar="NAME")

    sp = add("layer", cmd_layer, "a stored layer: raw tar (default), dumpfile or JSON")
    sp.add_argument("layer", metavar="DIFF_ID")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--dumpfile", action="store_true", help="one dumpfile line per entry")
    g.add_argument("--json", action="store_true", help="metadata as JSON")

    sp = add("dump", cmd_dump, "print the dumpfile of an image's merged filesystem")
    tree_args(sp)

    sp = add("compute-id", cmd_compute_id, "print the composefs image id of an image")
    tree_args(sp)

    sp = add("mount", cmd_mount, "mount an image's composefs filesystem")
    sp.add_argument("image", metavar="IMAGE", help="tag, or manifest digest")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--bootable", action="store_true", help="mount the bootable image")
    sp.add_argument("--upperdir", metavar="DIR", help="writable overlayfs upper directory")
    sp.add_argument("--workdir", metavar="DIR", help="overlayfs work directory")
    sp.add_argument("--read-write", action="store_true", help="mount read-write")
    fuse_options(sp)

    sp = add(
        "prepare-boot",
        cmd_prepare_boot,
        "commit an image's bootable form and install its first boot entry",
    )
    tree_args(sp, bootable=False)
    sp.add_argument("--bootdir", default="/boot", help="boot directory (default: /boot)")
    sp.add_argument("--entry-id", metavar="ID", help="name the entry ID.conf, files under /ID/")
    sp.add_argument(
        "--cmdline", action="append", metavar="ARG", help="extra kernel argument (repeatable)"
    )

    sp = add(
        "fsck",
        cmd_fsck,
        "check the repository and its OCI images; exit status 1 on any problem, "
        "with or without --json (composefs-rs exits 0 with --json)",
    )
    sp.add_argument("image", nargs="?", metavar="IMAGE", help="check only this tag")
    sp.add_argument("--json", action="store_true", help="print the report as JSON")

    sp = add(
        "import-layer", cmd_import_layer, "import a layer tar from stdin (checked against DIGEST)"
    )
    sp.add_argument("digest", metavar="DIGEST", help="the layer's diff_id (sha256:…)")
    sp.add_argument("name", nargs="?", metavar="NAME", help="stream ref name (refs/NAME)")
