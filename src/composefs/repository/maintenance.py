"""Maintenance: garbage collection and fsck, with their result types.

`Maintenance` works on the parts of an open repository: `gc` deletes what
no ref reaches (under the exclusive lock), `fsck` checks metadata, objects,
stream and image links and refs without changing anything (composefs-rs's
error kinds and messages).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .. import fsverity
from ..errors import ComposefsError, RepositoryError, SplitstreamError
from ._fs import (
    _HEXDIGITS,
    HEX_LENGTHS,
    _is_hex_id,
    _isdir,
    _msg,
    _object_id_from_path,
    _open_regular,
    _walk_links,
)
from .images import ImageStore
from .meta import REPO_METADATA_FILENAME, _read_metadata, algorithm_string
from .objects import ObjectStore
from .streams import StreamStore


@dataclass
class GcResult:
    """What garbage collection removed (or, in a dry run, would remove)."""

    objects_removed: int = 0
    objects_bytes: int = 0
    images_pruned: int = 0
    streams_pruned: int = 0
    removed_objects: list[str] = field(default_factory=list)
    #: images/streams that could not be read: (path, reason). gc went on,
    #: keeping whatever they might reference (see `Maintenance.gc`).
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    #: an unreadable stream made gc keep every object and link
    kept_everything: bool = False

    def to_reply(self) -> dict[str, int]:
        """The varlink `GcResult` fields."""
        return {
            "objects_removed": self.objects_removed,
            "objects_bytes": self.objects_bytes,
            "images_pruned": self.images_pruned,
            "streams_pruned": self.streams_pruned,
        }


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


def _root_stream_id(m: Maintenance, root: str) -> str | None:
    """The object id a gc root names as a stream: ``refs/NAME`` or a bare
    ref NAME under ``streams/refs/``, or the stream's id (``ALG:<hex>``/hex)."""
    alg = m.objects.algorithm
    prefix, sep, rest = root.partition(":")
    if sep and prefix == alg and _is_hex_id(rest, alg):
        return rest
    if _is_hex_id(root, alg):
        return root
    parts = root.split("/")
    if not root or root.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return None
    ref = root if root.startswith("refs/") else f"refs/{root}"
    return m.objects.resolve_id(f"streams/{ref}")


class Maintenance:
    """Garbage collection and fsck over a repository's objects, streams and images."""

    def __init__(self, objects: ObjectStore, streams: StreamStore, images: ImageStore) -> None:
        self.objects = objects
        self.streams = streams
        self.images = images

    def _category_entries(self, category: str) -> dict[str, str | None]:
        """First-level entries of ``images/`` or ``streams/``: name → object id."""
        out: dict[str, str | None] = {}
        try:
            it = os.scandir(os.path.join(self.objects.abspath, category))
        except FileNotFoundError:
            return out
        with it:
            for entry in it:
                if entry.name == "refs":
                    continue
                if not entry.is_symlink():
                    raise RepositoryError(f"{category}/{entry.name} is not a symlink")
                out[entry.name] = _object_id_from_path(
                    os.readlink(entry.path), self.objects.algorithm
                )
        return out

    def _ref_targets(self, category: str) -> set[str]:
        """Entry names (in ``<category>/``) that the refs tree points at."""
        names: set[str] = set()
        for _path, target in _walk_links(os.path.join(self.objects.abspath, category, "refs")):
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
            with self.streams.open_stream(current) as reader:
                live.update(reader.object_refs)
                for ref_id in reader.named_refs.values():
                    live.add(ref_id)
                    target = by_id.get(ref_id)
                    if target is not None:
                        todo.append(target)

    def _image_refs(self, name: str, result: GcResult) -> set[str]:
        """Objects image `name` references. An image the reader refuses is
        reported and scanned instead: every object id that appears in it as a
        backing path or a metacopy digest is kept (never delete what it
        might need); if it cannot even be read, everything is kept."""
        path = f"images/{name}"
        try:
            data = self._read_entry(path)
        except OSError as e:
            result.unreadable.append((path, _msg(e)))
            result.kept_everything = True
            return set()
        try:
            return set(self.images.image_objects(data))
        except ComposefsError as e:
            from ..erofs.reader import scan_references

            result.unreadable.append((path, str(e)))
            return scan_references(data)

    def gc(
        self, roots: Iterable[str] = (), *, dry_run: bool = False, wait: bool = True
    ) -> GcResult:
        """Delete every object not reachable from a ref (``images/refs/**``,
        ``streams/refs/**``) or from `roots` (image ids / stream names), then
        the ``images/`` and ``streams/`` links and refs left dangling.

        A root is named as the tools print or take it (an image id as
        ``ALG:<hex>`` or hex, ``refs/NAME``, a bare ref NAME, a stream's
        name or object id); a root that names no image or stream is an
        error, raised before anything is deleted.

        A bad image or stream never stops it: each is reported in
        `GcResult.unreadable`. An image the reader refuses keeps alive every
        object its bytes name (`erofs.reader.scan_references`); an unreadable
        stream (or image file) keeps every object and link
        (`GcResult.kept_everything`): gc is conservative, never unsafe.

        Takes the exclusive lock (waits for other users unless `wait` is
        False) — except `dry_run`, which only reports and keeps the shared
        lock. Links whose object goes away are removed before the object, so
        an interrupted GC leaves nothing dangling. Every other open
        `Repository` holds a shared lock, including ones in this process:
        close them first (or pass ``wait=False`` to get an error instead of
        waiting for them).
        """
        if not dry_run:
            self.objects.ensure_writable()
            try:
                fcntl.flock(self.objects.dirfd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                # the failed conversion dropped our shared lock: take it back
                fcntl.flock(self.objects.dirfd, fcntl.LOCK_SH)
                raise RepositoryError("repository is in use (try again later)") from None
        try:
            return self._gc(set(roots), dry_run)
        finally:
            if not dry_run:
                fcntl.flock(self.objects.dirfd, fcntl.LOCK_SH)

    def _resolve_roots(
        self, roots: set[str], images: dict[str, str | None], streams: dict[str, str | None]
    ) -> tuple[set[str], set[str]]:
        """The ``images/`` and ``streams/`` entries the `roots` name."""
        image_roots: set[str] = set()
        stream_roots: set[str] = set()
        for root in sorted(roots):
            found = False
            try:
                image_id = self.images.image_id(root)
            except RepositoryError:
                image_id = None
            if image_id is not None and image_id in images:
                image_roots.add(image_id)
                found = True
            if root in streams:
                stream_roots.add(root)
                found = True
            else:
                stream_id = _root_stream_id(self, root)
                for name, oid in streams.items():
                    if stream_id is not None and oid == stream_id:
                        stream_roots.add(name)
                        found = True
            if not found:
                raise RepositoryError(f"gc root {root!r} names no image or stream")
        return image_roots, stream_roots

    def discard_unreferenced(self, candidates: Iterable[str]) -> int:
        """Remove those of `candidates` (objects an operation that then
        failed wrote, e.g. a layer whose diff_id did not match) that nothing
        stored refers to; returns how many went.

        Only when no other process uses the repository (the exclusive lock
        is tried, not waited for): otherwise they stay, unreferenced, for
        the next `gc`. Every image and stream present counts as a root here
        (named or not), so this never takes what a later gc would keep or
        what a stored but untagged layer needs."""
        wanted = {c for c in candidates if _is_hex_id(c, self.objects.algorithm)}
        if not wanted or self.objects.read_only_features:
            return 0
        try:
            fcntl.flock(self.objects.dirfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # A failed conversion has dropped our shared lock (flock(2)):
            # take it back before going on.
            fcntl.flock(self.objects.dirfd, fcntl.LOCK_SH)
            return 0
        try:
            result = GcResult()
            live: set[str] = set()
            images = self._category_entries("images")
            for name, image_id in sorted(images.items()):
                if image_id is not None and self.objects.has_object(image_id):
                    live.add(image_id)
                    live.update(self._image_refs(name, result))
            streams = self._category_entries("streams")
            by_id = {oid: name for name, oid in streams.items() if oid is not None}
            walked: set[str] = set()
            for name, stream_id in sorted(streams.items()):
                if stream_id is None or not self.objects.has_object(stream_id):
                    continue
                live.add(stream_id)
                try:
                    self._walk_streams(name, by_id, walked, live)
                except (OSError, ComposefsError):
                    return 0  # references unknown: keep everything
            if result.kept_everything:
                return 0
            removed = 0
            objects = self.objects.objects_fd()
            for object_id in sorted(wanted - live):
                try:
                    os.unlink(self.objects.object_relpath(object_id), dir_fd=objects)
                    removed += 1
                except FileNotFoundError:
                    pass
            return removed
        finally:
            fcntl.flock(self.objects.dirfd, fcntl.LOCK_SH)

    def _gc(self, extra_roots: set[str], dry_run: bool) -> GcResult:
        result = GcResult()
        live: set[str] = set()

        images = self._category_entries("images")
        streams = self._category_entries("streams")
        extra_images, extra_streams = self._resolve_roots(extra_roots, images, streams)
        root_images = (self._ref_targets("images") | extra_images) & images.keys()
        for name in sorted(root_images):
            image_id = images[name]
            if image_id is None or not self.objects.has_object(image_id):
                continue  # dangling: pruned below
            live.add(image_id)
            live.update(self._image_refs(name, result))

        by_id = {oid: name for name, oid in streams.items() if oid is not None}
        root_streams = (self._ref_targets("streams") | extra_streams) & streams.keys()
        walked: set[str] = set()
        for name in sorted(root_streams):
            stream_id = streams[name]
            if stream_id is None or not self.objects.has_object(stream_id):
                continue
            live.add(stream_id)
            try:
                self._walk_streams(name, by_id, walked, live)
            except (OSError, ComposefsError) as e:
                # Its references are unknown (a stream is compressed, no
                # scan can recover them): keep everything, report it.
                result.unreadable.append((f"streams/{name}", _msg(e)))
                result.kept_everything = True

        # An image kept alive only by a stream's named ref (OCI
        # `composefs.image`) keeps its files too, so it stays mountable
        # (composefs-rs keeps just the image object).
        for name, image_id in sorted(images.items()):
            if name not in root_images and image_id in live and self.objects.has_object(image_id):
                live.update(self._image_refs(name, result))
        if result.kept_everything:
            # only links to missing objects (always safe) go
            result.images_pruned = self._prune_links("images", dry_run)
            result.streams_pruned = self._prune_links("streams", dry_run)
            if not dry_run:
                self._remove_stale_temporaries()
            return result

        # Unlink the names of what is about to go first: a crash then leaves
        # unreferenced objects (harmless), never dangling links.
        for category, entries in (("images", images), ("streams", streams)):
            for name, oid in entries.items():
                if oid is not None and oid not in live and self.objects.has_object(oid):
                    if category == "images":
                        result.images_pruned += 1
                    else:
                        result.streams_pruned += 1
                    if not dry_run:
                        os.unlink(f"{category}/{name}", dir_fd=self.objects.dirfd)

        objects = self.objects.objects_fd()
        for prefix in sorted(os.listdir(objects)):
            if len(prefix) != 2 or not set(prefix) <= _HEXDIGITS:
                continue
            try:
                names = os.listdir(os.path.join(self.objects.objects_dir, prefix))
            except NotADirectoryError:
                continue
            for rest in names:
                object_id = prefix + rest
                if not _is_hex_id(object_id, self.objects.algorithm) or object_id in live:
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
        fd = _open_regular(relpath, self.objects.dirfd)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def _prune_links(self, category: str, dry_run: bool) -> int:
        """Remove dangling links in ``<category>/`` and (recursively) its refs."""
        base = os.path.join(self.objects.abspath, category)
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
        for name in os.listdir(self.objects.dirfd):
            if name.startswith((".tmp-", ".symlink-")):
                try:
                    os.unlink(name, dir_fd=self.objects.dirfd)
                except OSError:
                    pass

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
            meta, _ = _read_metadata(self.objects.dirfd)
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
            mismatch = meta.algorithm != self.objects.algorithm
        except RepositoryError:
            mismatch = True
        if mismatch:
            result.errors.append(
                FsckError(
                    "metadata-algorithm-mismatch",
                    expected=algorithm_string(meta.algorithm),
                    actual=self.objects.algorithm,
                )
            )

    def _fsck_objects(self, result: FsckResult, threads: int | None) -> None:
        objects = self.objects.objects_fd()
        prefixes = sorted(
            p
            for p in os.listdir(objects)
            if len(p) == 2 and set(p) <= _HEXDIGITS and _isdir(objects, p)
        )
        work = [
            (p, n) for p in prefixes for n in sorted(os.listdir(f"{self.objects.objects_dir}/{p}"))
        ]
        result.objects_checked += len(work)
        nthreads = threads or fsverity.default_threads()
        if nthreads > 1 and len(work) > 1:
            from concurrent.futures import ThreadPoolExecutor

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
        if len(name) != HEX_LENGTHS[self.objects.algorithm] - 2 or not set(name) <= _HEXDIGITS:
            detail = (
                "Invalid string length"
                if len(name) != HEX_LENGTHS[self.objects.algorithm] - 2
                else "Invalid character"
            )
            return FsckError("object-invalid-name", path, detail=detail)
        try:
            # Anything but a regular file (a directory: "Is a directory"; a
            # FIFO or device, which would block or never end) fails here.
            fd = _open_regular(f"{prefix}/{name}", self.objects.objects_fd())
        except OSError as e:
            return FsckError("object-open-failed", path, detail=_msg(e))
        try:
            measured = self.objects.measure(fd)
            if measured is None:
                if not self.objects.insecure:
                    return FsckError("object-verity-missing", path)
                try:
                    measured = fsverity.digest_file(fd, self.objects.algorithm, threads=1).hex()
                except OSError as e:
                    return FsckError("object-verity-failed", path, detail=_msg(e))
        finally:
            os.close(fd)
        if measured != object_id:
            return FsckError("object-digest-mismatch", path, measured=measured)
        return None

    def _fsck_category(self, category: str, result: FsckResult) -> None:
        is_streams = category == "streams"
        base = os.path.join(self.objects.abspath, category)
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
            os.stat(self.objects.object_relpath(object_id), dir_fd=self.objects.objects_fd())
        except FileNotFoundError:
            result.missing_objects += 1
            result.errors.append(missing)
        except (OSError, RepositoryError) as e:
            result.errors.append(
                FsckError("object-check-failed", path, object_id=object_id, detail=_msg(e))
            )

    def _fsck_stream(self, name: str, path: str, result: FsckResult) -> None:
        try:
            reader = self.streams.open_stream(name)
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
            fd = _open_regular(path, self.objects.dirfd)
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
            objects = self.images.image_objects(data)
        except ComposefsError as e:
            result.images_corrupted += 1
            result.errors.append(FsckError("image-invalid", path, detail=_msg(e)))
            return
        for oid in objects:
            self._check_ref_object(
                oid, path, result, missing=FsckError("image-missing-object", path, object_id=oid)
            )
