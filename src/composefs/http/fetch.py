"""`fetch`: copy a stream and everything it needs from a repository served
over HTTP (composefs-rs ``composefs_http::download``, ``cfsctl fetch``).

Order of work, chosen so an interruption at any moment (network error,
Ctrl-C, ``kill -9``) leaves only complete, verified objects and no name:

1. ``streams/NAME`` is resolved (following ``text/x-symlink-target``
   answers, confined to the served tree) to a splitstream object;
2. splitstreams are fetched level by level (in parallel), and their object
   and named refs collected — refs keyed ``[kind:]sha256:HEX`` are
   splitstreams too, ``composefs.image…`` refs are EROFS images whose own
   objects are collected from the image;
3. every missing object is fetched, many at a time, its fs-verity digest
   computed while it streams in and compared before it is linked in;
4. each splitstream reached through a digest-keyed ref is reassembled and
   hashed: it must match the key (the spec's named-ref rule) — streams that
   are already in the repository under that content name were checked when
   they were stored and are skipped;
5. an OCI config's composefs images (``composefs.image…`` refs, which no
   digest covers) are rebuilt from its layers and must be identical
   (``verify_images``; images already registered here are trusted);
6. after one ``syncfs``, names appear: ``streams/<content id>`` of every
   OCI stream, ``images/<id>`` of every image, and last ``streams/NAME``
   (or ``streams/refs/…`` for a ``refs/…`` NAME).

Objects already present are never requested, so running the same fetch
again after an interruption transfers only what is missing.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

from .. import fsverity
from ..errors import HttpError
from . import _repo, core
from .client import Body, HttpClient, HttpOptions

if TYPE_CHECKING:
    from ..repository import Repository

T = TypeVar("T")
#: Streams one fetch may reach (a hostile server could chain without end).
MAX_STREAMS = 100_000
# How often `_parallel` looks whether more threads would help, and the share
# of their time on CPU under which they do (they mostly wait for replies).
_RAMP_EVERY = 0.05
_RAMP_BUSY = 0.5


@dataclass
class FetchResult:
    name: str
    #: ``sha256:HEX`` of the stream's reassembled content (as composefs-rs prints)
    content_digest: str
    #: object id of the stream
    verity: str
    #: the local ``streams/<content id>`` the stream is registered as
    content_id: str
    objects_fetched: int = 0
    objects_present: int = 0
    bytes_fetched: int = 0
    streams: int = 0
    images: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Stream:
    object_id: str
    #: (algorithm, hex) its content must hash to, from a ref key or stream name
    expected: tuple[str, str] | None = None
    content_type: int = 0
    content_id: str | None = None
    digest: str | None = None
    named: dict[str, str] = field(default_factory=dict)


class _Ramp:
    """How many threads `Fetcher._parallel` adds, from the CPU time its
    threads used since the last look: as many again as run (up to `limit`)
    while they spent less than `_RAMP_BUSY` of their time on CPU."""

    def __init__(self, limit: int, cpu: float, now: float) -> None:
        self.limit = limit
        self.cpu = cpu
        self.at = now

    def more(self, started: int, running: int, cpu: float, now: float) -> int:
        elapsed = now - self.at
        if started >= self.limit or running <= 0 or elapsed <= 0:
            return 0
        busy = (cpu - self.cpu) / (elapsed * running)
        self.cpu, self.at = cpu, now
        if busy >= _RAMP_BUSY:
            return 0
        return min(started, self.limit - started)


class _HashWriter:
    def __init__(self, h: Any) -> None:
        self.h = h

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return len(data)


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.fetched = 0
        self.bytes = 0

    def add(self, n: int) -> None:
        with self.lock:
            self.fetched += 1
            self.bytes += n


ProgressCallback = Callable[[str, int, int], None]


class Fetcher:
    """One fetch into `repo` from the repository at `url` (see module doc)."""

    def __init__(
        self,
        repo: Repository,
        url: str,
        options: HttpOptions | None = None,
        *,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        verify_images: bool = True,
    ) -> None:
        self.repo = repo
        self.verify_images = verify_images
        self.algorithm = repo.algorithm
        self.options = options or HttpOptions()
        self.client = HttpClient(url, self.options, cancel=cancel)
        self.progress = progress
        self.counters = _Counters()

    def close(self) -> None:
        self.client.close()

    # -- parallel helper ---------------------------------------------------

    def _parallel(self, items: Iterable[str], work: Callable[[str], object]) -> None:
        """`work` on every item, from up to max_workers threads pulling from
        one shared iterator (no task objects per item). The first error
        stops the others (`HttpClient.abort`: their transfers fail at once,
        also one waiting on a silent server) and is raised; so is Ctrl-C.

        Threads are added only while they help: one starts, and every
        `_RAMP_EVERY` the number doubles (up to max_workers) while the
        running ones spend less than `_RAMP_BUSY` of their time on CPU,
        i.e. mostly wait for the network. Close to the server a request
        costs more CPU than waiting, and extra threads only fight over the
        interpreter (on loopback, 2 threads took twice the CPU of one and
        longer); far from it, many requests in flight hide the latency."""
        todo = list(items)
        if not todo:
            return
        workers = max(1, min(self.options.max_workers, len(todo)))
        if workers == 1:
            for item in todo:
                work(item)
            return
        it = iter(todo)
        lock = threading.Lock()
        errors: list[BaseException] = []
        stop = threading.Event()

        def worker() -> None:
            while not stop.is_set():
                with lock:
                    item = next(it, None)
                if item is None:
                    return
                try:
                    work(item)
                except BaseException as e:  # handed to the caller below
                    with lock:
                        errors.append(e)
                    stop.set()
                    self.client.abort()
                    return

        threads: list[threading.Thread] = []

        def add(count: int) -> None:
            for _ in range(count):
                t = threading.Thread(target=worker, name=f"cfs-fetch-{len(threads)}", daemon=True)
                threads.append(t)
                t.start()

        # The process's CPU time: the workers' (this thread only waits),
        # also while one is in the middle of a long transfer.
        ramp = _Ramp(workers, time.process_time(), time.monotonic())
        add(1)
        try:
            while True:
                running = [t for t in threads if t.is_alive()]
                if not running:
                    break
                running[0].join(_RAMP_EVERY)
                if not stop.is_set():
                    add(ramp.more(len(threads), len(running), time.process_time(), time.monotonic()))
        except BaseException:
            stop.set()
            self.client.abort()
            for t in threads:
                t.join()
            raise
        if errors:
            raise errors[0]

    # -- single transfers --------------------------------------------------

    def ensure_object(self, object_id: str, limit: int | None = None) -> bool:
        """Fetch object `object_id` unless present; True if it was fetched."""
        if self.repo.has_object(object_id):
            return False
        path = core.object_path(object_id, self.algorithm)

        def store(body: Body) -> int:
            # The body hashes what it hands over and raises on a mismatch
            # before its last byte, so before the store links anything: the
            # store need not hash it again.
            self.repo.ensure_object_from_stream(
                cast(BinaryIO, body), body.length, verified_id=object_id
            )
            return body.position

        n = self.client.get(
            path,
            store,
            limit=self.options.max_object_size if limit is None else limit,
            expected_id=object_id,
            algorithm=self.algorithm,
        )
        self.counters.add(n)
        if self.progress is not None:
            self.progress("object", self.counters.fetched, self.counters.bytes)
        return True

    def _fetch_missing(self, object_ids: Iterable[str], limit: int | None = None) -> None:
        # Present objects cost one stat here, not a task on the pool.
        repo = self.repo
        missing = sorted(o for o in object_ids if not repo.has_object(o))
        self._parallel(missing, lambda o: self.ensure_object(o, limit))

    def _registered(self, relpath: str, object_id: str) -> bool:
        """Whether repository symlink `relpath` already points at `object_id`."""
        try:
            target = os.readlink(relpath, dir_fd=self.repo.fileno())
        except OSError:
            return False
        return target.endswith(f"objects/{object_id[:2]}/{object_id[2:]}")

    def resolve_root(self, name: str) -> tuple[str, str | None]:
        """Object id of ``streams/NAME`` on the server, and the content id
        the server stores it under if its symlinks tell (else None)."""
        path = core.stream_path(name)
        server_name: str | None = None
        for _ in range(core.MAX_LINK_HOPS):
            kind, value = self.client.get(
                path, self._link_or_stream, limit=self.options.max_stream_size
            )
            if kind == "object":
                return value, server_name
            if kind == "link":
                target = core.resolve_link(path, value, self.algorithm)
                if target.object_id is not None:
                    if server_name is None and core.is_content_id(name):
                        server_name = name
                    self.ensure_object(target.object_id, self.options.max_stream_size)
                    return target.object_id, server_name
                assert target.stream is not None
                if core.is_content_id(target.stream):
                    server_name = target.stream
                path = core.stream_path(target.stream)
                continue
        raise HttpError(f"{core.url_for(self.client.base, path)}: too many symlinks")

    def _link_or_stream(self, body: Body) -> tuple[str, str]:
        if core.is_symlink_response(body.content_type):
            if body.length is not None and body.length > core.MAX_LINK_BODY:
                raise HttpError(f"{body.url}: symlink target too long")
            data = b""
            while len(data) <= core.MAX_LINK_BODY and (chunk := body.read(core.MAX_LINK_BODY)):
                data += chunk
            if len(data) > core.MAX_LINK_BODY:
                raise HttpError(f"{body.url}: symlink target too long")
            return "link", core.decode_link_body(body.url, data)
        # The stream itself (a server that follows symlinks): stored as what
        # it hashes to; what it claims is checked once its objects are here.
        object_id = self.repo.ensure_object_from_stream(cast(BinaryIO, body), body.length)
        self.counters.add(body.position)
        return "object", object_id

    # -- the walk ---------------------------------------------------------------

    def _read_stream(self, s: _Stream) -> tuple[list[str], dict[str, str]]:
        s.content_type, object_refs, named = _repo.stream_refs(self.repo, s.object_id)
        return object_refs, named

    def _verify(self, s: _Stream) -> None:
        """Hash the reassembled stream; check it against what its ref key or
        name promises."""
        alg = s.expected[0] if s.expected else "sha256"
        h = hashlib.new(alg)
        self.repo.cat_stream("", _HashWriter(h), verity=s.object_id)
        s.digest = f"{alg}:{h.hexdigest()}"
        if s.expected is not None and h.hexdigest() != s.expected[1]:
            raise HttpError(
                f"stream {s.object_id}: content is {s.digest}, "
                f"but it is referenced as {s.expected[0]}:{s.expected[1]}"
            )

    def _check_images(self, s: _Stream) -> None:
        """An OCI config names its composefs images (``composefs.image…``);
        nothing in the digests checked so far covers those refs, so each
        image is rebuilt from the (verified) layers and must be identical.
        Images already registered here were built or checked before. Boot
        images (made by a boot transform) are taken as served."""
        from ..erofs.format import FormatVersion
        from ..erofs.writer import mkfs_buffer
        from ..oci import storage
        from ..splitstream import CONTENT_OCI_CONFIG

        if s.content_type != CONTENT_OCI_CONFIG or s.expected is None:
            return
        wanted = {
            version: s.named[key]
            for version, key in storage.IMAGE_REF_KEYS.items()
            if key in s.named and not self._registered(f"images/{s.named[key]}", s.named[key])
        }
        if not wanted:
            return
        digest = f"{s.expected[0]}:{s.expected[1]}"
        tree = storage.config_tree(self.repo, digest, s.object_id)
        for version, image_id in sorted(wanted.items()):
            got = fsverity.digest_hex(mkfs_buffer(tree, FormatVersion(version)), self.algorithm)
            if got != image_id:
                raise HttpError(
                    f"config {digest}: its composefs image {image_id} does not match "
                    f"its layers (they make {got})"
                )

    def run(self, name: str) -> FetchResult:
        t0 = time.monotonic()
        repo = self.repo
        repo.ensure_writable()
        core.check_relpath(name, "stream name")
        local_ref = name[len("refs/") :] if name.startswith("refs/") else None
        if local_ref is None and not core.is_content_id(name):
            raise HttpError(f"invalid stream name {name!r}: a content id or refs/NAME")
        root_id, server_name = self.resolve_root(name)
        root = _Stream(root_id)
        if local_ref is None:
            root.content_id = name
            root.expected = core.content_id_digest(name)
        elif server_name is not None:
            root.content_id = server_name
            root.expected = core.content_id_digest(server_name)

        streams: dict[str, _Stream] = {root_id: root}
        objects: set[str] = set()
        images: set[str] = set()
        level = [root]
        while level:
            # Splitstreams are read whole: the stream size limit applies.
            self._fetch_missing((s.object_id for s in level), self.options.max_stream_size)
            nxt: list[_Stream] = []
            for s in level:
                object_refs, named = self._read_stream(s)
                s.named = named
                objects.update(object_refs)
                for key, ref_id in named.items():
                    objects.add(core.check_object_id(ref_id, self.algorithm))
                    if core.is_image_key(key):
                        images.add(ref_id)
                        continue
                    expected = core.key_digest(key)
                    if expected is None:
                        continue  # an opaque named object: fetched, not followed
                    seen = streams.get(ref_id)
                    if seen is None:
                        if len(streams) >= MAX_STREAMS:
                            raise HttpError(f"more than {MAX_STREAMS} streams referenced")
                        seen = streams[ref_id] = _Stream(ref_id, expected)
                        nxt.append(seen)
                    elif seen is root and root.expected is None:
                        raise HttpError(f"stream {ref_id} references itself")
                    elif seen.expected is None:
                        seen.expected = expected
                    elif seen.expected != expected:
                        raise HttpError(
                            f"stream {ref_id} is referenced with two different digests "
                            f"{seen.expected[0]}:{seen.expected[1]} and {expected[0]}:{expected[1]}"
                        )
            level = nxt
        for s in streams.values():
            if s.expected is not None and s.content_id is None:
                s.content_id = core.content_id_for(
                    s.content_type, f"{s.expected[0]}:{s.expected[1]}"
                )

        # Objects (image objects included), then the objects the images name.
        objects.difference_update(streams)
        fetched_before = self.counters.fetched
        self._fetch_missing(objects)
        image_objects: set[str] = set()
        for image_id in sorted(images):
            # An image registered here had all its objects when it was.
            if not self._registered(f"images/{image_id}", image_id):
                image_objects.update(_repo.image_objects(self.repo, image_id))
        image_objects -= objects
        self._fetch_missing(image_objects)
        objects |= image_objects
        objects_fetched = self.counters.fetched - fetched_before

        # The named-ref rule: content digests; streams stored earlier under
        # the same content name were checked when they were stored.
        def verify(object_id: str) -> None:
            s = streams[object_id]
            if (
                s is not root
                and s.content_id is not None
                and repo.has_stream(s.content_id) == object_id
            ):
                return
            self._verify(s)

        self._parallel(list(streams), verify)
        if root.digest is None:
            self._verify(root)
        assert root.digest is not None
        derived = core.content_id_for(root.content_type, root.digest)
        if root.content_id is None:
            # Served by a symlink-following server under a refs/ name: OCI
            # streams are named by their content; others by their digest.
            root.content_id = derived or root.digest
        elif (
            derived is not None
            and core.content_id_digest(root.content_id) is not None
            and (root.content_id != derived)
        ):
            raise HttpError(f"{name}: content is {derived}, not {root.content_id}")

        if self.verify_images:
            for s in streams.values():
                self._check_images(s)

        # Names last, after everything they reach is on disk.
        repo.sync()
        for s in streams.values():
            if s is not root and s.content_id is not None:
                repo.symlink(
                    f"streams/{s.content_id}", f"objects/{repo.object_relpath(s.object_id)}"
                )
        for image_id in sorted(images):
            repo.symlink(f"images/{image_id}", f"objects/{repo.object_relpath(image_id)}")
        repo.symlink(f"streams/{root.content_id}", f"objects/{repo.object_relpath(root_id)}")
        if local_ref is not None:
            repo.name_stream(root.content_id, local_ref)
        return FetchResult(
            name,
            root.digest,
            root_id,
            root.content_id,
            objects_fetched=objects_fetched,
            objects_present=len(objects) - objects_fetched,
            bytes_fetched=self.counters.bytes,
            streams=len(streams),
            images=sorted(images),
            seconds=time.monotonic() - t0,
        )


def fetch(
    repo: Repository,
    url: str,
    name: str,
    options: HttpOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    cancel: threading.Event | None = None,
    verify_images: bool = True,
) -> FetchResult:
    """Fetch stream `name` (a content id such as ``oci-config-sha256:…``, or
    ``refs/…`` such as ``refs/oci/latest``) and everything it references
    from the composefs repository served at `url` into `repo`. With
    `verify_images`, OCI images' composefs images are rebuilt from their
    layers and compared (their refs are covered by no digest)."""
    fetcher = Fetcher(
        repo, url, options, progress=progress, cancel=cancel, verify_images=verify_images
    )
    try:
        return fetcher.run(name)
    finally:
        fetcher.close()
