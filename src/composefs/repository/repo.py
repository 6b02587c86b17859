"""The `Repository` facade: one open repository, composed of its rooms.

`Repository.open` / `Repository.init` take the shared lock, read (or write)
``meta.json`` (`.meta`) and build the parts: `objects` (`ObjectStore`:
object writes, fs-verity, reads, symlinks), `streams` (`StreamStore`:
splitstreams and their refs), `images` (`ImageStore`: EROFS images and
mounting) and `maintenance` (`Maintenance`: gc and fsck). The methods below
the configuration section delegate to those parts, so callers keep one
object (the way dulwich's ``Repo`` sits over its ``ObjectStore`` and
``RefsContainer``); see the parts for what each method does.
"""

from __future__ import annotations

import fcntl
import functools
import os
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from ..errors import ComposefsError, RepositoryError, VerityNotSupported
from ._fs import HEX_LENGTHS, _exists
from .images import ImageStore
from .maintenance import Maintenance
from .meta import (
    REPO_METADATA_FILENAME,
    FormatConfig,
    RepoMetadata,
    _infer_metadata,
    _read_metadata,
    _reset_metadata,
    _write_metadata,
    algorithm_from_string,
    algorithm_string,
)
from .objects import ObjectStore
from .streams import StreamStore

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")


def _via(
    part: Callable[[Repository], S], method: Callable[Concatenate[S, P], R]
) -> Callable[Concatenate[Repository, P], R]:
    """`method` of a part, as a `Repository` method: same signature (checked
    by mypy), same docstring, called on ``part(repo)``."""

    @functools.wraps(method)
    def delegate(self: Repository, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return method(part(self), *args, **kwargs)

    return delegate


def _objects(repo: Repository) -> ObjectStore:
    return repo.objects


def _streams(repo: Repository) -> StreamStore:
    return repo.streams


def _images(repo: Repository) -> ImageStore:
    return repo.images


def _maintenance(repo: Repository) -> Maintenance:
    return repo.maintenance


class Repository:
    """An open composefs repository.

    Create one with `Repository.open()` or `Repository.init()`; close it
    (or use ``with``) to release the shared lock.
    """

    def __init__(
        self, path: str, fd: int, metadata: RepoMetadata, insecure: bool, read_only: list[str]
    ) -> None:
        self.path = path
        self.metadata = metadata
        self.algorithm = metadata.algorithm
        self.insecure = insecure
        self.read_only_features = read_only
        self._erofs_override: int | None = None
        self.objects = ObjectStore(path, fd, metadata.algorithm, insecure, read_only)
        self.streams = StreamStore(self.objects)
        # The parts hold no reference back to the facade: dropping the last
        # reference to a Repository closes it (and releases its lock) at once.
        self.images = ImageStore(self.objects, metadata.format_config())
        self.maintenance = Maintenance(self.objects, self.streams, self.images)

    # -- opening ---------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        upgrade: bool = True,
        insecure: bool = False,
        require_verity: bool = False,
        hash: str | None = None,
        erofs_version: int | None = None,
    ) -> Repository:
        """Open the repository at `path` (shared lock held until `close`).

        A legacy repository without ``meta.json`` is upgraded (algorithm
        inferred from object names) unless `upgrade` is False. `hash`
        ("sha256"/"sha512"), when given, must match the repository's.
        `insecure` skips fs-verity checks even in a secure repository;
        `require_verity` refuses an insecure one. `erofs_version` overrides
        the formats images are committed in, for this instance only.
        """
        path = os.fspath(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise RepositoryError(f"cannot open repository {path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            meta, has_verity = _read_metadata(fd)
            if meta is None:
                if not _exists(fd, "objects"):
                    raise RepositoryError(
                        f"{REPO_METADATA_FILENAME} not found in {path}; this repository "
                        "must be initialized with `cfsctl init`"
                    )
                if not upgrade:
                    raise RepositoryError(
                        f"{REPO_METADATA_FILENAME} not found in {path}; this appears to be an "
                        "old-format repository (run `cfsctl init` to migrate it)"
                    )
                algorithm, has_verity = _infer_metadata(fd)
                _write_metadata(fd, RepoMetadata.new(algorithm), has_verity)
                meta, has_verity = _read_metadata(fd)
                assert meta is not None
            read_only = meta.check_compatible()
            if hash is not None and hash != meta.algorithm:
                raise RepositoryError(
                    f"repository is configured for {algorithm_string(meta.algorithm)} "
                    f"(from {REPO_METADATA_FILENAME}) but --hash {hash} was specified"
                )
            repo = cls(path, fd, meta, insecure or not has_verity, read_only)
        except BaseException:
            os.close(fd)
            raise
        if require_verity and not has_verity:
            repo.close()
            raise RepositoryError(
                "repository was not initialized with fs-verity (hint: re-create with "
                "`cfsctl init` on a verity-capable filesystem)"
            )
        if erofs_version is not None:
            repo.set_erofs_version(erofs_version)
        return repo

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        algorithm: str = "sha512",
        insecure: bool = False,
        formats: FormatConfig | None = None,
        reset_metadata: bool = False,
    ) -> tuple[Repository, bool]:
        """Create (or idempotently re-open) a repository; returns
        (repository, created). The directory is made 0700; its parents must
        exist. `algorithm` is "sha256"/"sha512" or ``fsverity-<hash>-12``.
        Without `insecure`, ``meta.json`` gets fs-verity, which fails on
        filesystems without it. An existing repository with a different
        configuration is an error unless `reset_metadata` (which drops
        ``images/``, ``streams/`` and ``meta.json`` but keeps objects).
        """
        path = os.fspath(path)
        if algorithm.startswith("fsverity-"):
            algorithm = algorithm_from_string(algorithm)
        if algorithm not in HEX_LENGTHS:
            raise RepositoryError(f"unknown algorithm {algorithm!r}")
        if reset_metadata:
            _reset_metadata(path)
        made_dir = False
        try:
            os.mkdir(path, 0o700)
            made_dir = True
        except FileExistsError:
            pass
        meta = RepoMetadata.new(algorithm, formats)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            if made_dir:
                os.rmdir(path)
            raise
        try:
            try:
                _write_metadata(fd, meta, not insecure)
                created = True
            except (OSError, ComposefsError) as e:
                existing, _ = _read_metadata(fd)
                if existing is None:
                    if made_dir:
                        # a failed init leaves no empty directory behind
                        os.rmdir(path)
                    if isinstance(e, VerityNotSupported):
                        raise RepositoryError(
                            f"cannot initialize a repository at {path}: cannot enable "
                            f"fs-verity on {REPO_METADATA_FILENAME}: the filesystem does not "
                            "support it (use --insecure)"
                        ) from None
                    raise
                if existing != meta:
                    raise RepositoryError(
                        "repository already initialized with different configuration "
                        f"(algorithm: {algorithm_string(existing.algorithm)}, erofs_version: "
                        f"V{existing.format_config().default}); cannot re-initialize with "
                        f"(algorithm: {algorithm_string(meta.algorithm)}, erofs_version: "
                        f"V{meta.format_config().default})"
                    ) from None
                created = False
            if created:
                try:
                    os.mkdir("objects", 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
        finally:
            os.close(fd)
        return cls.open(path), created

    def close(self) -> None:
        """Release the lock and the file descriptors."""
        self.objects.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno(self) -> int:
        """The repository directory fd (holds the lock)."""
        return self.objects.dirfd

    # -- configuration ---------------------------------------------------
    @property
    def algorithm_string(self) -> str:
        return algorithm_string(self.algorithm)

    def set_erofs_version(self, version: int) -> None:
        """Commit images in exactly this format (this instance only)."""
        if version not in (0, 1, 2):
            raise RepositoryError(f"unknown EROFS format version {version}")
        self._erofs_override = version
        self.images.formats = FormatConfig(version)

    def format_config(self) -> FormatConfig:
        if self._erofs_override is not None:
            return FormatConfig(self._erofs_override)
        return self.metadata.format_config()

    @property
    def erofs_version(self) -> int:
        """The default format images are committed in."""
        return self.format_config().default

    def to_id(self, object_id: str) -> str:
        """composefs-rs's printable id: ``sha512:<hex>``."""
        return f"{self.algorithm}:{object_id}"

    # -- the parts' methods, on the facade -----------------------------------
    # Each is the part's own method (same signature and docstring), called
    # on that part: see `_via`.
    @property
    def objects_dir(self) -> str:
        """Path of ``objects/`` (the overlayfs data-only layer)."""
        return self.objects.objects_dir

    # ObjectStore
    ensure_writable = _via(_objects, ObjectStore.ensure_writable)
    sync = _via(_objects, ObjectStore.sync)
    object_relpath = _via(_objects, ObjectStore.object_relpath)
    has_object = _via(_objects, ObjectStore.has_object)
    ensure_object = _via(_objects, ObjectStore.ensure_object)
    ensure_object_from_stream = _via(_objects, ObjectStore.ensure_object_from_stream)
    ensure_object_from_file = _via(_objects, ObjectStore.ensure_object_from_file)
    store_file_with_digest = _via(_objects, ObjectStore.store_file_with_digest)
    object_sink = _via(_objects, ObjectStore.object_sink)
    open_object = _via(_objects, ObjectStore.open_object)
    open_object_file = _via(_objects, ObjectStore.open_object_file)
    read_object = _via(_objects, ObjectStore.read_object)
    symlink = _via(_objects, ObjectStore.symlink)

    # StreamStore
    create_stream = _via(_streams, StreamStore.create_stream)
    store_stream = _via(_streams, StreamStore.store_stream)
    register_stream = _via(_streams, StreamStore.register_stream)
    write_stream = _via(_streams, StreamStore.write_stream)
    ensure_stream = _via(_streams, StreamStore.ensure_stream)
    has_stream = _via(_streams, StreamStore.has_stream)
    helper_ahead = _via(_streams, StreamStore.helper_ahead)
    stream_named = _via(_streams, StreamStore.stream_named)
    name_stream = _via(_streams, StreamStore.name_stream)
    has_named_stream = _via(_streams, StreamStore.has_named_stream)
    remove_stream_ref = _via(_streams, StreamStore.remove_stream_ref)
    list_stream_refs = _via(_streams, StreamStore.list_stream_refs)
    stream_id = _via(_streams, StreamStore.stream_id)
    open_stream = _via(_streams, StreamStore.open_stream)
    cat_stream = _via(_streams, StreamStore.cat_stream)

    # ImageStore
    write_image = _via(_images, ImageStore.write_image)
    link_image = _via(_images, ImageStore.link_image)
    import_image = _via(_images, ImageStore.import_image)
    commit_images = _via(_images, ImageStore.commit_images)
    commit_image = _via(_images, ImageStore.commit_image)
    open_image = _via(_images, ImageStore.open_image)
    read_image = _via(_images, ImageStore.read_image)
    objects_for_image = _via(_images, ImageStore.objects_for_image)
    mount = _via(_images, ImageStore.mount)

    # Maintenance
    gc = _via(_maintenance, Maintenance.gc)
    discard_unreferenced = _via(_maintenance, Maintenance.discard_unreferenced)
    fsck = _via(_maintenance, Maintenance.fsck)
