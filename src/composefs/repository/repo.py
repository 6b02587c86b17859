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
import os
from collections.abc import Callable, Iterable
from typing import IO, Any, BinaryIO, TypeVar

from ..errors import ComposefsError, RepositoryError, VerityNotSupported
from ..splitstream import SplitStreamReader, SplitStreamWriter, Writable
from ._fs import HEX_LENGTHS, _exists
from .images import ImageStore
from .maintenance import FsckResult, GcResult, Maintenance
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
from .objects import ObjectStore, StoreMethod
from .streams import RepoStreamWriter, StreamStore

T = TypeVar("T")


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
        self.images = ImageStore(self.objects, self.format_config)
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
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        meta = RepoMetadata.new(algorithm, formats)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                _write_metadata(fd, meta, not insecure)
                created = True
            except (OSError, ComposefsError) as e:
                existing, _ = _read_metadata(fd)
                if existing is None:
                    if isinstance(e, VerityNotSupported):
                        raise RepositoryError(
                            f"cannot enable fs-verity on {REPO_METADATA_FILENAME}: "
                            "the filesystem does not support it (use --insecure)"
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

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

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

    # -- objects (`ObjectStore`) ----------------------------------------
    def ensure_writable(self) -> None:
        self.objects.ensure_writable()

    def sync(self) -> None:
        self.objects.sync()

    @property
    def objects_dir(self) -> str:
        return self.objects.objects_dir

    def object_relpath(self, object_id: str) -> str:
        return self.objects.object_relpath(object_id)

    def has_object(self, object_id: str) -> bool:
        return self.objects.has_object(object_id)

    def ensure_object(self, data: bytes | bytearray | memoryview | BinaryIO | IO[bytes]) -> str:
        return self.objects.ensure_object(data)

    def ensure_object_from_stream(
        self, source: BinaryIO | IO[bytes], size: int | None = None
    ) -> str:
        return self.objects.ensure_object_from_stream(source, size)

    def ensure_object_from_file(
        self, path_or_fd: str | os.PathLike[str] | int
    ) -> tuple[str, StoreMethod]:
        return self.objects.ensure_object_from_file(path_or_fd)

    def store_file_with_digest(
        self, path_or_fd: str | os.PathLike[str] | int, object_id: str
    ) -> bool:
        return self.objects.store_file_with_digest(path_or_fd, object_id)

    def object_sink(self) -> Callable[[str, int, str], None]:
        return self.objects.object_sink()

    def open_object(self, object_id: str) -> int:
        return self.objects.open_object(object_id)

    def open_object_file(self, object_id: str) -> BinaryIO:
        return self.objects.open_object_file(object_id)

    def read_object(self, object_id: str) -> bytes:
        return self.objects.read_object(object_id)

    def symlink(self, name: str, target: str) -> None:
        self.objects.symlink(name, target)

    # -- streams and refs (`StreamStore`) ------------------------------
    def create_stream(self, content_type: int = 0) -> RepoStreamWriter:
        return self.streams.create_stream(content_type)

    def store_stream(self, writer: SplitStreamWriter) -> str:
        return self.streams.store_stream(writer)

    def register_stream(
        self, object_id: str, content_id: str, reference: str | None = None
    ) -> None:
        self.streams.register_stream(object_id, content_id, reference)

    def write_stream(
        self, writer: SplitStreamWriter, content_id: str, reference: str | None = None
    ) -> str:
        return self.streams.write_stream(writer, content_id, reference)

    def ensure_stream(
        self,
        content_id: str,
        content_type: int,
        callback: Callable[[RepoStreamWriter], T],
        reference: str | None = None,
    ) -> tuple[str, T | None]:
        return self.streams.ensure_stream(content_id, content_type, callback, reference)

    def has_stream(self, content_id: str) -> str | None:
        return self.streams.has_stream(content_id)

    def name_stream(self, content_id: str, name: str) -> None:
        self.streams.name_stream(content_id, name)

    def has_named_stream(self, name: str) -> bool:
        return self.streams.has_named_stream(name)

    def remove_stream_ref(self, name: str) -> bool:
        return self.streams.remove_stream_ref(name)

    def list_stream_refs(self, prefix: str = "") -> list[tuple[str, str]]:
        return self.streams.list_stream_refs(prefix)

    def stream_id(self, name: str) -> str | None:
        return self.streams.stream_id(name)

    def open_stream(
        self,
        name: str,
        verity: str | None = None,
        expected_content_type: int | None = None,
    ) -> SplitStreamReader:
        return self.streams.open_stream(name, verity, expected_content_type)

    def cat_stream(
        self,
        name: str,
        out: Writable,
        verity: str | None = None,
        expected_content_type: int | None = None,
    ) -> int:
        return self.streams.cat_stream(name, out, verity, expected_content_type)

    # -- images (`ImageStore`) ----------------------------------------
    def write_image(self, data: bytes | bytearray | memoryview, name: str | None = None) -> str:
        return self.images.write_image(data, name)

    def import_image(self, source: BinaryIO | IO[bytes], name: str | None = None) -> str:
        return self.images.import_image(source, name)

    def commit_images(self, root: Any, name: str | None = None) -> dict[int, str]:
        return self.images.commit_images(root, name)

    def commit_image(self, root: Any, name: str | None = None) -> str:
        return self.images.commit_image(root, name)

    def open_image(self, name: str) -> tuple[int, bool]:
        return self.images.open_image(name)

    def read_image(self, name: str) -> bytes:
        return self.images.read_image(name)

    def objects_for_image(self, name: str) -> list[str]:
        return self.images.objects_for_image(name)

    def mount(
        self,
        name: str,
        mountpoint: str,
        *,
        upperdir: str | None = None,
        workdir: str | None = None,
        read_write: bool = False,
    ) -> None:
        self.images.mount(
            name, mountpoint, upperdir=upperdir, workdir=workdir, read_write=read_write
        )

    # -- maintenance --------------------------------------------------
    def gc(
        self, roots: Iterable[str] = (), *, dry_run: bool = False, wait: bool = True
    ) -> GcResult:
        return self.maintenance.gc(roots, dry_run=dry_run, wait=wait)

    def fsck(self, *, metadata_only: bool = False, threads: int | None = None) -> FsckResult:
        return self.maintenance.fsck(metadata_only=metadata_only, threads=threads)
