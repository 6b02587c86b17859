"""A composefs repository: content-addressed objects, splitstreams, images, refs.

The on-disk layout is composefs-rs 0.7.0's (``doc/repository.md``), so either
implementation can read what the other wrote::

    repo/                       (0700)
    ├── meta.json               version, algorithm, feature flags, erofs_formats
    ├── objects/XX/<rest>       content objects named by fs-verity digest
    ├── images/<hex>            -> ../objects/XX/<rest>     EROFS images
    ├── images/refs/<name…>     -> ../../images/<hex>       image refs (GC roots)
    ├── streams/<content-id>    -> ../objects/XX/<rest>     splitstreams
    └── streams/refs/<name…>    -> ../streams/<content-id>  stream refs (GC roots)

Objects appear atomically: they are written to an anonymous ``O_TMPFILE`` in
``objects/`` (or, where the filesystem lacks it, a ``.tmp-*`` file in the
repository root that garbage collection cleans up), fs-verity is enabled when
the repository is secure, and the file is linked under its digest with
``linkat``. An object that already exists is simply reused, so two processes
writing the same object are fine. Symlinks are replaced atomically (a
``.symlink-*`` temporary in the repository root renamed over the old one).
A stream's or image's name is only linked after everything it refers to is
on disk, so ``kill -9`` at any moment leaves at most unreferenced objects,
which ``fsck`` accepts and ``gc`` removes.

A repository is *secure* when ``meta.json`` itself has fs-verity (``init``
without ``--insecure`` on a filesystem with fs-verity): objects then get
fs-verity and every digest comes from the kernel. Otherwise it is *insecure*
and digests are computed in userspace.

Locking follows composefs-rs: a shared ``flock`` on the repository directory
while it is open, exclusive for garbage collection (so ``cfsctl transaction``,
which just holds the repository open, keeps GC away).

Names: object, image and stream ids are lowercase hex fs-verity digests;
"ids" in composefs-rs output (`to_id`) are ``sha512:<hex>``. Image and stream
*names* are either a hex id / content identifier or ``refs/<path>``.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import fcntl
import json
import os
import re
import secrets
import stat
import string
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, TypeVar

from . import fsverity
from .errors import (
    ComposefsError,
    NotFoundError,
    RepositoryError,
    SplitstreamError,
    VerityError,
    VerityNotEnabled,
    VerityNotSupported,
)
from .splitstream import SplitStreamReader, SplitStreamWriter, Writable

__all__ = [
    "REPO_FORMAT_VERSION",
    "FeatureFlags",
    "FormatConfig",
    "FsckError",
    "FsckResult",
    "GcResult",
    "RepoMetadata",
    "RepoStreamWriter",
    "Repository",
    "StoreMethod",
    "algorithm_from_string",
    "algorithm_string",
    "default_path",
    "peek_algorithm",
    "system_path",
    "user_path",
]

REPO_METADATA_FILENAME = "meta.json"
REPO_FORMAT_VERSION = 1
V1_EROFS = "v1_erofs"
KNOWN_COMPAT: frozenset[str] = frozenset()
KNOWN_RO_COMPAT: frozenset[str] = frozenset({V1_EROFS})
KNOWN_INCOMPAT: frozenset[str] = frozenset()
HEX_LENGTHS = {"sha256": 64, "sha512": 128}
_HEXDIGITS = frozenset(string.hexdigits.lower())
_HEX_RE = re.compile("[0-9a-f]*")
_COPY_BLOCK = 1 << 20
# Stream objects up to this size are read into memory and stored in one go.
_SMALL_OBJECT = 1 << 20
_FICLONE = 0x40049409
_NO_REFLINK = frozenset({errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EPERM})
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT})

T = TypeVar("T")


def user_path() -> str:
    """The per-user repository, ``$HOME/.var/lib/composefs``."""
    home = os.environ.get("HOME")
    if not home:
        raise RepositoryError("$HOME must be set when in user mode")
    return os.path.join(home, ".var/lib/composefs")


def system_path() -> str:
    """The system repository, ``/sysroot/composefs``."""
    return "/sysroot/composefs"


def default_path() -> str:
    """System repository for root, the user's otherwise (composefs-rs rule)."""
    return system_path() if os.geteuid() == 0 else user_path()


def peek_algorithm(path: str | os.PathLike[str], *, infer: bool = True) -> str | None:
    """The hash algorithm of the repository at `path` without opening it
    (no lock, nothing written): from ``meta.json``, else (with `infer`)
    from object name lengths; None when it cannot be told."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        meta, _ = _read_metadata(fd)
        if meta is not None:
            return meta.algorithm
        if infer and _exists(fd, "objects"):
            return _infer_metadata(fd)[0]
        return None
    except (OSError, ComposefsError):
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# meta.json


def algorithm_string(algorithm: str) -> str:
    """``sha512`` → ``fsverity-sha512-12``."""
    return f"fsverity-{algorithm}-12"


def algorithm_from_string(value: str) -> str:
    """Parse ``fsverity-<hash>-<lg_blocksize>``; returns the hash name."""
    rest = value.removeprefix("fsverity-")
    if rest == value:
        raise RepositoryError(f"invalid algorithm {value!r}: must start with 'fsverity-'")
    hash_name, sep, lg = rest.rpartition("-")
    if not sep:
        raise RepositoryError(
            f"invalid algorithm {value!r}: must be 'fsverity-<hash>-<lg_blocksize>'"
        )
    if not lg.isdigit():
        raise RepositoryError(f"invalid algorithm {value!r}: invalid block size {lg!r}")
    if int(lg) != 12:
        raise RepositoryError(f"invalid algorithm {value!r}: unsupported block size 2^{lg}")
    if hash_name not in HEX_LENGTHS:
        raise RepositoryError(f"invalid algorithm {value!r}: unknown hash {hash_name!r}")
    return hash_name


@dataclass(frozen=True)
class FormatConfig:
    """Which EROFS formats images are committed in: `default` (gets the
    ref name) plus `extra` ones (0 = V0, 1 = V1, 2 = V2)."""

    default: int = 2
    extra: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for v in (self.default, *self.extra):
            if v not in (0, 1, 2):
                raise RepositoryError(f"unknown EROFS format version {v}")
        object.__setattr__(self, "extra", tuple(sorted(set(self.extra))))

    def versions(self) -> list[int]:
        """Default first, then the extra ones in order (duplicates dropped)."""
        return [self.default, *(v for v in self.extra if v != self.default)]

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"default": self.default}
        if self.extra:
            d["extra"] = list(self.extra)
        return d


@dataclass
class FeatureFlags:
    """ext4-style feature flags: unknown `compatible` ones are ignored,
    unknown `read_only_compatible` ones make the repository read-only,
    unknown `incompatible` ones make it unusable."""

    compatible: list[str] = field(default_factory=list)
    read_only_compatible: list[str] = field(default_factory=list)
    incompatible: list[str] = field(default_factory=list)

    def unknown_incompatible(self) -> list[str]:
        return [f for f in self.incompatible if f not in KNOWN_INCOMPAT]

    def unknown_read_only(self) -> list[str]:
        return [f for f in self.read_only_compatible if f not in KNOWN_RO_COMPAT]


@dataclass
class RepoMetadata:
    """The content of ``meta.json``."""

    algorithm: str = "sha512"
    version: int = REPO_FORMAT_VERSION
    features: FeatureFlags = field(default_factory=FeatureFlags)
    erofs_formats: FormatConfig = field(default_factory=FormatConfig)

    @classmethod
    def new(cls, algorithm: str, formats: FormatConfig | None = None) -> RepoMetadata:
        """Metadata for a new repository; `v1_erofs` is set iff V1 is the default."""
        formats = formats or FormatConfig()
        features = FeatureFlags()
        if formats.default == 1:
            features.read_only_compatible.append(V1_EROFS)
        return cls(algorithm, REPO_FORMAT_VERSION, features, formats)

    def format_config(self) -> FormatConfig:
        """Effective formats: `erofs_formats` when set to anything but the
        default, else derived from the legacy `v1_erofs` flag."""
        if self.erofs_formats != FormatConfig():
            return self.erofs_formats
        if V1_EROFS in self.features.read_only_compatible:
            return FormatConfig(1)
        return FormatConfig()

    def to_json(self) -> bytes:
        """Pretty JSON plus newline, byte-identical to composefs-rs's serde output."""
        doc = {
            "version": self.version,
            "algorithm": algorithm_string(self.algorithm),
            "features": {
                "compatible": self.features.compatible,
                "read-only-compatible": self.features.read_only_compatible,
                "incompatible": self.features.incompatible,
            },
            "erofs_formats": self.erofs_formats.to_json(),
        }
        return json.dumps(doc, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> RepoMetadata:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise RepositoryError(f"failed to parse {REPO_METADATA_FILENAME}: {e}") from None
        try:
            if not isinstance(doc, dict):
                raise TypeError("not a JSON object")
            version = doc["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise TypeError("version must be an unsigned integer")
            algorithm = algorithm_from_string(_str(doc["algorithm"]))
            feats = doc.get("features") or {}
            if not isinstance(feats, dict):
                raise TypeError("features must be an object")
            features = FeatureFlags(
                _strlist(feats.get("compatible", [])),
                _strlist(feats.get("read-only-compatible", [])),
                _strlist(feats.get("incompatible", [])),
            )
            fmt = doc.get("erofs_formats")
            if fmt is None:
                formats = FormatConfig()
            else:
                if not isinstance(fmt, dict):
                    raise TypeError("erofs_formats must be an object")
                extra = fmt.get("extra", [])
                if not isinstance(extra, list) or not all(_is_int(v) for v in extra):
                    raise TypeError("erofs_formats.extra must be a list of integers")
                if not _is_int(fmt["default"]):
                    raise TypeError("erofs_formats.default must be an integer")
                formats = FormatConfig(fmt["default"], tuple(extra))
        except (KeyError, TypeError, RepositoryError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise RepositoryError(f"failed to parse {REPO_METADATA_FILENAME}: {what}") from None
        return cls(algorithm, version, features, formats)

    def check_compatible(self) -> list[str]:
        """Refuse what we cannot use; return unknown read-only-compatible
        features (non-empty → open read-only)."""
        if self.version > REPO_FORMAT_VERSION:
            raise RepositoryError(
                f"unsupported repository format version {self.version} "
                f"(this tool supports up to {REPO_FORMAT_VERSION})"
            )
        unknown = self.features.unknown_incompatible()
        if unknown:
            raise RepositoryError(
                f"repository requires unknown incompatible features: {', '.join(unknown)}"
            )
        return self.features.unknown_read_only()


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise TypeError("algorithm must be a string")
    return v


def _strlist(v: object) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TypeError("feature flags must be lists of strings")
    return list(v)


# ---------------------------------------------------------------------------
# results


class StoreMethod(enum.Enum):
    """How `ensure_object_from_file` stored an object."""

    REFLINKED = "reflinked"
    COPIED = "copied"
    ALREADY_PRESENT = "already-present"


@dataclass
class GcResult:
    """What garbage collection removed (or, in a dry run, would remove)."""

    objects_removed: int = 0
    objects_bytes: int = 0
    images_pruned: int = 0
    streams_pruned: int = 0
    removed_objects: list[str] = field(default_factory=list)

    def to_reply(self) -> dict[str, int]:
        """The varlink `GcResult` fields."""
        return {
            "objects_removed": self.objects_removed,
            "objects_bytes": self.objects_bytes,
            "images_pruned": self.images_pruned,
            "streams_pruned": self.streams_pruned,
        }


# kind -> message template (composefs-rs FsckError Display)
_FSCK_FORMATS = {
    "object-invalid-name": "{path}: {detail}",
    "object-open-failed": "{path}: {detail}",
    "object-digest-mismatch": "{path}: measured {measured}",
    "object-verity-failed": "{path}: {detail}",
    "object-verity-missing": "{path}",
    "entry-not-symlink": "{path}",
    "broken-symlink": "{path}",
    "stat-failed": "{path}: {detail}",
    "unexpected-file-type": "{path}: {detail}",
    "stream-open-failed": "{path}: {detail}",
    "missing-object-ref": "{path}: {object_id}",
    "stream-read-failed": "{path}: {detail}",
    "missing-named-ref": "{path}: ref {ref_name}: {object_id}",
    "object-check-failed": "{path}: {object_id}: {detail}",
    "image-open-failed": "{path}: {detail}",
    "image-read-failed": "{path}: {detail}",
    "image-invalid": "{path}: {detail}",
    "image-missing-object": "{path}: {object_id}",
    "metadata-parse-failed": "meta.json: {detail}",
    "metadata-algorithm-mismatch": "meta.json: expected {expected}, repository opened as {actual}",
}
FSCK_ERROR_KINDS = tuple(_FSCK_FORMATS)


@dataclass(frozen=True)
class FsckError:
    """One problem found by `Repository.fsck`; `kind` is one of
    `FSCK_ERROR_KINDS`. `str()` gives composefs-rs's ``fsck: <kind>: …`` line."""

    kind: str
    path: str = ""
    detail: str = ""
    measured: str = ""
    object_id: str = ""
    ref_name: str = ""
    expected: str = ""
    actual: str = ""

    def __post_init__(self) -> None:
        # File names that are not UTF-8 are shown lossily (like Rust's
        # from_utf8_lossy), so reports can always be printed.
        for k in self.__dataclass_fields__:
            v = getattr(self, k)
            lossy = v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            if lossy != v:
                object.__setattr__(self, k, lossy)

    def __str__(self) -> str:
        values = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return f"fsck: {self.kind}: " + _FSCK_FORMATS[self.kind].format(**values)


@dataclass
class FsckResult:
    """The outcome of `Repository.fsck`. `str()` is the human report of
    ``cfsctl fsck``; `to_reply()` the JSON (varlink ``FsckReply``) form."""

    has_metadata: bool = False
    objects_checked: int = 0
    objects_corrupted: int = 0
    streams_checked: int = 0
    streams_corrupted: int = 0
    images_checked: int = 0
    images_corrupted: int = 0
    broken_links: int = 0
    missing_objects: int = 0
    errors: list[FsckError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def kinds(self) -> set[str]:
        return {e.kind for e in self.errors}

    def to_reply(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "has_metadata": self.has_metadata,
            "objects_checked": self.objects_checked,
            "objects_corrupted": self.objects_corrupted,
            "streams_checked": self.streams_checked,
            "streams_corrupted": self.streams_corrupted,
            "images_checked": self.images_checked,
            "images_corrupted": self.images_corrupted,
            "broken_links": self.broken_links,
            "missing_objects": self.missing_objects,
            "errors": [str(e) for e in self.errors],
        }

    def __str__(self) -> str:
        meta_err = any(e.kind.startswith("metadata-") for e in self.errors)
        lines = [
            "meta.json: " + ("error" if meta_err else "ok" if self.has_metadata else "absent"),
            f"objects: {self.objects_checked - self.objects_corrupted}/{self.objects_checked} ok",
            f"streams: {self.streams_checked - self.streams_corrupted}/{self.streams_checked} ok",
            f"images: {self.images_checked - self.images_corrupted}/{self.images_checked} ok",
        ]
        if self.broken_links:
            lines.append(f"broken symlinks: {self.broken_links}")
        if self.missing_objects:
            lines.append(f"missing objects: {self.missing_objects}")
        if self.ok:
            lines.append("status: ok")
        else:
            lines.append(f"status: {len(self.errors)} error(s)")
            lines.extend(f"  - {e}" for e in self.errors)
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# low-level helpers


_libc: Any = None


def _syncfs(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _tmpname(prefix: str) -> str:
    alphabet = string.ascii_letters + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(12))


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _proc_self_fd(path: str | os.PathLike[str]) -> int | None:
    """N for a ``/proc/self/fd/N`` path naming a readable descriptor, else
    None (then the path is opened as usual, which also reopens write-only
    and O_PATH descriptors for reading)."""
    if isinstance(path, str) and path.startswith("/proc/self/fd/"):
        rest = path[len("/proc/self/fd/") :]
        if rest.isdigit() and rest.isascii():
            fd = int(rest)
            try:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            except OSError:
                return None
            if flags & os.O_ACCMODE != os.O_WRONLY and not flags & getattr(os, "O_PATH", 0):
                return fd
    return None


def _read_exactly(source: BinaryIO | IO[bytes], size: int) -> bytes:
    """`size` bytes from `source` (which may return short reads)."""
    first = source.read(size)
    if len(first) == size:
        return first
    parts = [first]
    got = len(first)
    while got < size:
        block = source.read(size - got)
        if not block:
            raise RepositoryError(f"short read: {size - got} bytes missing")
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _is_hex_id(name: str, algorithm: str) -> bool:
    # A regex match is ~10x cheaper than building a set of the characters,
    # which shows with thousands of objects per layer.
    return len(name) == HEX_LENGTHS[algorithm] and _HEX_RE.fullmatch(name) is not None


def _object_id_from_path(target: str, algorithm: str) -> str | None:
    """The id in a symlink target ``…/XX/<rest>``, or None."""
    parts = target.rsplit("/", 2)
    if len(parts) < 2:
        return None
    hex_id = parts[-2] + parts[-1]
    if len(parts[-2]) != 2 or not _is_hex_id(hex_id, algorithm):
        return None
    return hex_id


def _check_relpath(name: str, what: str) -> list[str]:
    """Split a repository-relative name; refuse anything that could escape."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise RepositoryError(f"invalid {what} {name!r}")
    if "\0" in name:
        raise RepositoryError(f"invalid {what} {name!r}")
    return parts


class _FdWriter:
    """A minimal binary writer over a raw fd that hashes what passes through."""

    def __init__(self, fd: int, hasher: fsverity.FsVerityHasher | None) -> None:
        self.fd = fd
        self.hasher = hasher
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.hasher is not None:
            self.hasher.update(data)
        _write_all(self.fd, data)
        self.size += len(data)
        return len(data)


class _TmpObject:
    """An object being written: an anonymous O_TMPFILE, or (fallback) a
    ``.tmp-*`` file in the repository root."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.name: str | None = None
        objects = repo._objects_fd()
        try:
            self.fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=objects)
        except OSError as e:
            if e.errno not in _NO_TMPFILE:
                raise
            for _ in range(16):
                name = _tmpname(".tmp-")
                try:
                    self.fd = os.open(
                        name, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644,
                        dir_fd=repo._fd,
                    )  # fmt: skip
                except FileExistsError:
                    continue
                self.name = name
                break
            else:
                raise RepositoryError("cannot create a temporary file in the repository") from e

    def reopen_readonly(self) -> None:
        """Swap the writable fd for a read-only one (fs-verity needs that)."""
        ro = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(self.fd)
        self.fd = ro

    def link(self, relpath: str) -> bool:
        """Give the file its name under ``objects/``; False if it existed."""
        objects = self.repo._objects_fd()
        try:
            if self.name is None:
                os.link(f"/proc/self/fd/{self.fd}", relpath, dst_dir_fd=objects)
            else:
                os.link(self.name, relpath, src_dir_fd=self.repo._fd, dst_dir_fd=objects)
        except FileExistsError:
            return False
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.name is not None:
            try:
                os.unlink(self.name, dir_fd=self.repo._fd)
            except FileNotFoundError:
                pass
            self.name = None

    def __enter__(self) -> _TmpObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RepoStreamWriter(SplitStreamWriter):
    """A splitstream writer bound to a repository: `write_external*` store
    the data as an object and reference it. Finish it with
    `Repository.write_stream` (or `Repository.store_stream`)."""

    def __init__(self, repo: Repository, content_type: int) -> None:
        super().__init__(repo.algorithm, content_type)
        self.repo = repo

    def write_external(self, data: bytes | bytearray | memoryview) -> str:
        """Store `data` as an object and append a reference to it."""
        object_id = self.repo._store_bytes_object(data, check_writable=False)
        self.write_reference(object_id, len(data))
        return object_id

    def write_external_stream(self, source: BinaryIO | IO[bytes], size: int | None = None) -> str:
        """Store `size` bytes (or everything) read from `source` as an object
        and append a reference to it; bounded memory."""
        object_id, n = self.repo._store_stream_object(source, size, check_writable=False)
        self.write_reference(object_id, n)
        return object_id

    def write_external_file(self, path_or_fd: str | os.PathLike[str] | int) -> str:
        """Store a file's content (reflinked when possible) and reference it."""
        object_id, _method, size = self.repo._store_file_object(path_or_fd, check_writable=False)
        self.write_reference(object_id, size)
        return object_id


# ---------------------------------------------------------------------------
# the repository


class Repository:
    """An open composefs repository.

    Create one with `Repository.open()` or `Repository.init()`; close it
    (or use ``with``) to release the shared lock.
    """

    def __init__(
        self, path: str, fd: int, metadata: RepoMetadata, insecure: bool, read_only: list[str]
    ) -> None:
        self.path = path
        self._abspath = os.path.abspath(path)
        self._fd = fd
        self.metadata = metadata
        self.algorithm = metadata.algorithm
        self.insecure = insecure
        self.read_only_features = read_only
        self._erofs_override: int | None = None
        self._objects: int | None = None
        self._verity_possible = True
        self._no_reflink: set[tuple[int, int]] = set()
        self._no_copy_range: set[tuple[int, int]] = set()
        self._prefix_dirs: set[str] = set()
        self._objects_dev: int | None = None
        self._writable = False

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
        if self._objects is not None:
            os.close(self._objects)
            self._objects = None
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1

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
        return self._fd

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

    def ensure_writable(self) -> None:
        """Refuse early if nothing can be written (read-only mount,
        permissions, unknown read-only-compatible features)."""
        if self.read_only_features:
            raise RepositoryError(
                "repository is read-only for this tool (unknown read-only-compatible "
                f"features: {', '.join(self.read_only_features)})"
            )
        st = os.statvfs(self._fd)
        if st.f_flag & os.ST_RDONLY:
            raise RepositoryError("repository is not writable: read-only file system")
        if not os.access(".", os.W_OK, dir_fd=self._fd):
            raise RepositoryError("repository is not writable: permission denied")

    def _ensure_writable_once(self) -> None:
        """`ensure_writable` for the per-object paths: checked once per
        instance (two syscalls per object add up over thousands of small
        files); a later read-only remount still fails the write itself."""
        if not self._writable:
            self.ensure_writable()
            self._writable = True

    def sync(self) -> None:
        """Flush everything written so far to disk (``syncfs``)."""
        _syncfs(self._fd)

    def _objects_fd(self) -> int:
        if self._objects is None:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            try:
                self._objects = os.open("objects", flags, dir_fd=self._fd)
            except FileNotFoundError:
                # Created on demand (as composefs-rs does); opening first
                # keeps read-only repositories usable.
                try:
                    os.mkdir("objects", 0o755, dir_fd=self._fd)
                except FileExistsError:
                    pass
                self._objects = os.open("objects", flags, dir_fd=self._fd)
        return self._objects

    @property
    def objects_dir(self) -> str:
        """Path of ``objects/`` (the overlayfs data-only layer)."""
        return os.path.join(self._abspath, "objects")

    # -- objects ---------------------------------------------------------
    def object_relpath(self, object_id: str) -> str:
        """``XX/<rest>`` (relative to ``objects/``) of a hex id."""
        if not _is_hex_id(object_id, self.algorithm):
            raise RepositoryError(f"invalid {self.algorithm} object id {object_id!r}")
        return f"{object_id[:2]}/{object_id[2:]}"

    def has_object(self, object_id: str) -> bool:
        try:
            os.stat(self.object_relpath(object_id), dir_fd=self._objects_fd())
        except FileNotFoundError:
            return False
        return True

    def _measure(self, fd: int) -> str | None:
        """Kernel-measured digest, or None if the file has no (matching) verity."""
        try:
            alg, value = fsverity.measure_verity(fd)
        except VerityError:
            return None
        return value.hex() if alg == self.algorithm else None

    def _finalize(self, tmp: _TmpObject, userspace_id: str | None, size: int) -> tuple[str, bool]:
        """Enable verity (when possible), determine the id, link it in.
        Returns (id, newly created)."""
        object_id = userspace_id
        if not self.insecure or self._verity_possible:
            tmp.reopen_readonly()
            try:
                fsverity.enable_verity(tmp.fd, self.algorithm)
                measured = self._measure(tmp.fd)
            except VerityNotSupported:
                if not self.insecure:
                    raise RepositoryError(
                        "fs-verity is not supported here but the repository requires it"
                    ) from None
                self._verity_possible = False
                measured = None
            if measured is not None:
                if object_id is not None and measured != object_id:
                    raise RepositoryError(
                        f"fs-verity digest mismatch: kernel measured {measured}, "
                        f"expected {object_id}"
                    )
                object_id = measured
            elif not self.insecure:
                raise RepositoryError("fs-verity could not be enabled on a new object")
        if object_id is None:
            object_id = fsverity.digest_file(tmp.fd, self.algorithm).hex()
        relpath = self.object_relpath(object_id)
        objects = self._objects_fd()
        # No stat first: linkat's EEXIST answers "already there" just as well.
        prefix = object_id[:2]
        if prefix not in self._prefix_dirs:
            try:
                os.mkdir(prefix, 0o755, dir_fd=objects)
            except FileExistsError:
                pass
            self._prefix_dirs.add(prefix)
        try:
            return object_id, tmp.link(relpath)
        except FileNotFoundError:
            # The directory vanished (removed by hand): recreate it once.
            self._prefix_dirs.discard(prefix)
            try:
                os.mkdir(prefix, 0o755, dir_fd=objects)
            except FileExistsError:
                pass
            return object_id, tmp.link(relpath)

    def ensure_object(self, data: bytes | bytearray | memoryview | BinaryIO | IO[bytes]) -> str:
        """Store `data` (bytes, or a binary file object read to its end) as
        an object, if not already there; return its id.

        Like composefs-rs, this does not fsync; `sync()` (done by
        `write_stream` and image commits before naming anything) does.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            return self._store_stream_object(data, None)[0]
        return self._store_bytes_object(data, check_writable=True)

    def _store_bytes_object(
        self, data: bytes | bytearray | memoryview, *, check_writable: bool
    ) -> str:
        """`ensure_object` for in-memory data: hash first, so an object
        that exists costs one stat and no new inode (creating inodes is the
        expensive part of a write on some filesystems)."""
        object_id = fsverity.digest_hex(data, self.algorithm)
        relpath = self.object_relpath(object_id)
        objects = self._objects_fd()
        if self.insecure:
            try:
                os.stat(relpath, dir_fd=objects)
                return object_id
            except FileNotFoundError:
                pass
        else:
            try:
                fd = os.open(relpath, os.O_RDONLY | os.O_CLOEXEC, dir_fd=objects)
            except FileNotFoundError:
                pass
            else:
                try:
                    if self._measure(fd) != object_id:
                        raise RepositoryError(
                            f"existing object {object_id} fails fs-verity verification"
                        )
                finally:
                    os.close(fd)
                return object_id
        if check_writable:
            self.ensure_writable()
        else:
            self._ensure_writable_once()
        with _TmpObject(self) as tmp:
            _write_all(tmp.fd, data)
            self._finalize(tmp, object_id, len(data))
        return object_id

    def _store_stream_object(
        self, source: BinaryIO | IO[bytes], size: int | None, *, check_writable: bool = True
    ) -> tuple[str, int]:
        if size is not None and size <= _SMALL_OBJECT:
            # Most files in a layer are small: read them whole (bounded) and
            # take the in-memory path — one hash call, one write, and no
            # inode at all for content that is already stored.
            data = _read_exactly(source, size)
            return self._store_bytes_object(data, check_writable=check_writable), size
        if check_writable:
            self.ensure_writable()
        else:
            self._ensure_writable_once()
        hasher = fsverity.FsVerityHasher(self.algorithm) if self.insecure else None
        with _TmpObject(self) as tmp:
            out = _FdWriter(tmp.fd, hasher)
            remaining = size
            while remaining is None or remaining > 0:
                want = _COPY_BLOCK if remaining is None else min(_COPY_BLOCK, remaining)
                block = source.read(want)
                if not block:
                    break
                out.write(block)
                if remaining is not None:
                    remaining -= len(block)
            if remaining:
                raise RepositoryError(f"short read: {remaining} bytes missing")
            object_id, _ = self._finalize(
                tmp, hasher.hexdigest() if hasher is not None else None, out.size
            )
        return object_id, out.size

    def ensure_object_from_stream(
        self, source: BinaryIO | IO[bytes], size: int | None = None
    ) -> str:
        """Store `size` bytes (or all) read from `source` as an object;
        hashes while copying, memory stays bounded."""
        return self._store_stream_object(source, size)[0]

    def _store_file_object(
        self,
        path_or_fd: str | os.PathLike[str] | int,
        expected_id: str | None = None,
        *,
        check_writable: bool = True,
    ) -> tuple[str, StoreMethod, int]:
        if check_writable:
            self.ensure_writable()
        else:
            self._ensure_writable_once()
        if isinstance(path_or_fd, int):
            src, owned = path_or_fd, False
        elif (fd := _proc_self_fd(path_or_fd)) is not None:
            # Tree readers hand over ``/proc/self/fd/N`` of a descriptor they
            # keep open during the call: use it rather than reopening it.
            src, owned = fd, False
        else:
            src, owned = os.open(path_or_fd, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY), True
        try:
            before = os.fstat(src)
            if not stat.S_ISREG(before.st_mode):
                raise RepositoryError("only regular files can be stored as objects")
            if self._objects_dev is None:
                self._objects_dev = os.fstat(self._objects_fd()).st_dev
            key = (before.st_dev, self._objects_dev)
            with _TmpObject(self) as tmp:
                method = StoreMethod.COPIED
                if key not in self._no_reflink:
                    try:
                        fcntl.ioctl(tmp.fd, _FICLONE, src)
                        method = StoreMethod.REFLINKED
                    except OSError as e:
                        if e.errno not in _NO_REFLINK:
                            raise
                        self._no_reflink.add(key)
                # Hash while copying unless the id is known (the kernel
                # measures the copy anyway in a secure repository).
                want_hash = self.insecure and expected_id is None
                userspace_id = expected_id
                if method is StoreMethod.COPIED:
                    computed, size = self._copy_fd(src, tmp.fd, before.st_size, want_hash, key)
                    userspace_id = computed or userspace_id
                else:
                    size = os.fstat(tmp.fd).st_size
                after = os.fstat(src)
                if size != before.st_size or (after.st_mtime_ns, after.st_ctime_ns) != (
                    before.st_mtime_ns,
                    before.st_ctime_ns,
                ):
                    raise RepositoryError("source file changed while it was being stored")
                object_id, created = self._finalize(tmp, userspace_id, size)
            return object_id, (method if created else StoreMethod.ALREADY_PRESENT), size
        finally:
            if owned:
                os.close(src)

    def _copy_fd(
        self, src: int, dst: int, size: int, want_hash: bool, key: tuple[int, int]
    ) -> tuple[str | None, int]:
        """Copy `src` into `dst`: in-kernel unless we must hash on the way
        (then one read pass feeds both). Returns the digest if hashed and
        the number of bytes copied (positioned reads: `src`'s offset is
        neither used nor moved)."""
        offset = 0
        if not want_hash and key not in self._no_copy_range:
            try:
                while offset < size:
                    n = os.copy_file_range(src, dst, size - offset, offset)
                    if not n:
                        break
                    offset += n
                return None, offset
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # Remembered per device pair (like FICLONE): across
                # filesystems every file would fail the same way.
                self._no_copy_range.add(key)
                os.lseek(dst, 0, os.SEEK_SET)
                os.ftruncate(dst, 0)
                offset = 0
        hasher = fsverity.FsVerityHasher(self.algorithm) if want_hash else None
        # Sized to the file (+1 so EOF shows on the second read): zeroing a
        # 1 MiB buffer per small file costs more than copying it.
        view = memoryview(bytearray(min(_COPY_BLOCK, size + 1)))
        while True:
            n = os.preadv(src, [view], offset)
            if not n:
                break
            if hasher is not None:
                hasher.update(view[:n])
            _write_all(dst, view[:n])
            offset += n
        return (hasher.hexdigest() if hasher is not None else None), offset

    def ensure_object_from_file(
        self, path_or_fd: str | os.PathLike[str] | int
    ) -> tuple[str, StoreMethod]:
        """Store a regular file's content: reflink (FICLONE) when the
        filesystem can, else copy. Returns (id, how it was stored)."""
        object_id, method, _ = self._store_file_object(path_or_fd)
        return object_id, method

    def store_file_with_digest(
        self, path_or_fd: str | os.PathLike[str] | int, object_id: str
    ) -> bool:
        """Store a file whose fs-verity digest the caller already computed
        (a tree reader's object sink). Nothing is read if the object exists;
        otherwise the file is reflinked or copied in-kernel without hashing
        it again — a secure repository still has the kernel measure the
        copy, an insecure one trusts `object_id` (the copy fails if the
        source changes while it is copied). Returns True if an object was
        created."""
        self.object_relpath(object_id)
        if self.has_object(object_id):
            return False
        # Called per file (from reader threads): writability is checked once.
        stored, method, _ = self._store_file_object(path_or_fd, object_id, check_writable=False)
        if stored != object_id:
            raise RepositoryError(
                f"{path_or_fd} changed while it was read (digest {stored}, expected {object_id})"
            )
        return method is not StoreMethod.ALREADY_PRESENT

    def object_sink(self) -> Callable[[str, int, str], None]:
        """A `composefs.fs` object sink storing each external file's content."""
        self._objects_fd()  # open it before worker threads race for it
        self.ensure_writable()
        self._writable = True

        def sink(src_path: str, size: int, digest_hex: str) -> None:
            self.store_file_with_digest(src_path, digest_hex)

        return sink

    def open_object(self, object_id: str) -> int:
        """A read-only fd for an object; in a secure repository its
        fs-verity digest is checked against the id."""
        relpath = self.object_relpath(object_id)
        try:
            fd = os.open(relpath, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._objects_fd())
        except FileNotFoundError:
            raise NotFoundError(f"object {object_id} not found") from None
        if not self.insecure:
            try:
                measured = self._measure(fd)
                if measured != object_id:
                    raise RepositoryError(
                        f"object {object_id} fails fs-verity verification"
                        + (f" (measured {measured})" if measured else " (no fs-verity)")
                    )
            except BaseException:
                os.close(fd)
                raise
        return fd

    def open_object_file(self, object_id: str) -> BinaryIO:
        return os.fdopen(self.open_object(object_id), "rb")

    def read_object(self, object_id: str) -> bytes:
        with self.open_object_file(object_id) as f:
            return f.read()

    # -- symlinks --------------------------------------------------------
    def symlink(self, name: str, target: str) -> None:
        """Point repository path `name` at repository path `target` with a
        relative symlink, creating parent directories; atomic replace."""
        self.ensure_writable()
        name_parts = _check_relpath(name, "link name")
        target_parts = _check_relpath(target, "link target")
        parent = name_parts[:-1]
        i = 0
        while i < len(parent) and i < len(target_parts) and parent[i] == target_parts[i]:
            i += 1
        for j in range(i, len(parent)):
            try:
                os.mkdir("/".join(parent[: j + 1]), 0o755, dir_fd=self._fd)
            except FileExistsError:
                pass
        relative = "/".join([".."] * (len(parent) - i) + target_parts[i:])
        fd = self._fd
        try:
            os.symlink(relative, name, dir_fd=fd)
            return
        except FileExistsError:
            pass
        try:
            if os.readlink(name, dir_fd=fd) == relative:
                return
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.EINVAL:  # not a symlink: replace it below
                raise
        for _ in range(16):
            tmp = _tmpname(".symlink-")
            try:
                os.symlink(relative, tmp, dir_fd=fd)
            except FileExistsError:
                continue
            try:
                os.rename(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=fd)
                except OSError:
                    pass
                raise
            return
        raise RepositoryError(f"cannot create a temporary symlink for {name}")

    def _readlink_id(self, relpath: str) -> str | None:
        try:
            target = os.readlink(relpath, dir_fd=self._fd)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.EINVAL:
                raise RepositoryError(f"{relpath} is not a symlink") from None
            raise
        return _object_id_from_path(target, self.algorithm)

    def _resolve_id(self, relpath: str) -> str | None:
        """Follow a (chain of) symlink(s) to its object and return the id."""
        try:
            real = os.path.realpath(os.path.join(self._abspath, relpath), strict=True)
        except OSError:
            return None
        return _object_id_from_path(real, self.algorithm)

    # -- streams ---------------------------------------------------------
    def create_stream(self, content_type: int = 0) -> RepoStreamWriter:
        """A new splitstream writer for this repository (see `write_stream`)."""
        self.ensure_writable()
        return RepoStreamWriter(self, content_type)

    def store_stream(self, writer: SplitStreamWriter) -> str:
        """Finish `writer` and store the splitstream as an object, without
        naming it; returns its id (see `register_stream`)."""
        if writer.algorithm != self.algorithm:
            raise RepositoryError("splitstream writer uses a different algorithm")
        self.ensure_writable()
        hasher = fsverity.FsVerityHasher(self.algorithm) if self.insecure else None
        with _TmpObject(self) as tmp:
            out = _FdWriter(tmp.fd, hasher)
            writer.finish(out)
            object_id, _ = self._finalize(
                tmp, hasher.hexdigest() if hasher is not None else None, out.size
            )
        return object_id

    @staticmethod
    def _check_content_id(content_id: str) -> None:
        if (
            not content_id
            or "/" in content_id
            or "\0" in content_id
            or content_id in (".", "..", "refs")
            or content_id.startswith(".")
        ):
            raise RepositoryError(f"invalid stream name {content_id!r}")

    def register_stream(
        self, object_id: str, content_id: str, reference: str | None = None
    ) -> None:
        """Make the stored splitstream `object_id` visible as
        ``streams/<content_id>`` (after syncing everything it refers to),
        optionally also as ``streams/refs/<reference>``."""
        self._check_content_id(content_id)
        if not self.has_object(object_id):
            raise NotFoundError(f"object {object_id} not found")
        self.sync()
        self.symlink(f"streams/{content_id}", f"objects/{self.object_relpath(object_id)}")
        if reference is not None:
            self.name_stream(content_id, reference)

    def write_stream(
        self, writer: SplitStreamWriter, content_id: str, reference: str | None = None
    ) -> str:
        """Finish `writer`, store it, sync, and link it as
        ``streams/<content_id>`` (plus ``streams/refs/<reference>``).
        After a crash either the stream name is absent or the stream and all
        its objects are complete. Returns the stream's object id."""
        self._check_content_id(content_id)
        object_id = self.store_stream(writer)
        self.register_stream(object_id, content_id, reference)
        return object_id

    def ensure_stream(
        self,
        content_id: str,
        content_type: int,
        callback: Callable[[RepoStreamWriter], T],
        reference: str | None = None,
    ) -> tuple[str, T | None]:
        """Return the existing stream `content_id`, or build it with
        `callback(writer)`; returns (id, callback result or None)."""
        existing = self.has_stream(content_id)
        extra: T | None = None
        if existing is None:
            writer = self.create_stream(content_type)
            try:
                extra = callback(writer)
            except BaseException:
                writer.close()
                raise
            existing = self.write_stream(writer, content_id, reference)
        elif reference is not None:
            self.name_stream(content_id, reference)
        return existing, extra

    def has_stream(self, content_id: str) -> str | None:
        """The object id of ``streams/<content_id>``, or None."""
        self._check_content_id(content_id)
        return self._readlink_id(f"streams/{content_id}")

    def name_stream(self, content_id: str, name: str) -> None:
        """Point ``streams/refs/<name>`` at ``streams/<content_id>`` (a GC root).
        `name` may contain ``/`` to build a hierarchy."""
        self._check_content_id(content_id)
        _check_relpath(name, "ref name")
        self.symlink(f"streams/refs/{name}", f"streams/{content_id}")

    def has_named_stream(self, name: str) -> bool:
        _check_relpath(name, "ref name")
        try:
            return stat.S_ISLNK(os.lstat(f"streams/refs/{name}", dir_fd=self._fd).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def remove_stream_ref(self, name: str) -> bool:
        """Delete ``streams/refs/<name>``; False if it did not exist."""
        self.ensure_writable()
        _check_relpath(name, "ref name")
        try:
            os.unlink(f"streams/refs/{name}", dir_fd=self._fd)
        except FileNotFoundError:
            return False
        return True

    def list_stream_refs(self, prefix: str = "") -> list[tuple[str, str]]:
        """(name, symlink target) of the refs directly in ``streams/refs/<prefix>``."""
        path = "streams/refs" + (f"/{prefix.strip('/')}" if prefix.strip("/") else "")
        if prefix.strip("/"):
            _check_relpath(prefix.strip("/"), "ref prefix")
        try:
            names = os.listdir(os.path.join(self._abspath, path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for name in sorted(names):
            try:
                out.append((name, os.readlink(f"{path}/{name}", dir_fd=self._fd)))
            except OSError:
                continue
        return out

    def stream_id(self, name: str) -> str | None:
        """The object id behind stream `name` (content id or ``refs/…``)."""
        _check_relpath(name, "stream name")
        return self._resolve_id(f"streams/{name}")

    def open_stream(
        self,
        name: str,
        verity: str | None = None,
        expected_content_type: int | None = None,
    ) -> SplitStreamReader:
        """Open splitstream `name` (content id or ``refs/…``), or by object id
        `verity` (verified in a secure repository). Close the reader after use."""
        if verity is not None:
            fd = self.open_object(verity)
        else:
            _check_relpath(name, "stream name")
            try:
                fd = os.open(f"streams/{name}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._fd)
            except (FileNotFoundError, NotADirectoryError):
                raise NotFoundError(f"stream {name} not found") from None
        f = os.fdopen(fd, "rb")
        return SplitStreamReader(
            f,
            algorithm=self.algorithm,
            expected_content_type=expected_content_type,
            owns_source=True,
        )

    def cat_stream(
        self,
        name: str,
        out: Writable,
        verity: str | None = None,
        expected_content_type: int | None = None,
    ) -> int:
        """Write the reassembled content of stream `name` to `out`."""
        with self.open_stream(name, verity, expected_content_type) as reader:
            return reader.cat(out, self.open_object_file)

    # -- images ----------------------------------------------------------
    def write_image(self, data: bytes | bytearray | memoryview, name: str | None = None) -> str:
        """Store an EROFS image, link ``images/<id>`` and optionally
        ``images/refs/<name>``; returns the image id. The image is not
        validated: only store images you built."""
        self.ensure_writable()
        if name is not None:
            _check_relpath(name, "image name")
        object_id = self.ensure_object(data)
        self._link_image(object_id, name)
        return object_id

    def _link_image(self, object_id: str, name: str | None) -> None:
        self.sync()
        self.symlink(f"images/{object_id}", f"objects/{self.object_relpath(object_id)}")
        if name is not None:
            self.symlink(f"images/refs/{name}", f"images/{object_id}")

    def import_image(self, source: BinaryIO | IO[bytes], name: str | None = None) -> str:
        """Store an image read from `source` (streamed); returns its id."""
        self.ensure_writable()
        if name is not None:
            _check_relpath(name, "image name")
        object_id = self.ensure_object_from_stream(source)
        self._link_image(object_id, name)
        return object_id

    def commit_images(self, root: Any, name: str | None = None) -> dict[int, str]:
        """Write the tree `root` (a `tree.Directory`) as an image in every
        configured format; `name` refs the default one. Returns {format: id}."""
        from .erofs.format import FormatVersion
        from .erofs.writer import mkfs

        self.ensure_writable()
        if name is not None:
            _check_relpath(name, "image name")
        ids: dict[int, str] = {}
        for version in self.format_config().versions():
            ids[version] = self.ensure_object(mkfs(root, FormatVersion(version)))
        self.sync()
        for i, object_id in enumerate(ids.values()):
            self.symlink(f"images/{object_id}", f"objects/{self.object_relpath(object_id)}")
            if i == 0 and name is not None:
                self.symlink(f"images/refs/{name}", f"images/{object_id}")
        return ids

    def commit_image(self, root: Any, name: str | None = None) -> str:
        """`commit_images` and return the default format's id."""
        return self.commit_images(root, name)[self.format_config().default]

    def open_image(self, name: str) -> tuple[int, bool]:
        """Open image `name`: a hex id (its digest is verified — by the
        kernel in a secure repository, in userspace otherwise) or
        ``refs/<path>`` (not verified). Returns (fd, verity): whether
        overlayfs should require fs-verity on the image's files."""
        _check_relpath(name, "image name")
        try:
            fd = os.open(f"images/{name}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._fd)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"image not found: {name}") from None
        try:
            if "/" in name:
                return fd, not self.insecure
            if not _is_hex_id(name, self.algorithm):
                raise RepositoryError(f"invalid image name {name!r}: not a {self.algorithm} id")
            measured = self._measure(fd)
            if measured is None:
                if not self.insecure:
                    raise RepositoryError(f"image {name} has no fs-verity")
                measured = fsverity.digest_file(fd, self.algorithm).hex()
            if measured != name:
                raise RepositoryError(f"image {name}: fs-verity content mismatch")
            return fd, not self.insecure
        except BaseException:
            os.close(fd)
            raise

    def read_image(self, name: str) -> bytes:
        fd, _ = self.open_image(name)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def objects_for_image(self, name: str) -> list[str]:
        """Ids of the objects image `name` references (sorted)."""
        return self._image_objects(self.read_image(name))

    def _image_objects(self, data: bytes) -> list[str]:
        """Sorted ids of the repository objects an image's files live in
        (backing paths that are not ``XX/<rest>`` ids are not ours)."""
        from .erofs.reader import collect_objects

        out: set[str] = set()
        for path in collect_objects(data):
            object_id = _object_id_from_path(path, self.algorithm)
            if object_id is not None:
                out.add(object_id)
        return sorted(out)

    def mount(
        self,
        name: str,
        mountpoint: str,
        *,
        upperdir: str | None = None,
        workdir: str | None = None,
        read_write: bool = False,
    ) -> None:
        """Mount image `name` at `mountpoint` (overlayfs over the image, with
        ``objects/`` as the data layer)."""
        from .mount import mount_composefs

        if (upperdir is None) != (workdir is None):
            raise RepositoryError("--upperdir and --workdir must be given together")
        fd, verity = self.open_image(name)
        try:
            mount_composefs(
                fd, mountpoint, [self.objects_dir], verity=verity,
                upperdir=upperdir, workdir=workdir, readonly=not read_write,
            )  # fmt: skip
        finally:
            os.close(fd)

    # -- garbage collection ----------------------------------------------
    def _category_entries(self, category: str) -> dict[str, str | None]:
        """First-level entries of ``images/`` or ``streams/``: name → object id."""
        out: dict[str, str | None] = {}
        try:
            it = os.scandir(os.path.join(self._abspath, category))
        except FileNotFoundError:
            return out
        with it:
            for entry in it:
                if entry.name == "refs":
                    continue
                if not entry.is_symlink():
                    raise RepositoryError(f"{category}/{entry.name} is not a symlink")
                out[entry.name] = _object_id_from_path(os.readlink(entry.path), self.algorithm)
        return out

    def _ref_targets(self, category: str) -> set[str]:
        """Entry names (in ``<category>/``) that the refs tree points at."""
        names: set[str] = set()
        for _path, target in _walk_links(os.path.join(self._abspath, category, "refs")):
            base = target.rstrip("/").rsplit("/", 1)[-1]
            if base not in ("", ".", ".."):
                names.add(base)
        return names

    def _walk_streams(
        self,
        name: str,
        by_id: dict[str, str],
        walked: set[str],
        live: set[str],
    ) -> None:
        todo = [name]
        while todo:
            current = todo.pop()
            if current in walked:
                continue
            walked.add(current)
            with self.open_stream(current) as reader:
                live.update(reader.object_refs)
                for ref_id in reader.named_refs.values():
                    live.add(ref_id)
                    target = by_id.get(ref_id)
                    if target is not None:
                        todo.append(target)

    def gc(
        self, roots: Iterable[str] = (), *, dry_run: bool = False, wait: bool = True
    ) -> GcResult:
        """Delete every object not reachable from a ref (``images/refs/**``,
        ``streams/refs/**``) or from `roots` (image ids / stream names), then
        the ``images/`` and ``streams/`` links and refs left dangling.

        Takes the exclusive lock (waits for other users unless `wait` is
        False) — except `dry_run`, which only reports and keeps the shared
        lock. Links whose object goes away are removed before the object, so
        an interrupted GC leaves nothing dangling. Every other open
        `Repository` holds a shared lock, including ones in this process:
        close them first (or pass ``wait=False`` to get an error instead of
        waiting for them).
        """
        if not dry_run:
            self.ensure_writable()
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise RepositoryError("repository is in use (try again later)") from None
        try:
            return self._gc(set(roots), dry_run)
        finally:
            if not dry_run:
                fcntl.flock(self._fd, fcntl.LOCK_SH)

    def _gc(self, extra_roots: set[str], dry_run: bool) -> GcResult:
        result = GcResult()
        live: set[str] = set()

        images = self._category_entries("images")
        root_images = (self._ref_targets("images") | extra_roots) & images.keys()
        for name in sorted(root_images):
            image_id = images[name]
            if image_id is None or not self.has_object(image_id):
                continue  # dangling: pruned below
            live.add(image_id)
            live.update(self._image_objects(self._read_entry(f"images/{name}")))

        streams = self._category_entries("streams")
        by_id = {oid: name for name, oid in streams.items() if oid is not None}
        root_streams = (self._ref_targets("streams") | extra_roots) & streams.keys()
        walked: set[str] = set()
        for name in sorted(root_streams):
            stream_id = streams[name]
            if stream_id is None or not self.has_object(stream_id):
                continue
            live.add(stream_id)
            self._walk_streams(name, by_id, walked, live)

        # An image kept alive only by a stream's named ref (OCI
        # `composefs.image`) keeps its files too, so it stays mountable
        # (composefs-rs keeps just the image object).
        for name, image_id in sorted(images.items()):
            if name not in root_images and image_id in live and self.has_object(image_id):
                live.update(self._image_objects(self._read_entry(f"images/{name}")))

        # Unlink the names of what is about to go first: a crash then leaves
        # unreferenced objects (harmless), never dangling links.
        for category, entries in (("images", images), ("streams", streams)):
            for name, oid in entries.items():
                if oid is not None and oid not in live and self.has_object(oid):
                    if category == "images":
                        result.images_pruned += 1
                    else:
                        result.streams_pruned += 1
                    if not dry_run:
                        os.unlink(f"{category}/{name}", dir_fd=self._fd)

        objects = self._objects_fd()
        for prefix in sorted(os.listdir(objects)):
            if len(prefix) != 2 or not set(prefix) <= _HEXDIGITS:
                continue
            try:
                names = os.listdir(os.path.join(self.objects_dir, prefix))
            except NotADirectoryError:
                continue
            for rest in names:
                object_id = prefix + rest
                if not _is_hex_id(object_id, self.algorithm) or object_id in live:
                    continue
                rel = f"{prefix}/{rest}"
                try:
                    result.objects_bytes += os.lstat(rel, dir_fd=objects).st_size
                except FileNotFoundError:
                    continue
                result.objects_removed += 1
                result.removed_objects.append(object_id)
                if not dry_run:
                    try:
                        os.unlink(rel, dir_fd=objects)
                    except FileNotFoundError:
                        pass

        pre_images = result.images_pruned
        pre_streams = result.streams_pruned
        result.images_pruned = pre_images + self._prune_links("images", dry_run)
        result.streams_pruned = pre_streams + self._prune_links("streams", dry_run)
        if not dry_run:
            self._remove_stale_temporaries()
        return result

    def _read_entry(self, relpath: str) -> bytes:
        fd = os.open(relpath, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._fd)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _prune_links(self, category: str, dry_run: bool) -> int:
        """Remove dangling links in ``<category>/`` and (recursively) its refs."""
        base = os.path.join(self._abspath, category)
        count = 0
        try:
            entries = list(os.scandir(base))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry.name != "refs" and entry.is_symlink() and not os.path.exists(entry.path):
                count += 1
                if not dry_run:
                    os.unlink(entry.path)
        for path, _target in _walk_links(os.path.join(base, "refs")):
            if not os.path.exists(path):
                count += 1
                if not dry_run:
                    os.unlink(path)
        return count

    def _remove_stale_temporaries(self) -> None:
        """Under the exclusive lock no writer runs: leftover temporaries from
        killed processes can go."""
        for name in os.listdir(self._fd):
            if name.startswith((".tmp-", ".symlink-")):
                try:
                    os.unlink(name, dir_fd=self._fd)
                except OSError:
                    pass

    # -- fsck ------------------------------------------------------------
    def fsck(self, *, metadata_only: bool = False, threads: int | None = None) -> FsckResult:
        """Check the repository: ``meta.json``; every object's digest
        against its name (skipped with `metadata_only`); every stream and
        image link, splitstream structure and referenced object; every ref.
        Never modifies anything."""
        result = FsckResult()
        self._fsck_metadata(result)
        if not metadata_only:
            self._fsck_objects(result, threads)
        self._fsck_category("streams", result)
        self._fsck_category("images", result)
        return result

    def _fsck_metadata(self, result: FsckResult) -> None:
        try:
            meta, _ = _read_metadata(self._fd)
        except (OSError, ComposefsError) as e:
            result.errors.append(FsckError("metadata-parse-failed", detail=_msg(e)))
            return
        if meta is None:
            result.errors.append(
                FsckError(
                    "metadata-parse-failed",
                    detail=f"{REPO_METADATA_FILENAME} not found; expected because "
                    "repository was opened successfully",
                )
            )
            return
        result.has_metadata = True
        try:
            meta.check_compatible()
            mismatch = meta.algorithm != self.algorithm
        except RepositoryError:
            mismatch = True
        if mismatch:
            result.errors.append(
                FsckError(
                    "metadata-algorithm-mismatch",
                    expected=algorithm_string(meta.algorithm),
                    actual=self.algorithm,
                )
            )

    def _fsck_objects(self, result: FsckResult, threads: int | None) -> None:
        objects = self._objects_fd()
        prefixes = sorted(
            p
            for p in os.listdir(objects)
            if len(p) == 2 and set(p) <= _HEXDIGITS and _isdir(objects, p)
        )
        work = [(p, n) for p in prefixes for n in sorted(os.listdir(f"{self.objects_dir}/{p}"))]
        result.objects_checked += len(work)
        nthreads = threads or fsverity.default_threads()
        if nthreads > 1 and len(work) > 1:
            with ThreadPoolExecutor(max_workers=nthreads, thread_name_prefix="fsck") as pool:
                found = list(pool.map(lambda item: self._fsck_object(*item), work))
        else:
            found = [self._fsck_object(p, n) for p, n in work]
        for err in found:
            if err is not None:
                result.objects_corrupted += 1
                result.errors.append(err)

    def _fsck_object(self, prefix: str, name: str) -> FsckError | None:
        path = f"objects/{prefix}/{name}"
        object_id = prefix + name
        if len(name) != HEX_LENGTHS[self.algorithm] - 2 or not set(name) <= _HEXDIGITS:
            detail = (
                "Invalid string length"
                if len(name) != HEX_LENGTHS[self.algorithm] - 2
                else "Invalid character"
            )
            return FsckError("object-invalid-name", path, detail=detail)
        try:
            fd = os.open(f"{prefix}/{name}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._objects_fd())
        except OSError as e:
            return FsckError("object-open-failed", path, detail=_msg(e))
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                return FsckError("object-open-failed", path, detail="Is a directory")
            measured = self._measure(fd)
            if measured is None:
                if not self.insecure:
                    return FsckError("object-verity-missing", path)
                try:
                    measured = fsverity.digest_file(fd, self.algorithm, threads=1).hex()
                except OSError as e:
                    return FsckError("object-verity-failed", path, detail=_msg(e))
        finally:
            os.close(fd)
        if measured != object_id:
            return FsckError("object-digest-mismatch", path, measured=measured)
        return None

    def _fsck_category(self, category: str, result: FsckResult) -> None:
        is_streams = category == "streams"
        base = os.path.join(self._abspath, category)
        try:
            entries = sorted(os.scandir(base), key=lambda e: e.name)
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name == "refs":
                continue
            path = f"{category}/{entry.name}"
            if is_streams:
                result.streams_checked += 1
            else:
                result.images_checked += 1

            def corrupted() -> None:
                if is_streams:
                    result.streams_corrupted += 1
                else:
                    result.images_corrupted += 1

            if not entry.is_symlink():
                corrupted()
                result.errors.append(FsckError("entry-not-symlink", path))
                continue
            try:
                os.stat(entry.path)
            except FileNotFoundError:
                result.broken_links += 1
                corrupted()
                result.errors.append(FsckError("broken-symlink", path))
                continue
            except OSError as e:
                result.errors.append(FsckError("stat-failed", path, detail=_msg(e)))
                continue
            if is_streams:
                self._fsck_stream(entry.name, path, result)
            else:
                self._fsck_image(entry.name, path, result)
        self._fsck_refs(os.path.join(base, "refs"), f"{category}/refs", result)

    def _fsck_refs(self, directory: str, display: str, result: FsckResult) -> None:
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            path = f"{display}/{entry.name}"
            if entry.is_symlink():
                try:
                    os.stat(entry.path)
                except FileNotFoundError:
                    result.broken_links += 1
                    result.errors.append(FsckError("broken-symlink", path))
                except OSError as e:
                    result.errors.append(FsckError("stat-failed", path, detail=_msg(e)))
            elif entry.is_dir(follow_symlinks=False):
                self._fsck_refs(entry.path, path, result)
            else:
                kind = "RegularFile" if entry.is_file(follow_symlinks=False) else "Unknown"
                result.errors.append(FsckError("unexpected-file-type", path, detail=kind))

    def _check_ref_object(
        self, object_id: str, path: str, result: FsckResult, *, missing: FsckError
    ) -> None:
        try:
            os.stat(self.object_relpath(object_id), dir_fd=self._objects_fd())
        except FileNotFoundError:
            result.missing_objects += 1
            result.errors.append(missing)
        except (OSError, RepositoryError) as e:
            result.errors.append(
                FsckError("object-check-failed", path, object_id=object_id, detail=_msg(e))
            )

    def _fsck_stream(self, name: str, path: str, result: FsckResult) -> None:
        try:
            reader = self.open_stream(name)
        except (OSError, ComposefsError) as e:
            result.streams_corrupted += 1
            result.errors.append(FsckError("stream-open-failed", path, detail=_msg(e)))
            return
        with reader:
            for oid in reader.object_refs:
                self._check_ref_object(
                    oid, path, result,
                    missing=FsckError("missing-object-ref", path, object_id=oid),
                )  # fmt: skip
            for ref_name, oid in sorted(reader.named_refs.items()):
                self._check_ref_object(
                    oid, path, result,
                    missing=FsckError("missing-named-ref", path, object_id=oid, ref_name=ref_name),
                )  # fmt: skip
            # Beyond composefs-rs: decode the chunk stream too, so a corrupt
            # body is found even with --metadata-only.
            try:
                reader.scan()
            except (OSError, SplitstreamError) as e:
                result.streams_corrupted += 1
                result.errors.append(FsckError("stream-read-failed", path, detail=_msg(e)))

    def _fsck_image(self, name: str, path: str, result: FsckResult) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self._fd)
        except OSError as e:
            result.images_corrupted += 1
            result.errors.append(FsckError("image-open-failed", path, detail=_msg(e)))
            return
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except OSError as e:
            result.images_corrupted += 1
            result.errors.append(FsckError("image-read-failed", path, detail=_msg(e)))
            return
        try:
            objects = self._image_objects(data)
        except ComposefsError as e:
            result.images_corrupted += 1
            result.errors.append(FsckError("image-invalid", path, detail=_msg(e)))
            return
        for oid in objects:
            self._check_ref_object(
                oid, path, result, missing=FsckError("image-missing-object", path, object_id=oid)
            )


# ---------------------------------------------------------------------------
# module helpers


def _msg(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _exists(dirfd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dirfd)
    except FileNotFoundError:
        return False
    return True


def _isdir(dirfd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _walk_links(top: str) -> Iterator[tuple[str, str]]:
    """(path, target) of every symlink below `top`, recursively; directories
    are not followed through symlinks."""
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except (FileNotFoundError, NotADirectoryError):
            continue
        with it:
            for entry in it:
                if entry.is_symlink():
                    yield entry.path, os.readlink(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)


def _read_metadata(fd: int) -> tuple[RepoMetadata | None, bool]:
    """Parse ``meta.json`` (None if absent) and whether it has fs-verity."""
    try:
        mfd = os.open(REPO_METADATA_FILENAME, os.O_RDONLY | os.O_CLOEXEC, dir_fd=fd)
    except FileNotFoundError:
        return None, False
    with os.fdopen(mfd, "rb") as f:
        data = f.read(1 << 20)
        try:
            fsverity.measure_verity(f.fileno())
            has_verity = True
        except VerityError:
            has_verity = False
    return RepoMetadata.from_json(data), has_verity


def _write_metadata(fd: int, meta: RepoMetadata, enable_verity: bool) -> None:
    """Create ``meta.json`` atomically (complete, with verity if asked, or
    absent); FileExistsError if it exists."""
    data = meta.to_json()
    tmpname: str | None = None
    try:
        tfd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=fd)
    except OSError as e:
        if e.errno not in _NO_TMPFILE:
            raise
        tmpname = _tmpname(".tmp-")
        tfd = os.open(tmpname, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o644, dir_fd=fd)
    try:
        _write_all(tfd, data)
        os.fsync(tfd)
        if tmpname is None:
            rfd = os.open(f"/proc/self/fd/{tfd}", os.O_RDONLY | os.O_CLOEXEC)
        else:
            rfd = os.open(tmpname, os.O_RDONLY | os.O_CLOEXEC, dir_fd=fd)
        os.close(tfd)
        tfd = rfd
        if enable_verity:
            fsverity.enable_verity(tfd, meta.algorithm)
        if tmpname is None:
            os.link(f"/proc/self/fd/{tfd}", REPO_METADATA_FILENAME, dst_dir_fd=fd)
        else:
            os.link(tmpname, REPO_METADATA_FILENAME, src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(tfd)
        if tmpname is not None:
            try:
                os.unlink(tmpname, dir_fd=fd)
            except FileNotFoundError:
                pass


def _infer_metadata(fd: int) -> tuple[str, bool]:
    """Algorithm (from object name lengths) and verity of a legacy repository."""
    objects = os.path.join(f"/proc/self/fd/{fd}", "objects")
    for prefix in sorted(os.listdir(objects)):
        if len(prefix) != 2:
            continue
        try:
            names = os.listdir(os.path.join(objects, prefix))
        except NotADirectoryError:
            continue
        for name in names:
            algorithm = {62: "sha256", 126: "sha512"}.get(len(name))
            if algorithm is None:
                continue
            ofd = os.open(os.path.join(objects, prefix, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                try:
                    alg, _ = fsverity.measure_verity(ofd)
                    has_verity = alg == algorithm
                except VerityNotSupported:
                    has_verity = False
                except VerityNotEnabled:
                    has_verity = False
            finally:
                os.close(ofd)
            return algorithm, has_verity
    raise RepositoryError("no objects found in repository — cannot infer metadata")


def _reset_metadata(path: str) -> None:
    import shutil

    for d in ("streams", "images"):
        p = os.path.join(path, d)
        if os.path.lexists(p):
            shutil.rmtree(p)
    try:
        os.unlink(os.path.join(path, REPO_METADATA_FILENAME))
    except FileNotFoundError:
        pass
