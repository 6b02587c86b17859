"""Splitstreams and their refs: ``streams/<content-id>`` and ``streams/refs/<name…>``.

`StreamStore` stores splitstreams (written through `RepoStreamWriter`, whose
external chunks become objects) in an `ObjectStore`, names them only after
everything they refer to is synced, resolves names and refs, and opens
them for reading.
"""

from __future__ import annotations

import os
import stat
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, BinaryIO, TypeVar

from .. import fsverity
from ..errors import NotFoundError, RepositoryError
from ..splitstream import _SPOOL_MEM_MAX, SplitStreamReader, SplitStreamWriter, Writable
from ._fs import _check_relpath, _exists, _is_hex_id, _open_regular, _read_exactly
from ._store_helper import HelperResult, HelperUnavailable, StoreHelper
from .objects import _SMALL_OBJECT, FdWriter, ObjectStore, TmpObject

if TYPE_CHECKING:  # tempfile, concurrent.futures: imported where used
    from concurrent.futures import Future, ThreadPoolExecutor

    # An object being stored: in the writer's thread or by its helper process.
    _Pending = Future[tuple[str, bool]] | HelperResult

T = TypeVar("T")


# Objects queued for the background store: at most this many bytes (and
# entries) in flight, so memory stays bounded whatever the layer holds.
_QUEUE_BYTES = 4 << 20
_QUEUE_ENTRIES = 64
# With a helper process the objects in flight are its (and the socket's),
# not ours, and its replies come in batches: a longer queue keeps it busy.
_HELPER_QUEUE_BYTES = 16 << 20
_HELPER_QUEUE_ENTRIES = 512
# After this many small objects (or bytes) a writer starts a helper process
# (`_store_helper`) and moves its object stores there once it runs: worth
# its start-up cost (~0.07 s of CPU, in parallel) only for big layers.
_HELPER_AFTER_OBJECTS = 256
_HELPER_AFTER_BYTES = 4 << 20
# The largest object handed to the helper whole (in memory, in flight).
_HELPER_OBJECT_MAX = 8 << 20


class RepoStreamWriter(SplitStreamWriter):
    """A splitstream writer bound to a repository: `write_external*` store
    the data as an object and reference it. Finish it with
    `StreamStore.write_stream` (or `StreamStore.store_stream`).

    `queue_external_stream` hands small objects to one background thread
    (hashing and writing them while the caller parses what follows: a
    layer import uses both CPUs); the stream records stay in order, and
    `finish` waits for every queued object.
    """

    def __init__(
        self,
        repo: ObjectStore,
        content_type: int,
        helpers_ahead: list[StoreHelper] | None = None,
    ) -> None:
        # Spools (long inline runs, the compressed stream) go to anonymous
        # files inside the repository, never to $TMPDIR.
        objects_dir = repo.objects_dir

        def spool() -> IO[bytes]:
            import tempfile

            return tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEM_MAX, dir=objects_dir)

        super().__init__(repo.algorithm, content_type, spool=spool)
        self.repo = repo
        # Stream records waiting for an object ahead of them: (future object
        # id, None, size) for a reference, (None, data, size) for inline data.
        self._queue: deque[tuple[_Pending | None, bytes | None, int]] = deque()
        self._queued_bytes = 0
        self._pool: ThreadPoolExecutor | None = None
        self._helper: StoreHelper | None = None
        self._starting: StoreHelper | None = None
        self._helper_failed = False
        # Helpers started ahead (`StreamStore.helper_ahead`): the first
        # writer that wants one takes it instead of starting its own.
        self._helpers_ahead = helpers_ahead if helpers_ahead is not None else []
        self._eager = False
        self._small_objects = 0
        self._small_bytes = 0
        # What the external writes stored: new objects (and their bytes)
        # and objects that were already present (see the properties).
        self._objects_new = 0
        self._objects_present = 0
        self._bytes_new = 0
        # With a list here, every reference appended to the stream is
        # recorded in stream order (an import keeps its members this way).
        self.reference_log: list[str] | None = None

    def _count(self, new: bool, size: int) -> None:
        if new:
            self._objects_new += 1
            self._bytes_new += size
        else:
            self._objects_present += 1

    # The counts include the queued objects: reading one waits for them.
    @property
    def objects_new(self) -> int:
        self._apply_queue(block=True, everything=True)
        return self._objects_new

    @property
    def objects_present(self) -> int:
        self._apply_queue(block=True, everything=True)
        return self._objects_present

    @property
    def bytes_new(self) -> int:
        self._apply_queue(block=True, everything=True)
        return self._bytes_new

    def write_external(self, data: bytes | bytearray | memoryview) -> str:
        """Store `data` as an object and append a reference to it."""
        object_id, new = self.repo.store_bytes_counted(data, check_writable=False)
        self._count(new, len(data))
        self.write_reference(object_id, len(data))
        return object_id

    def write_external_stream(self, source: BinaryIO | IO[bytes], size: int | None = None) -> str:
        """Store `size` bytes (or everything) read from `source` as an object
        and append a reference to it; bounded memory."""
        object_id, n, new = self.repo.store_from_stream_counted(
            source, size, check_writable=False
        )
        self._count(new, n)
        self.write_reference(object_id, n)
        return object_id

    def queue_external_stream(self, source: BinaryIO | IO[bytes], size: int) -> None:
        """`write_external_stream` of exactly `size` bytes, with a small
        object stored in the background (its id is not returned)."""
        self._check_open()
        # With the helper running, objects up to _HELPER_OBJECT_MAX go to it
        # too: storing one here (hashing, writing) holds up the parsing.
        if size > (_SMALL_OBJECT if self._helper is None else _HELPER_OBJECT_MAX):
            self.write_external_stream(source, size)
            return
        data = _read_exactly(source, size)
        self._small_objects += 1
        self._small_bytes += size
        fut: _Pending
        helper = self._usable_helper()
        if helper is not None:
            fut = helper.submit(data)
        if helper is None:
            if self._pool is None:
                # Lazily opened state, set up here rather than raced for.
                self.repo.objects_fd()
                self.repo.ensure_writable_once()
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="object-store")
            fut = self._pool.submit(self.repo.store_bytes_counted, data, check_writable=False)
        self.total_size += size
        self.external_size += size
        self._queue.append((fut, None, size))
        self._queued_bytes += size
        self._apply_queue(block=True)

    def start_helper(self) -> None:
        """Start the helper process now rather than after the first objects:
        for a stream known to be big (its start then overlaps the first
        objects instead of following them)."""
        self._check_open()
        self._eager = True
        self._usable_helper()

    def _usable_helper(self) -> StoreHelper | None:
        """The helper once it runs. It is started (in the background: the
        thread stores meanwhile) after `_HELPER_AFTER_OBJECTS` objects or
        `_HELPER_AFTER_BYTES`; one that does not start is not an error."""
        if self._helper is not None or self._helper_failed:
            return self._helper
        if self._starting is None:
            if (
                not self._eager
                and self._small_objects < _HELPER_AFTER_OBJECTS
                and self._small_bytes < _HELPER_AFTER_BYTES
            ):
                return None
            self.repo.objects_fd()
            self.repo.ensure_writable_once()
            try:
                try:
                    self._starting = self._helpers_ahead.pop()  # atomic: writers race
                except IndexError:
                    self._starting = StoreHelper(self.repo)
            except (OSError, HelperUnavailable):
                self._helper_failed = True
                return None
        try:
            if not self._starting.ready():
                return None
        except HelperUnavailable:
            self._starting.close()
            self._starting = None
            self._helper_failed = True
            return None
        self._helper, self._starting = self._starting, None
        return self._helper

    def write_inline(self, data: bytes | bytearray | memoryview) -> None:
        if not self._queue:
            super().write_inline(data)
            return
        self._check_open()
        if data:
            self.total_size += len(data)
            self.inline_size += len(data)
            self._queue.append((None, bytes(data), len(data)))
            self._queued_bytes += len(data)
            self._apply_queue(block=True)

    def write_reference(self, object_id: str, size: int) -> None:
        self._apply_queue(block=True, everything=True)
        super().write_reference(object_id, size)

    def _append_reference(self, object_id: str) -> None:
        if self.reference_log is not None:
            self.reference_log.append(object_id)
        super()._append_reference(object_id)

    def _apply_queue(self, *, block: bool, everything: bool = False) -> None:
        """Write the queued records whose objects are stored, in order;
        with `block`, wait while the queue is over its bounds (or, with
        `everything`, until it is empty). Without `block` it never waits."""
        queue = self._queue
        while queue:
            fut, data, nbytes = queue[0]
            if fut is not None and not fut.done():
                if self._helper is None:
                    over = self._queued_bytes > _QUEUE_BYTES or len(queue) > _QUEUE_ENTRIES
                else:
                    over = (
                        self._queued_bytes > _HELPER_QUEUE_BYTES
                        or len(queue) > _HELPER_QUEUE_ENTRIES
                    )
                if not (block and (everything or over)):
                    return
            queue.popleft()
            self._queued_bytes -= nbytes
            if fut is None:
                assert data is not None
                self._append_inline(data)
            else:
                object_id, new = fut.result()  # a failed store raises here
                self._count(new, nbytes)
                self._append_reference(object_id)

    def finish(self, out: Writable) -> int:
        self._apply_queue(block=True, everything=True)
        self._shutdown()
        return super().finish(out)

    @property
    def object_refs(self) -> list[str]:
        """Every object referenced so far, the queued ones included once
        stored (this waits for them; a store that failed is left out, so a
        failed import can still list what it stored, to discard it)."""
        refs = super().object_refs
        seen = set(refs)
        for fut, _, _ in self._queue:
            if fut is None:
                continue
            try:
                object_id, _ = fut.result()
            except BaseException:
                continue
            if object_id not in seen:
                seen.add(object_id)
                refs.append(object_id)
        return refs

    def close(self) -> None:
        for fut, _, _ in self._queue:
            if fut is not None:
                fut.cancel()
        self._queue.clear()
        self._shutdown()
        super().close()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for helper in (self._helper, self._starting):
            if helper is not None:
                helper.close()
        self._helper = self._starting = None

    def write_external_file(self, path_or_fd: str | os.PathLike[str] | int) -> str:
        """Store a file's content (reflinked when possible) and reference it."""
        object_id, _method, size = self.repo.store_file(path_or_fd, check_writable=False)
        self.write_reference(object_id, size)
        return object_id


class StreamStore:
    """The splitstreams of a repository, stored in `objects`."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self._helpers_ahead: list[StoreHelper] = []

    def create_stream(self, content_type: int = 0) -> RepoStreamWriter:
        """A new splitstream writer for this repository (see `write_stream`)."""
        self.objects.ensure_writable()
        return RepoStreamWriter(self.objects, content_type, self._helpers_ahead)

    @contextmanager
    def helper_ahead(self) -> Iterator[None]:
        """Start a store helper process now, for a big import about to
        begin (e.g. a pull, before it opens its source): the helper's
        start-up (an interpreter, ~0.05 s) then overlaps the set-up instead
        of the first objects. The first writer that wants a helper takes
        it; one nobody took is stopped on exit (it was given nothing, so it
        is killed, not waited for). Never fails: without it, writers start
        their own helper, or store in-process, as before. Nested uses start
        only one."""
        if self._helpers_ahead or self.objects.read_only_features:
            yield
            return
        try:
            helper: StoreHelper | None = StoreHelper(self.objects)
        except (OSError, HelperUnavailable):
            helper = None
        if helper is not None:
            self._helpers_ahead.append(helper)
        try:
            yield
        finally:
            if helper is not None:
                try:
                    self._helpers_ahead.remove(helper)  # atomic, as the writers' pop
                except ValueError:
                    pass  # a writer took it, and stops it
                else:
                    helper.discard()

    def store_stream(self, writer: SplitStreamWriter) -> str:
        """Finish `writer` and store the splitstream as an object, without
        naming it; returns its id (see `register_stream`)."""
        if writer.algorithm != self.objects.algorithm:
            raise RepositoryError("splitstream writer uses a different algorithm")
        self.objects.ensure_writable()
        hasher = fsverity.FsVerityHasher(self.objects.algorithm) if self.objects.insecure else None
        with TmpObject(self.objects) as tmp:
            out = FdWriter(tmp.fd, hasher)
            writer.finish(out)
            object_id, _ = self.objects.finalize(
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
        self,
        object_id: str,
        content_id: str,
        reference: str | None = None,
        *,
        synced: bool = False,
    ) -> None:
        """Make the stored splitstream `object_id` visible as
        ``streams/<content_id>`` (after syncing everything it refers to),
        optionally also as ``streams/refs/<reference>``.

        `synced`: the caller ran `sync()` after storing the stream and
        everything it refers to (one sync before naming several things)."""
        self._check_content_id(content_id)
        if not self.objects.has_object(object_id):
            raise NotFoundError(f"object {object_id} not found")
        if not self.stream_named(content_id, object_id):
            # (Already named so: it was made durable before, no sync needed;
            # a re-pull rewrites its config and manifest streams unchanged.)
            if not synced:
                self.objects.sync()
            self.objects.symlink(
                f"streams/{content_id}", f"objects/{self.objects.object_relpath(object_id)}"
            )
        if reference is not None:
            self.name_stream(content_id, reference)

    def stream_named(self, content_id: str, object_id: str) -> bool:
        """Whether ``streams/<content_id>`` already names `object_id` (so
        `register_stream` has nothing to sync or link for it)."""
        try:
            return self.objects.readlink_id(f"streams/{content_id}") == object_id
        except RepositoryError:
            return False  # not a symlink: replaced when it is named

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
        return self.objects.readlink_id(f"streams/{content_id}")

    def name_stream(self, content_id: str, name: str) -> None:
        """Point ``streams/refs/<name>`` at ``streams/<content_id>`` (a GC root).
        `name` may contain ``/`` to build a hierarchy."""
        self._check_content_id(content_id)
        _check_relpath(name, "ref name")
        self.objects.symlink(f"streams/refs/{name}", f"streams/{content_id}")

    def has_named_stream(self, name: str) -> bool:
        _check_relpath(name, "ref name")
        try:
            return stat.S_ISLNK(os.lstat(f"streams/refs/{name}", dir_fd=self.objects.dirfd).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def remove_stream_ref(self, name: str) -> bool:
        """Delete ``streams/refs/<name>``; False if it did not exist."""
        self.objects.ensure_writable()
        _check_relpath(name, "ref name")
        try:
            os.unlink(f"streams/refs/{name}", dir_fd=self.objects.dirfd)
        except FileNotFoundError:
            return False
        return True

    def list_stream_refs(self, prefix: str = "") -> list[tuple[str, str]]:
        """(name, symlink target) of the refs directly in ``streams/refs/<prefix>``."""
        path = "streams/refs" + (f"/{prefix.strip('/')}" if prefix.strip("/") else "")
        if prefix.strip("/"):
            _check_relpath(prefix.strip("/"), "ref prefix")
        try:
            names = os.listdir(os.path.join(self.objects.abspath, path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for name in sorted(names):
            try:
                out.append((name, os.readlink(f"{path}/{name}", dir_fd=self.objects.dirfd)))
            except OSError:
                continue
        return out

    def stream_id(self, name: str) -> str | None:
        """The object id behind stream `name` (content id or ``refs/…``)."""
        _check_relpath(name, "stream name")
        return self.objects.resolve_id(f"streams/{name}")

    def open_stream(
        self,
        name: str,
        verity: str | None = None,
        expected_content_type: int | None = None,
    ) -> SplitStreamReader:
        """Open splitstream `name` (content id, ``refs/…`` or a bare ref
        name, or its object id as ``ALG:<hex>`` or hex), or by object id
        `verity` (verified in a secure repository). Close the reader after use."""
        if verity is None:
            alg = self.objects.algorithm
            prefix, sep, rest = name.partition(":")
            if sep and prefix == alg and _is_hex_id(rest, alg):
                verity = rest
            elif "/" not in name and "\0" not in name and name not in ("", ".", ".."):
                if not _exists(self.objects.dirfd, f"streams/{name}"):
                    if _is_hex_id(name, alg):
                        verity = name
                    elif _exists(self.objects.dirfd, f"streams/refs/{name}"):
                        name = f"refs/{name}"
        if verity is not None:
            fd = self.objects.open_object(verity)
        else:
            _check_relpath(name, "stream name")
            try:
                fd = _open_regular(f"streams/{name}", self.objects.dirfd)
            except (FileNotFoundError, NotADirectoryError):
                raise NotFoundError(f"stream {name} not found") from None
        f = os.fdopen(fd, "rb")
        return SplitStreamReader(
            f,
            algorithm=self.objects.algorithm,
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
            return reader.cat(out, self.objects.open_object_file)
