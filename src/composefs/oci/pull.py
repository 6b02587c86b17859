"""The pull pipeline: fetch, verify, import, commit.

`pull` opens an image reference (`composefs.oci.transports`), resolves its
manifest (`composefs.oci.image`), fetches the config and layers (in
parallel, digest and size checked while streaming), splits each layer into
a splitstream (`import_layer`), commits the EROFS images and writes the
config and manifest streams, then the tag. Layout and ordering are
described in `composefs.oci.stored`: a failure at any point leaves no tag
and no stream naming something incomplete (only unreferenced objects,
which ``gc`` removes).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

from ..errors import Cancelled, ComposefsError, DigestMismatch, NotFoundError, OciError
from ..splitstream import (
    CONTENT_OCI_BLOB,
    CONTENT_OCI_CONFIG,
    CONTENT_OCI_LAYER,
    CONTENT_OCI_MANIFEST,
)
from ..tree import Directory
from . import tar as _tar
from .image import (
    MAX_JSON_SIZE,
    Descriptor,
    ImageSource,
    Platform,
    ProgressCallback,
    ProgressEvent,
    digest_of,
    is_tar_layer,
    layer_compression,
    parse_digest,
    read_at_most,
    resolve_manifest,
)
from .stored import (
    ALL_IMAGE_REF_KEYS,
    BOOT_IMAGE_REF_KEYS,
    IMAGE_REF_KEYS,
    OciImage,
    build_tree,
    config_diff_ids,
    config_stream,
    image_tree,
    layer_stream,
    manifest_stream,
    open_image,
    read_json_stream,
    tag_ref,
    validate_tag,
)
from .transports import open_source

if TYPE_CHECKING:
    from ..repository import Repository

_BLOCK = 1 << 20
# A layer blob this big (as sent) starts the object store helper process
# (`RepoStreamWriter.start_helper`) as its import begins.
_EAGER_HELPER_BYTES = 4 << 20


class _Stopped(Exception):
    """Ends a layer import whose pull has failed elsewhere or was
    interrupted (an Exception: a decompressor thread passes it on)."""


class PullStop:
    """A pull's stop signal. `set` also runs the registered aborts, which
    wake downloads waiting on a silent connection (checking the flag
    between reads would not reach them).

    A caller may pass one to `pull` and set it from another thread (a
    service whose client went away): the pull stops at once and raises
    `errors.Cancelled`, having tagged nothing; layers already complete
    stay, for a retry."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._aborts: set[Callable[[], None]] = set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        with self._lock:
            self._event.set()
            aborts = list(self._aborts)
            self._aborts.clear()
        for abort in aborts:
            abort()

    def on_set(self, abort: Callable[[], None]) -> Callable[[], None]:
        """Run `abort` when the stop is set (now, if it is); returns the
        function that unregisters it."""
        with self._lock:
            if not self._event.is_set():
                self._aborts.add(abort)

                def unregister() -> None:
                    with self._lock:
                        self._aborts.discard(abort)

                return unregister
        abort()
        return lambda: None


def _check_stop(stop: PullStop | None) -> None:
    if stop is not None and stop.is_set():
        raise Cancelled("pull cancelled")


def _abort(source: Any) -> None:
    """Wake whatever waits on `source`'s download (a no-op for sources
    without ``abort``, such as files)."""
    abort = getattr(source, "abort", None)
    if callable(abort):
        abort()


# -- statistics -----------------------------------------------------------------


def human_bytes(n: int) -> str:
    """indicatif's HumanBytes: binary units with two decimals."""
    units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]
    if n < 1024:
        return f"{n} B"
    value = float(n)
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    return f"{value:.2f} {units[i]}"


@dataclass
class ImportStats:
    """What an import stored (composefs-rs ``ImportStats``)."""

    layers: int = 0
    layers_already_present: int = 0
    objects_copied: int = 0
    objects_already_present: int = 0
    bytes_copied: int = 0
    bytes_inlined: int = 0

    def merge(self, other: ImportStats) -> None:
        self.layers += other.layers
        self.layers_already_present += other.layers_already_present
        self.objects_copied += other.objects_copied
        self.objects_already_present += other.objects_already_present
        self.bytes_copied += other.bytes_copied
        self.bytes_inlined += other.bytes_inlined

    def __str__(self) -> str:
        return (
            f"{self.objects_copied} new + {self.objects_already_present} already present objects; "
            f"{human_bytes(self.bytes_copied)} stored, {human_bytes(self.bytes_inlined)} inlined; "
            f"{self.layers} new + {self.layers_already_present} already present layers"
        )

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


# -- reading helpers ------------------------------------------------------------------


class _BackgroundHash:
    """A hashlib hash fed from a thread of its own: hashing releases the GIL,
    so the uncompressed layer's digest (~0.1 s for a 120 MB layer) runs on
    the other core instead of in the thread that parses the tar."""

    def __init__(self, algorithm: str) -> None:
        import queue

        self._hash = hashlib.new(algorithm)
        # Bounded: a few read blocks ahead at most, never a layer.
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=8)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="layer-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        update = self._hash.update
        get = self._queue.get
        # Keeps taking data after a failure, so update() never blocks.
        while (data := get()) is not None:
            if self._error is None:
                try:
                    update(data)
                except BaseException as e:  # reported by hexdigest()
                    self._error = e

    def update(self, data: bytes) -> None:
        self._queue.put(data)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()


class _HashingReader(io.RawIOBase):
    """Counts, hashes and size-checks what is read through it; `on_eof`
    runs once when the source is exhausted (to verify before anything
    downstream gets named). `background` hashes in a thread of its own.
    Once `stop` is set, the next read raises `_Stopped`."""

    def __init__(
        self,
        src: Any,
        algorithm: str | None,
        limit: int | None = None,
        on_read: Callable[[int], None] | None = None,
        what: str = "blob",
        on_eof: Callable[[_HashingReader], None] | None = None,
        background: bool = False,
        stop: PullStop | None = None,
    ) -> None:
        super().__init__()
        self._src = src
        self._stop = stop
        self._hash: Any = None
        if algorithm:
            self._hash = _BackgroundHash(algorithm) if background else hashlib.new(algorithm)
        self.count = 0
        self._limit = limit
        self._on_read = on_read
        self._what = what
        self._on_eof = on_eof

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1, /) -> bytes:
        if self._stop is not None and self._stop.is_set():
            raise _Stopped(f"{self._what}: stopped")
        data = self._src.read(n if n is not None and n >= 0 else _BLOCK)
        if data:
            self.count += len(data)
            if self._limit is not None and self.count > self._limit:
                raise DigestMismatch(f"{self._what} is larger than its declared size {self._limit}")
            if self._hash is not None:
                self._hash.update(data)
            if self._on_read is not None:
                self._on_read(len(data))
        elif self._on_eof is not None:
            check, self._on_eof = self._on_eof, None
            check(self)
        return bytes(data)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(_BLOCK):
            pass

    def abort(self) -> None:
        _abort(self._src)

    def hexdigest(self) -> str:
        assert self._hash is not None
        return str(self._hash.hexdigest())

    def close(self) -> None:
        if isinstance(self._hash, _BackgroundHash):
            self._hash.close()  # no thread outlives the import
        super().close()


def _decompressor(raw: Any, compression: str) -> Any:
    if compression == "gzip":
        from isal import igzip_threaded

        # A helper thread decompresses ahead while we split and hash.
        opener: Any = igzip_threaded.open
        return opener(raw, "rb", threads=1)
    if compression == "zstd":
        try:
            from compression import zstd  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            from backports import zstd
        return zstd.ZstdFile(raw, "rb")
    if compression == "none":
        return raw
    raise OciError(f"unsupported layer compression {compression!r}")


def _decompress_errors() -> tuple[type[BaseException], ...]:
    import gzip
    import zlib

    errs: list[type[BaseException]] = [EOFError, zlib.error, gzip.BadGzipFile]
    try:
        from backports import zstd

        errs.append(zstd.ZstdError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


# Members kept from an import for the image build (so the layer is not
# read back and parsed again); a layer with more entries is read back
# instead, which keeps memory bounded whatever it holds.
MAX_KEPT_MEMBERS = 200_000


class _LayerSink:
    """Feeds `split_tar` output into a repository splitstream writer; with
    `members`, also records the layer's entries as `read_members` would
    give them back (external ids are filled in by `fill_external`)."""

    def __init__(
        self,
        writer: Any,
        stats: ImportStats,
        repo: Repository,
        members: list[_tar.TarMember] | None = None,
    ) -> None:
        self.writer = writer
        self.stats = stats
        self.repo = repo
        self.members = members
        self._content_of: _tar.TarMember | None = None
        self._externals: list[_tar.TarMember] = []

    def inline(self, data: bytes | bytearray | memoryview) -> None:
        member = self._content_of
        if member is not None:
            # split_tar passes an inline entry's padded content right after it
            self._content_of = None
            member.data = bytes(data[: member.entry.size])
        self.writer.write_inline(data)

    def entry(self, entry: _tar.TarEntry) -> None:
        # file content kept in the stream (undone below when it goes external)
        if entry.kind == _tar.REG:
            self.stats.bytes_inlined += entry.size
        members = self.members
        if members is None:
            return
        if len(members) >= MAX_KEPT_MEMBERS:
            self.members = None
            self._externals = []
            return
        member = _tar.TarMember(entry)
        members.append(member)
        if entry.kind == _tar.REG:
            if entry.size == 0:
                member.data = b""
            elif entry.size <= _tar.INLINE_MAX:
                self._content_of = member

    def external(self, entry: _tar.TarEntry, content: _tar.ContentReader) -> None:
        self.stats.bytes_inlined -= entry.size
        if self.members is not None:
            self._externals.append(self.members[-1])
        self.writer.queue_external_stream(content, entry.size)

    def fill_external(self, refs: list[str]) -> list[_tar.TarMember] | None:
        """The recorded members, given the stream's references in order."""
        if self.members is None or len(refs) != len(self._externals):
            return None
        for member, object_id in zip(self._externals, refs, strict=True):
            member.external = object_id
        return self.members


def import_layer(
    repo: Repository,
    diff_id: str,
    source: BinaryIO | IO[bytes] | _tar.Readable,
    *,
    compression: str = "none",
    name: str | None = None,
    verify: bool = True,
    discard: bool = True,
    members: list[_tar.TarMember] | None = None,
    on_stored: Callable[[str], None] | None = None,
    size_hint: int | None = None,
) -> tuple[str, ImportStats]:
    """Import one layer tar (compressed as given) as ``oci-layer-<diff_id>``.

    Streams: the layer is never held in memory. The uncompressed content
    must hash to `diff_id` (unless `verify` is off); nothing is named when
    it does not. A layer already present is not read at all. Returns the
    stream's object id and what was stored.

    On failure the objects it stored that nothing else needs are removed
    (`Repository.discard_unreferenced`); with `discard` False (imports
    running in parallel) they ride on the exception as
    ``cfs_failed_objects`` for the caller to discard once all are done.

    With `members` (an empty list), the layer's entries are added to it as
    `stored.layer_members` would read them back, unless there are more
    than `MAX_KEPT_MEMBERS` (or the layer was already present): then it
    stays empty. `on_stored(stream id)` runs once everything is stored,
    before the (syncing) naming of the stream. `size_hint` (the blob's
    size) lets a big layer start the object store helper at once.
    """
    alg, _ = parse_digest(diff_id)
    content_id = layer_stream(diff_id)
    existing = repo.has_stream(content_id)
    stats = ImportStats()
    if existing is not None:
        if name is not None:
            repo.name_stream(content_id, name)
        stats.layers_already_present = 1
        return existing, stats
    writer = repo.create_stream(CONTENT_OCI_LAYER)
    if members is not None:
        writer.reference_log = []
    sink = _LayerSink(writer, stats, repo, [] if members is not None else None)
    try:
        if size_hint is not None and size_hint >= _EAGER_HELPER_BYTES:
            writer.start_helper()
        decompressed = _decompressor(source, compression)
        try:
            tar_in = _HashingReader(decompressed, alg if verify else None, background=True)
            try:
                _tar.split_tar(tar_in, sink)
                tar_in.drain()
                # Whatever follows the compressed data must be read too (the
                # caller may verify the blob digest at its end).
                while source.read(_BLOCK):
                    pass
            finally:
                tar_in.close()
        except _decompress_errors() as e:
            raise OciError(f"layer {diff_id}: corrupt {compression} data: {e}") from None
        except BaseException:
            # Interrupted, or failed here: the decompressor's thread may be
            # waiting on a silent download, and closing it waits for that.
            _abort(source)
            raise
        finally:
            if decompressed is not source:
                decompressed.close()
        if verify:
            actual = f"{alg}:{tar_in.hexdigest()}"
            if actual != diff_id:
                raise DigestMismatch(f"layer diff_id mismatch: expected {diff_id}, got {actual}")
        # only objects this import created count as copied (and their bytes)
        stats.objects_copied = writer.objects_new
        stats.objects_already_present = writer.objects_present
        stats.bytes_copied = writer.bytes_new
        stats.layers = 1
        verity = repo.store_stream(writer)
        if members is not None:
            assert writer.reference_log is not None
            members.extend(sink.fill_external(writer.reference_log) or ())
        if on_stored is not None:
            on_stored(verity)
        repo.register_stream(verity, content_id, name)
    except BaseException as e:
        candidates = writer.object_refs
        writer.close()
        if discard:
            _discard(repo, candidates)
        else:
            _failed_objects(e).extend(candidates)
        raise
    return verity, stats


def _failed_objects(e: BaseException) -> list[str]:
    found: list[str] | None = getattr(e, "cfs_failed_objects", None)
    if found is None:
        found = []
        e.cfs_failed_objects = found  # type: ignore[attr-defined]
    return found


def _discard(repo: Repository, candidates: list[str]) -> None:
    """Remove the objects a failed layer import stored that nothing else
    needs (a gzip bomb must not leave gigabytes behind); when another
    process uses the repository they stay for `gc`."""
    try:
        repo.discard_unreferenced(candidates)
    except (OSError, ComposefsError):
        pass  # cleanup is best effort: the import's own error matters


def _store_blob_stream(
    repo: Repository, digest: str, source: BinaryIO | IO[bytes] | _tar.Readable
) -> tuple[str, ImportStats]:
    """An artifact blob: one object in an ``oci_blob`` stream."""
    content_id = layer_stream(digest)
    existing = repo.has_stream(content_id)
    stats = ImportStats()
    if existing is not None:
        stats.layers_already_present = 1
        return existing, stats
    writer = repo.create_stream(CONTENT_OCI_BLOB)
    try:
        writer.write_external_stream(cast(Any, source))
        stats.objects_copied = writer.objects_new
        stats.objects_already_present = writer.objects_present
        stats.bytes_copied = writer.bytes_new
        stats.layers = 1
        verity = repo.write_stream(writer, content_id)
    except BaseException:
        writer.close()
        raise
    return verity, stats


def _write_json_stream(
    repo: Repository, content_type: int, raw: bytes, content_id: str, named: dict[str, str]
) -> str:
    object_id = _store_json_stream(repo, content_type, raw, named)
    repo.register_stream(object_id, content_id)
    return object_id


def _store_json_stream(
    repo: Repository, content_type: int, raw: bytes, named: dict[str, str]
) -> str:
    """Store (not name) a config or manifest stream; its object id."""
    writer = repo.create_stream(content_type)
    try:
        for key, value in named.items():
            writer.add_named_stream_ref(key, value)
        writer.write_external(raw)
        return repo.store_stream(writer)
    except BaseException:
        writer.close()
        raise


# -- pulling ----------------------------------------------------------------------


@dataclass
class PullResult:
    manifest_digest: str
    manifest_verity: str
    config_digest: str
    config_verity: str
    image_ids: dict[int, str]
    tag: str | None
    stats: ImportStats
    boot_image_ids: dict[int, str] = field(default_factory=dict)

    @property
    def image_id(self) -> str | None:
        """The image in the repository's default format (None for artifacts)."""
        return next(iter(self.image_ids.values()), None)


def _report(progress: ProgressCallback | None, event: ProgressEvent) -> None:
    if progress is not None:
        progress(event)


def _run_parallel(
    jobs: Sequence[Callable[..., Any]], workers: int, cancel: PullStop | None = None
) -> list[Any]:
    """Run the jobs (each called with ``stop=`` the pull's stop event),
    `workers` at once.

    When one fails, the wait is interrupted (Ctrl-C) or the caller sets
    `cancel`, the others stop at once instead of finishing their downloads
    (one waiting on a silent connection is woken by its abort, see
    `PullStop`); what they stored joins the raised exception's
    ``cfs_failed_objects`` (layers already complete stay, for a retry)."""
    # A stop of its own: a failure here must not look like the caller's cancel.
    stop = PullStop()
    unlink = cancel.on_set(stop.set) if cancel is not None else None
    try:
        return _run_jobs(jobs, workers, stop)
    finally:
        if unlink is not None:
            unlink()


def _run_jobs(jobs: Sequence[Callable[..., Any]], workers: int, stop: PullStop) -> list[Any]:
    if workers <= 1 or len(jobs) <= 1:
        return [job(stop=stop) for job in jobs]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oci-layer")
    futures: list[Future[Any]] = [pool.submit(job, stop=stop) for job in jobs]
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in futures:
            if f in done and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        return [f.result() for f in futures]
    except BaseException as e:
        stop.set()
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True)
        failed = _failed_objects(e)
        for f in futures:
            if f.done() and not f.cancelled():
                other = f.exception()
                if other is not None and other is not e:
                    failed.extend(_failed_objects(other))
        raise
    finally:
        pool.shutdown(wait=True)


class _Prebuild:
    """Builds the image of the layers in a thread, started once every
    layer is stored (`stored`, called by each of the `count` jobs)."""

    def __init__(
        self,
        repo: Repository,
        diff_ids: list[str],
        members: dict[str, list[_tar.TarMember]],
        count: int,
    ) -> None:
        self.repo = repo
        self.diff_ids = diff_ids
        self.members = members
        self.remaining = count
        self.refs: dict[str, str] = {}
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.images: dict[int, bytes | bytearray] = {}
        self.error: BaseException | None = None

    @property
    def started(self) -> bool:
        return self.thread is not None

    def stored(self, diff_id: str, verity: str) -> None:
        with self.lock:
            self.refs[diff_id] = verity
            self.remaining -= 1
            if self.remaining:
                return
        self.thread = threading.Thread(target=self._build, name="oci-image-build", daemon=True)
        self.thread.start()

    def _build(self) -> None:
        from ..erofs.format import FormatVersion
        from ..erofs.writer import mkfs_buffer

        try:
            kept = {d: m for d, m in self.members.items() if m}
            root = build_tree(self.repo, self.diff_ids, self.refs, members=kept)
            for version in self.repo.format_config().versions():
                self.images[version] = mkfs_buffer(root, FormatVersion(version))
        except BaseException as e:
            self.error = e

    def result(self) -> dict[int, bytes | bytearray]:
        assert self.thread is not None
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.images


def _fetch_small(source: ImageSource, desc: Descriptor, what: str) -> bytes:
    if desc.size > MAX_JSON_SIZE:
        raise OciError(f"{what} {desc.digest} is too large ({desc.size} bytes)")
    with source.open_blob(desc.digest, desc.size) as f:
        data = read_at_most(f, MAX_JSON_SIZE + 1)
    if len(data) != desc.size:
        raise DigestMismatch(f"{what} {desc.digest}: expected {desc.size} bytes, got {len(data)}")
    actual = digest_of(data, desc.digest)
    if actual != desc.digest:
        raise DigestMismatch(f"{what} digest mismatch: expected {desc.digest}, got {actual}")
    return data


def _fetch_layer(
    repo: Repository,
    source: ImageSource,
    desc: Descriptor,
    diff_id: str,
    container: bool,
    progress: ProgressCallback | None,
    members: list[_tar.TarMember] | None = None,
    on_stored: Callable[[str, str], None] | None = None,
    stop: PullStop | None = None,
) -> tuple[str, ImportStats]:
    existing = repo.has_stream(layer_stream(diff_id))
    if existing is not None:
        _report(progress, ProgressEvent("skipped", diff_id))
        if on_stored is not None:
            on_stored(diff_id, existing)
        return existing, ImportStats(layers_already_present=1)
    _report(progress, ProgressEvent("started", diff_id, total=desc.size))
    lock = threading.Lock()
    fetched = [0]

    def on_read(n: int) -> None:
        with lock:
            fetched[0] += n
        _report(progress, ProgressEvent("progress", diff_id, total=desc.size, fetched=fetched[0]))

    alg, _ = parse_digest(desc.digest)
    with source.open_blob(desc.digest, desc.size) as raw:
        # A source that checks the digest itself (the registry's BlobStream
        # fails the read that would complete bad content) needs no second hash.
        verified = bool(getattr(raw, "verifies_digest", False))
        blob = _HashingReader(
            raw, None if verified else alg, desc.size, on_read if progress else None,
            "layer blob", on_eof=lambda r: _check_blob(r, desc, raw if verified else None),
            stop=stop,
        )  # fmt: skip
        # Stopping the pull also wakes this download if it waits on a
        # silent connection.
        unregister = stop.on_set(blob.abort) if stop is not None else None
        try:
            if container:
                compression = layer_compression(desc.media_type)
                if compression is None:
                    raise OciError(f"unsupported layer media type {desc.media_type!r}")
                verity, stats = import_layer(
                    repo, diff_id, blob, compression=compression, discard=False,
                    members=members, size_hint=desc.size,
                    on_stored=functools.partial(on_stored, diff_id) if on_stored else None,
                )  # fmt: skip
            else:
                verity, stats = _store_blob_stream(repo, desc.digest, blob)
        finally:
            if unregister is not None:
                unregister()
    _report(progress, ProgressEvent("done", diff_id, total=desc.size, fetched=blob.count))
    return verity, stats


def _check_blob(blob: _HashingReader, desc: Descriptor, verifier: Any = None) -> None:
    """At the end of a layer blob: size, then digest (unless `verifier`, the
    source stream, has checked it already)."""
    if blob.count != desc.size:
        raise DigestMismatch(
            f"layer blob {desc.digest}: expected {desc.size} bytes, got {blob.count}"
        )
    if verifier is not None:
        if not getattr(verifier, "verified", True):
            raise DigestMismatch(f"layer blob {desc.digest}: source did not verify its digest")
        return
    alg, _ = parse_digest(desc.digest)
    actual = f"{alg}:{blob.hexdigest()}"
    if actual != desc.digest:
        raise DigestMismatch(f"layer blob digest mismatch: expected {desc.digest}, got {actual}")


def commit_image_refs(repo: Repository, root: Directory) -> dict[int, str]:
    """Commit the tree in every repository format; {format: image id}."""
    return repo.commit_images(root)


def pull_from_source(
    repo: Repository,
    source: ImageSource,
    tag: str | None = None,
    *,
    platform: Platform | None = None,
    progress: ProgressCallback | None = None,
    boot: Callable[[Directory], None] | None = None,
    stop: PullStop | None = None,
) -> PullResult:
    """Pull the image `source` names into `repo`; tag it `tag` (if given).

    `boot` (the boot transformation) also commits the bootable image
    (`commit_boot_images`); the tag is set only once everything succeeded,
    so a failed pull leaves no tag (and an existing tag unchanged).
    Setting `stop` (from another thread) cancels the pull: see `PullStop`."""
    repo.ensure_writable()
    if tag is not None:
        validate_tag(tag)
    resolved = resolve_manifest(source, platform)
    manifest = resolved.manifest
    container = manifest.is_container_image
    config_raw = _fetch_small(source, manifest.config, "config")
    _check_stop(stop)
    if container:
        _config, diff_ids = config_diff_ids(config_raw, len(manifest.layers))
    else:
        diff_ids = [d.digest for d in manifest.layers]

    # Layers: biggest first so parallel fetches finish together.
    order = sorted(range(len(manifest.layers)), key=lambda i: -manifest.layers[i].size)
    workers = int(getattr(source, "max_workers", 1) or 1)
    seen: set[str] = set()
    jobs = []
    # The entries of the layers imported now, for the image build.
    kept_members: dict[str, list[_tar.TarMember]] = {}
    for i in order:
        if diff_ids[i] in seen:
            continue
        seen.add(diff_ids[i])
        desc = manifest.layers[i]
        if container and not is_tar_layer(desc.media_type):
            raise OciError(f"unsupported layer media type {desc.media_type!r}")
        members = kept_members.setdefault(diff_ids[i], []) if container else None
        jobs.append(
            functools.partial(
                _fetch_layer, repo, source, desc, diff_ids[i], container, progress, members
            )
        )
    prebuild: _Prebuild | None = None
    if container and repo.has_stream(config_stream(manifest.config.digest)) is None:
        # A new image: its EROFS images are built (CPU) while the last
        # layer's objects are synced to disk (IO).
        prebuild = _Prebuild(repo, diff_ids, kept_members, len(jobs))
        jobs = [functools.partial(j, on_stored=prebuild.stored) for j in jobs]
    stats = ImportStats()
    layer_refs: dict[str, str] = {}
    try:
        results = _run_parallel(jobs, workers, stop)
    except BaseException as e:
        # Every job has finished now: what the failed layer stored and
        # nothing else needs can go (layers that completed stay for a retry).
        _discard(repo, _failed_objects(e))
        if isinstance(e, Exception):
            _check_stop(stop)  # whatever the stop made a download raise
        raise
    _check_stop(stop)
    for diff_id, (verity, layer_stats) in zip([j.args[3] for j in jobs], results, strict=True):
        layer_refs[diff_id] = verity
        stats.merge(layer_stats)

    config_digest = manifest.config.digest
    config_named = {d: layer_refs[d] for d in diff_ids}
    image_ids: dict[int, str] = {}
    new_images: list[str] = []  # stored, named below with the streams
    if container:
        kept = _kept_image_refs(repo, config_digest, layer_refs)
        config_named.update(kept)
        image_ids = _existing_images(repo, kept)
        if not image_ids and prebuild is not None and prebuild.started:
            _report(progress, ProgressEvent("message", message="Building composefs image"))
            images = prebuild.result()
            kept_members.clear()
            image_ids = {v: repo.ensure_object(data) for v, data in images.items()}
            new_images = list(image_ids.values())
        if not image_ids:
            _report(progress, ProgressEvent("message", message="Building composefs image"))
            root = build_tree(
                repo, diff_ids, layer_refs, members={d: m for d, m in kept_members.items() if m}
            )
            kept_members.clear()  # the tree holds what is needed now
            image_ids = commit_image_refs(repo, root)
        for version, image_id in image_ids.items():
            config_named[IMAGE_REF_KEYS[version]] = image_id
    config_verity = _store_json_stream(repo, CONTENT_OCI_CONFIG, config_raw, config_named)
    manifest_named = {f"config:{config_digest}": config_verity}
    manifest_named.update({d: layer_refs[d] for d in diff_ids})
    manifest_verity = _store_json_stream(repo, CONTENT_OCI_MANIFEST, resolved.raw, manifest_named)
    # One sync makes the new image and both streams durable, then each is
    # named (a name never before what it names); a re-pull that names
    # nothing new syncs nothing.
    streams = (
        (config_verity, config_stream(config_digest)),
        (manifest_verity, manifest_stream(resolved.digest)),
    )
    _check_stop(stop)  # before the image and streams are named
    if new_images or not all(repo.stream_named(cid, oid) for oid, cid in streams):
        repo.sync()
    for image_id in new_images:
        repo.link_image(image_id, synced=True)
    for oid, cid in streams:
        repo.register_stream(oid, cid, synced=True)
    boot_ids: dict[int, str] = {}
    if boot is not None:
        if not container:
            raise OciError("--bootable: the image is an artifact, not a container image")
        _report(progress, ProgressEvent("message", message="Building the boot image"))
        boot_ids = commit_boot_images(repo, open_image(repo, resolved.digest), boot)
        manifest_verity = repo.has_stream(manifest_stream(resolved.digest)) or manifest_verity
        config_verity = repo.has_stream(config_stream(config_digest)) or config_verity
    if tag is not None:
        _check_stop(stop)  # e.g. set while the boot image was built
        repo.name_stream(manifest_stream(resolved.digest), tag_ref(tag))
    return PullResult(
        resolved.digest, manifest_verity, config_digest, config_verity, image_ids, tag, stats,
        boot_ids,
    )  # fmt: skip


def commit_boot_images(
    repo: Repository, img: OciImage, transform: Callable[[Directory], None]
) -> dict[int, str]:
    """composefs-rs ``generate_boot_image``: the image tree, `transform`ed
    for boot, committed in every repository format and recorded in the
    config stream as ``composefs.image.boot`` (V2) / ``.boot.v1`` (V0/V1).
    The manifest stream is rewritten to point at the new config stream, so
    every tag of the image sees the boot image (and GC keeps it)."""
    root = image_tree(repo, img)
    transform(root)
    ids = repo.commit_images(root)
    named = dict(img.layer_refs)
    named.update(img.image_refs)
    for version, image_id in ids.items():
        named[BOOT_IMAGE_REF_KEYS[2 if version == 2 else 1]] = image_id
    config_verity = _write_json_stream(
        repo, CONTENT_OCI_CONFIG, img.config_raw, config_stream(img.config_digest), named
    )
    manifest_named = {f"config:{img.config_digest}": config_verity}
    manifest_named.update({d: img.layer_refs[d] for d in img.diff_ids if d in img.layer_refs})
    _write_json_stream(
        repo,
        CONTENT_OCI_MANIFEST,
        img.manifest_raw,
        manifest_stream(img.manifest_digest),
        manifest_named,
    )
    return ids


def _kept_image_refs(
    repo: Repository, config_digest: str, layer_refs: dict[str, str]
) -> dict[str, str]:
    """Image refs (plain and boot, every format) recorded by an earlier pull
    of the same config with the same layers, whose images still exist: a
    re-pull (maybe with another --erofs-version) must not drop them."""
    cid = config_stream(config_digest)
    if repo.has_stream(cid) is None:
        return {}
    try:
        _raw, named = read_json_stream(repo, cid, None, CONTENT_OCI_CONFIG)
    except (OciError, NotFoundError):
        return {}
    if any(named.get(d) != v for d, v in layer_refs.items()):
        return {}
    return {k: v for k, v in named.items() if k in ALL_IMAGE_REF_KEYS and repo.has_object(v)}


def _existing_images(repo: Repository, kept: dict[str, str]) -> dict[int, str]:
    """The images for every repository format, if all were kept."""
    out: dict[int, str] = {}
    for version in repo.format_config().versions():
        image_id = kept.get(IMAGE_REF_KEYS[version])
        if image_id is None:
            return {}
        out[version] = image_id
    # Make sure the images/ links exist (gc may have pruned them).
    for image_id in out.values():
        repo.symlink(f"images/{image_id}", f"objects/{repo.object_relpath(image_id)}")
    return out


def pull(
    repo: Repository,
    imgref: str,
    tag: str | None = None,
    *,
    platform: Platform | str | None = None,
    progress: ProgressCallback | None = None,
    registry_options: Any = None,
    boot: Callable[[Directory], None] | None = None,
    stop: PullStop | None = None,
) -> PullResult:
    """Pull `imgref` (``oci:DIR[:TAG]``, ``oci-archive:``, ``docker-archive:``,
    ``containers-storage:``, ``docker://``) into `repo` and tag it `tag`.
    `registry_options` (`registry.RegistryOptions`) is for ``docker://``;
    `boot` and `stop` as in `pull_from_source`."""
    if isinstance(platform, str):
        platform = Platform.parse(platform)
    if tag is not None:
        validate_tag(tag)
    # The store helper starts while the source opens (for a registry:
    # imports, connection, manifest and config), not once the first layer
    # arrives. Not for a tag the repository has: pulling it again mostly
    # finds every layer stored, and a helper nobody takes costs the start
    # of an interpreter for nothing.
    renewed = tag is not None and repo.has_named_stream(tag_ref(tag))
    with contextlib.nullcontext() if renewed else repo.helper_ahead():
        source = open_source(imgref, registry_options)
        try:
            return pull_from_source(
                repo, source, tag, platform=platform, progress=progress, boot=boot, stop=stop
            )
        finally:
            source.close()
