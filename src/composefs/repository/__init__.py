"""A composefs repository: content-addressed objects, splitstreams, images, refs.

The package's rooms (each one testable alone, tests in tests/repository/)::

    meta.py         meta.json, algorithm names, default paths, peek_algorithm/peek_insecure
    _fs.py          fd-relative helpers, id and path checks (no state)
    objects.py      ObjectStore: O_TMPFILE + linkat writes, fs-verity, copy paths, reads, symlinks
    streams.py      StreamStore + RepoStreamWriter: splitstreams and streams/refs
    images.py       ImageStore: EROFS image commit/import/open, objects of an image, mount
    maintenance.py  Maintenance: gc and fsck, GcResult / FsckResult / FsckError
    repo.py         Repository: open/init/lock, configuration, delegates to the parts

Imports point one way: _fs <- meta, objects; objects <- streams, images;
meta, streams, images <- maintenance <- repo (no part imports the facade).

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

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._fs import _check_relpath
    from .images import ImageStore
    from .maintenance import FSCK_ERROR_KINDS, FsckError, FsckResult, GcResult, Maintenance
    from .meta import (
        KNOWN_COMPAT,
        KNOWN_INCOMPAT,
        KNOWN_RO_COMPAT,
        REPO_FORMAT_VERSION,
        REPO_METADATA_FILENAME,
        V1_EROFS,
        FeatureFlags,
        FormatConfig,
        RepoMetadata,
        algorithm_from_string,
        algorithm_string,
        default_path,
        peek_algorithm,
        peek_insecure,
        system_path,
        user_path,
    )
    from .objects import ObjectStore, StoreMethod
    from .repo import Repository
    from .streams import RepoStreamWriter, StreamStore

# The names are imported on first use (PEP 562): the object store helper
# process (`_store_helper`) imports only `objects` and what it needs, not
# every room, which halves its start-up.
_WHERE = {
    "_check_relpath": "_fs",
    "ImageStore": "images",
    "FSCK_ERROR_KINDS": "maintenance",
    "FsckError": "maintenance",
    "FsckResult": "maintenance",
    "GcResult": "maintenance",
    "Maintenance": "maintenance",
    "ObjectStore": "objects",
    "StoreMethod": "objects",
    "Repository": "repo",
    "RepoStreamWriter": "streams",
    "StreamStore": "streams",
}


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        module = importlib.import_module(f".{_WHERE.get(name, 'meta')}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "FSCK_ERROR_KINDS",
    "KNOWN_COMPAT",
    "KNOWN_INCOMPAT",
    "KNOWN_RO_COMPAT",
    "REPO_FORMAT_VERSION",
    "REPO_METADATA_FILENAME",
    "V1_EROFS",
    "FeatureFlags",
    "FormatConfig",
    "FsckError",
    "FsckResult",
    "GcResult",
    "ImageStore",
    "Maintenance",
    "ObjectStore",
    "RepoMetadata",
    "RepoStreamWriter",
    "Repository",
    "StoreMethod",
    "StreamStore",
    "_check_relpath",
    "algorithm_from_string",
    "algorithm_string",
    "default_path",
    "peek_algorithm",
    "peek_insecure",
    "system_path",
    "user_path",
]
