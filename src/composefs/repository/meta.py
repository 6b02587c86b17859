"""``meta.json`` and where repositories live: the format version, hash
algorithm, feature flags and EROFS formats (composefs-rs 0.7.0's file,
byte-compatible), written atomically with fs-verity in a secure repository;
the default repository paths; `peek_algorithm` (no lock, nothing written)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from .. import _json, fsverity
from ..errors import (
    ComposefsError,
    RepositoryError,
    VerityError,
    VerityNotEnabled,
    VerityNotSupported,
)
from ._fs import (
    _NO_TMPFILE,
    HEX_LENGTHS,
    NotRegularFile,
    _exists,
    _open_regular,
    _tmpname,
    _write_all,
)

REPO_METADATA_FILENAME = "meta.json"
REPO_FORMAT_VERSION = 1
V1_EROFS = "v1_erofs"
KNOWN_COMPAT: frozenset[str] = frozenset()
KNOWN_RO_COMPAT: frozenset[str] = frozenset({V1_EROFS})
KNOWN_INCOMPAT: frozenset[str] = frozenset()


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


def peek_insecure(path: str | os.PathLike[str]) -> bool | None:
    """Whether the repository at `path` is insecure (its ``meta.json`` has
    no fs-verity), without opening it; None when there is no meta.json."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        meta, has_verity = _read_metadata(fd)
        return None if meta is None else not has_verity
    except (OSError, ComposefsError):
        return None
    finally:
        os.close(fd)


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
        doc = _json.loads(data, f"failed to parse {REPO_METADATA_FILENAME}", RepositoryError)
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


def _read_metadata(fd: int) -> tuple[RepoMetadata | None, bool]:
    """Parse ``meta.json`` (None if absent) and whether it has fs-verity."""
    try:
        mfd = _open_regular(REPO_METADATA_FILENAME, fd)
    except FileNotFoundError:
        return None, False
    except OSError as e:  # e.g. not a regular file (a FIFO would block the read)
        raise RepositoryError(f"cannot read {REPO_METADATA_FILENAME}: {e.strerror}") from None
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
            try:
                ofd = _open_regular(os.path.join(objects, prefix, name))
            except (NotRegularFile, IsADirectoryError):
                continue  # not an object
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
