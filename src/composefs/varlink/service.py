"""The method handlers of ``org.composefs.Repository`` and ``org.composefs.Oci``
(composefs-rs ``crates/composefs-ctl/src/varlink.rs``), over the library.

Nothing here knows the wire: `Service.call` takes a method name, validated
parameters and received fds, and returns reply parameters (plus fds to send)
or, for ``Pull``, an async iterator of reply frames. Failures are
`VarlinkCallError` with the reference's error names. The transport
(`composefs.varlink.server`) does framing, fd passing and protocol errors.

Blocking library calls run in a thread pool so one slow call (a pull, an
fsck) never stalls the event loop or the other clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import ComposefsError, NotFoundError, VarlinkCallError

REPO = "org.composefs.Repository"
OCI = "org.composefs.Oci"

VENDOR = "org.composefs"
PRODUCT = "cfsctl"
URL = "https://github.com/composefs/composefs-rs"

_log = logging.getLogger("composefs.varlink")
_T = TypeVar("_T")

Reply = dict[str, Any]


# -- parameter schemas (the pinned IDL's method signatures) -------------------

# A type is "int" | "bool" | "string" | "[]string" | "MountParams", "?" for optional.
_MOUNT_PARAMS = {"overlay": "?bool", "read_write": "?bool"}

SIGNATURES: dict[str, dict[str, str]] = {
    f"{REPO}.InitRepository": {"path": "string", "algorithm": "?string", "insecure": "?bool"},
    f"{REPO}.EnsureRepository": {"path": "string", "algorithm": "?string", "insecure": "?bool"},
    f"{REPO}.OpenRepository": {"path": "?string", "user": "?bool", "system": "?bool"},
    f"{REPO}.CloseRepository": {"handle": "int"},
    f"{REPO}.Fsck": {"handle": "int", "metadata_only": "?bool"},
    f"{REPO}.Gc": {"handle": "int", "dry_run": "bool", "roots": "[]string"},
    f"{REPO}.ImageObjects": {"handle": "int", "name": "string"},
    f"{REPO}.ListImageRefs": {"handle": "int"},
    f"{REPO}.Mount": {"handle": "int", "name": "string", "options": "MountParams"},
    f"{OCI}.ListImages": {"handle": "int", "filter": "?string"},
    f"{OCI}.Check": {"handle": "int", "image": "?string"},
    f"{OCI}.Inspect": {"handle": "int", "image": "string"},
    f"{OCI}.Tag": {"handle": "int", "manifest_digest": "string", "name": "string"},
    f"{OCI}.Untag": {"handle": "int", "name": "string"},
    f"{OCI}.ComputeId": {
        "handle": "int",
        "image": "string",
        "verity": "?string",
        "bootable": "bool",
    },
    f"{OCI}.Pull": {
        "handle": "int",
        "image": "string",
        "name": "?string",
        "local_fetch": "string",
        "storage_root": "?string",
        "bootable": "bool",
    },
    f"{OCI}.OciMount": {
        "handle": "int",
        "image": "string",
        "bootable": "bool",
        "options": "MountParams",
    },
}

STREAMING = {f"{OCI}.Pull"}

_U64_MAX = (1 << 64) - 1


def _check_value(value: Any, typ: str) -> bool:
    if typ.startswith("?"):
        return value is None or _check_value(value, typ[1:])
    if typ == "int":
        return type(value) is int and 0 <= value <= _U64_MAX
    if typ == "bool":
        return type(value) is bool
    if typ == "string":
        return type(value) is str
    if typ == "[]string":
        return type(value) is list and all(type(v) is str for v in value)
    if typ == "MountParams":
        return type(value) is dict and all(
            _check_value(value.get(k), t) for k, t in _MOUNT_PARAMS.items()
        )
    raise AssertionError(typ)


def validate_parameters(method: str, params: dict[str, Any]) -> dict[str, Any] | str:
    """The parameters with absent optionals filled in as None, or the name
    of the first missing/mistyped one. Unknown parameters are ignored (as
    serde does for the reference)."""
    out: dict[str, Any] = {}
    for name, typ in SIGNATURES[method].items():
        value = params.get(name)
        if name not in params and not typ.startswith("?"):
            return name
        if not _check_value(value, typ):
            return name
        out[name] = value
    return out


# -- calls and handles ----------------------------------------------------------


@dataclass(eq=False)
class Call:
    """One method call as the transport hands it over."""

    method: str
    params: dict[str, Any]
    fds: list[int] = field(default_factory=list)  # received; the handler owns them
    more: bool = False
    cancelled: threading.Event = field(default_factory=threading.Event)

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


@dataclass
class _Handle:
    repo: Any  # composefs.repository.Repository (imported lazily)
    users: int = 0
    closed: bool = False


class _Cancelled(Exception):
    """Raised from the pull's progress callback when the client went away."""


def _err(interface: str, name: str, **params: Any) -> VarlinkCallError:
    return VarlinkCallError(f"{interface}.{name}", params)


def _msg(e: BaseException) -> str:
    return str(e) or type(e).__name__


class Service:
    """The handle table and the handlers. Handles are process-wide: valid
    on every connection until ``CloseRepository`` (as the reference)."""

    def __init__(
        self,
        *,
        insecure: bool = False,
        require_verity: bool = False,
        no_upgrade: bool = False,
        workers: int = 16,
    ) -> None:
        self.insecure = insecure
        self.require_verity = require_verity
        self.no_upgrade = no_upgrade
        self._handles: dict[int, _Handle] = {}
        self._next_handle = 0
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="varlink")
        self._closing = threading.Event()
        self._handlers: dict[str, Callable[[Call], Awaitable[Any]]] = {
            f"{REPO}.InitRepository": self.init_repository,
            f"{REPO}.EnsureRepository": self.ensure_repository,
            f"{REPO}.OpenRepository": self.open_repository,
            f"{REPO}.CloseRepository": self.close_repository,
            f"{REPO}.Fsck": self.fsck,
            f"{REPO}.Gc": self.gc,
            f"{REPO}.ImageObjects": self.image_objects,
            f"{REPO}.ListImageRefs": self.list_image_refs,
            f"{REPO}.Mount": self.mount,
            f"{OCI}.ListImages": self.list_images,
            f"{OCI}.Check": self.check,
            f"{OCI}.Inspect": self.inspect,
            f"{OCI}.Tag": self.tag,
            f"{OCI}.Untag": self.untag,
            f"{OCI}.ComputeId": self.compute_id,
            f"{OCI}.OciMount": self.oci_mount,
        }

    def close(self) -> None:
        self._closing.set()  # running pulls stop at their next progress report
        self._pool.shutdown(wait=True, cancel_futures=True)
        for h in self._handles.values():
            h.repo.close()
        self._handles.clear()

    # -- dispatch -------------------------------------------------------------
    async def call(self, call: Call) -> tuple[Reply, list[int]]:
        """Run a non-streaming method: (reply parameters, fds to send)."""
        try:
            result = await self._handlers[call.method](call)
        except VarlinkCallError:
            raise
        except Exception as e:
            raise self._internal(call.method, e) from None
        finally:
            call.close_fds()
        if isinstance(result, tuple):
            return result
        return result, []

    def stream(self, call: Call) -> AsyncIterator[Reply]:
        """Run a streaming method (``Pull``)."""
        return self.pull(call)

    def _internal(self, method: str, e: BaseException) -> VarlinkCallError:
        if not isinstance(e, (ComposefsError, OSError, _Cancelled)):
            _log.error("%s failed", method, exc_info=e)
        interface = method.rpartition(".")[0]
        return _err(interface, "InternalError", message=_msg(e))

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @contextlib.contextmanager
    def _use(self, handle: int, interface: str) -> Iterator[Any]:
        """The handle's repository, kept open while in use (a concurrent
        ``CloseRepository`` closes it after the last user)."""
        h = self._handles.get(handle)
        if h is None:
            raise _err(interface, "InvalidHandle", handle=handle)
        h.users += 1
        try:
            yield h.repo
        finally:
            h.users -= 1
            if h.closed and h.users == 0:
                h.repo.close()

    # -- org.composefs.Repository -------------------------------------------
    async def init_repository(self, call: Call) -> Reply:
        from ..repository import Repository, algorithm_from_string

        p = call.params
        algorithm = p["algorithm"] or "fsverity-sha512-12"
        try:
            algorithm = algorithm_from_string(algorithm)
        except ComposefsError as e:
            raise _err(REPO, "InvalidSpec", message=f"invalid algorithm: {_msg(e)}") from None
        insecure = self.insecure if p["insecure"] is None else p["insecure"]

        def work() -> bool:
            path = p["path"]
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, exist_ok=True)
            repo, created = Repository.init(path, algorithm=algorithm, insecure=insecure)
            repo.close()
            return created

        return {"created": await self._run(work)}

    async def ensure_repository(self, call: Call) -> Reply:
        """Open as-is (``Opened``), upgrade a legacy repository in place
        (``Upgraded``) or create one (``Created``); unlike InitRepository
        an existing repository's configuration is never an error."""
        from ..repository import REPO_METADATA_FILENAME, Repository, algorithm_from_string

        p = call.params
        try:
            algorithm = algorithm_from_string(p["algorithm"] or "fsverity-sha512-12")
        except ComposefsError as e:
            raise _err(REPO, "InvalidSpec", message=f"invalid algorithm: {_msg(e)}") from None
        insecure = self.insecure if p["insecure"] is None else p["insecure"]
        path = p["path"]

        def work() -> str:
            if os.path.exists(os.path.join(path, REPO_METADATA_FILENAME)):
                status = "Opened"
            elif os.path.isdir(os.path.join(path, "objects")):
                status = "Upgraded"
            else:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                repo, _created = Repository.init(path, algorithm=algorithm, insecure=insecure)
                repo.close()
                return "Created"
            Repository.open(path, upgrade=True, insecure=insecure).close()
            return status

        return {"status": await self._run(work)}

    async def open_repository(self, call: Call) -> Reply:
        from ..repository import Repository, system_path, user_path

        p = call.params
        selected = [k for k in ("path", "user", "system") if p[k] not in (None, False)]
        if len(selected) != 1:
            raise _err(
                REPO, "InvalidSpec", message="exactly one of `path`, `user`, `system` must be set"
            )
        path = p["path"] if selected[0] == "path" else (
            user_path() if selected[0] == "user" else system_path()
        )  # fmt: skip

        def work() -> tuple[Any, int | None]:
            repo = Repository.open(
                path,
                upgrade=not self.no_upgrade,
                insecure=self.insecure,
                require_verity=self.require_verity,
            )
            try:
                dev: int | None = os.stat(repo.objects_dir).st_dev
            except OSError:
                dev = None
            return repo, dev

        try:
            repo, dev = await self._run(work)
        except (ComposefsError, OSError) as e:
            raise _err(REPO, "RepoNotFound", message=_msg(e)) from None
        self._next_handle += 1
        self._handles[self._next_handle] = _Handle(repo)
        reply: Reply = {"handle": self._next_handle, "hash_algorithm": repo.algorithm}
        if dev is not None:
            reply["objects_device_id"] = dev
        return reply

    async def close_repository(self, call: Call) -> Reply:
        handle = call.params["handle"]
        h = self._handles.pop(handle, None)
        if h is None:
            raise _err(REPO, "InvalidHandle", handle=handle)
        h.closed = True
        if h.users == 0:
            h.repo.close()
        return {}

    async def fsck(self, call: Call) -> Reply:
        p = call.params
        with self._use(p["handle"], REPO) as repo:
            result = await self._run(lambda: repo.fsck(metadata_only=bool(p["metadata_only"])))
        reply: Reply = result.to_reply()
        return reply

    async def gc(self, call: Call) -> Reply:
        p = call.params
        with self._use(p["handle"], REPO) as repo:
            # wait=False: another open handle on the same repository holds a
            # shared lock; say so instead of blocking this worker forever.
            result = await self._run(lambda: repo.gc(p["roots"], dry_run=p["dry_run"], wait=False))
        return {"result": result.to_reply(), "dry_run": p["dry_run"]}

    async def image_objects(self, call: Call) -> Reply:
        p = call.params
        with self._use(p["handle"], REPO) as repo:
            try:
                objects = await self._run(repo.objects_for_image, p["name"])
            except NotFoundError:
                raise _err(REPO, "NoSuchRef", reference=p["name"]) from None
        return {"object_ids": sorted(repo.to_id(o) for o in objects)}

    async def list_image_refs(self, call: Call) -> Reply:
        with self._use(call.params["handle"], REPO) as repo:
            top = os.path.join(repo.path, "images", "refs")

            def work() -> list[dict[str, str]]:
                out = []
                # A ref is a symlink to ../../<id> (a file, so never in dirnames).
                for dirpath, dirnames, filenames in os.walk(top):
                    dirnames.sort()
                    for name in sorted(filenames):
                        full = os.path.join(dirpath, name)
                        if os.path.islink(full):
                            target = os.readlink(full).rstrip("/")
                            out.append(
                                {
                                    "name": os.path.relpath(full, top),
                                    "digest": target.rsplit("/", 1)[-1],
                                }
                            )
                return out

            return {"images": await self._run(work)}

    def _mount_fd(self, repo: Any, name: str, options: dict[str, Any], fds: list[int]) -> int:
        """A detached mount of image `name`; `fds` are (upperdir, workdir)
        when ``options.overlay``."""
        from ..mount import composefs_fsmount

        overlay = bool(options.get("overlay"))
        expected = 2 if overlay else 0
        if len(fds) != expected:
            raise ComposefsError(
                f"Mount expects {expected} fds for the requested options, got {len(fds)}"
            )
        upper = work = None
        if overlay:
            # The kernel resolves these magic links to the client's directories.
            upper, work = (f"/proc/self/fd/{fd}" for fd in fds)
        image_fd, verity = repo.open_image(name)
        try:
            return composefs_fsmount(
                image_fd, [repo.objects_dir], verity=verity, upperdir=upper, workdir=work,
                readonly=not options.get("read_write"),
            )  # fmt: skip
        finally:
            os.close(image_fd)

    async def mount(self, call: Call) -> tuple[Reply, list[int]]:
        p = call.params
        fds = call.fds
        if len(fds) != (2 if p["options"].get("overlay") else 0):
            raise _err(
                REPO, "InvalidSpec",
                message=f"Mount expects {2 if p['options'].get('overlay') else 0} fds "
                f"for the requested options, got {len(fds)}",
            )  # fmt: skip
        with self._use(p["handle"], REPO) as repo:
            try:
                fd = await self._run(self._mount_fd, repo, p["name"], p["options"], fds)
            except NotFoundError:
                raise _err(REPO, "NoSuchRef", reference=p["name"]) from None
        return {"fd_index": 0}, [fd]

    # -- org.composefs.Oci ------------------------------------------------------
    async def list_images(self, call: Call) -> Reply:
        from ..oci import storage

        p = call.params
        with self._use(p["handle"], OCI) as repo:
            images = await self._run(storage.list_images, repo)
        needle = p["filter"]
        return {"images": [i.to_json() for i in images if needle is None or needle in i.name]}

    async def check(self, call: Call) -> Reply:
        from ..oci import storage

        p = call.params
        with self._use(p["handle"], OCI) as repo:
            result = await self._run(storage.oci_fsck, repo, p["image"])
        reply: Reply = result.to_json()
        return reply

    @staticmethod
    def _image_ref(image: str) -> str:
        # composefs-rs: a bare digest names a manifest.
        if image.startswith(("sha256:", "sha512:")):
            return "@" + image
        return image

    async def inspect(self, call: Call) -> Reply:
        from ..oci import storage

        p = call.params
        with self._use(p["handle"], OCI) as repo:

            def work() -> Reply:
                img = storage.open_image_ref(repo, self._image_ref(p["image"]))
                return storage.inspect_json(repo, img)

            try:
                return await self._run(work)
            except NotFoundError:
                raise _err(OCI, "NoSuchImage", image=p["image"]) from None

    async def tag(self, call: Call) -> Reply:
        from ..oci import storage

        p = call.params
        with self._use(p["handle"], OCI) as repo:
            digest = p["manifest_digest"].removeprefix("@")
            await self._run(storage.tag_image, repo, digest, p["name"])
        return {}

    async def untag(self, call: Call) -> Reply:
        from ..oci import storage

        p = call.params
        with self._use(p["handle"], OCI) as repo:
            await self._run(storage.untag_image, repo, p["name"])
        return {}

    async def compute_id(self, call: Call) -> Reply:
        from .. import fsverity
        from ..erofs.format import FormatVersion
        from ..erofs.writer import mkfs_buffer
        from ..oci import storage

        p = call.params
        with self._use(p["handle"], OCI) as repo:

            def work() -> str:
                root = storage.resolve_tree(repo, self._image_ref(p["image"]), p["verity"])
                if p["bootable"]:
                    _boot_transform(repo)(root)
                image = mkfs_buffer(root, FormatVersion(repo.erofs_version))
                return fsverity.digest_hex(image, repo.algorithm)

            try:
                return {"image_id": await self._run(work)}
            except NotFoundError:
                raise _err(OCI, "NoSuchImage", image=p["image"]) from None

    async def oci_mount(self, call: Call) -> tuple[Reply, list[int]]:
        from ..oci import storage

        p = call.params
        with self._use(p["handle"], OCI) as repo:

            def resolve() -> str:
                img = storage.open_image_ref(repo, self._image_ref(p["image"]))
                version = repo.erofs_version
                image_id = img.boot_image_id(version) if p["bootable"] else img.image_id(version)
                if image_id is None:
                    kind = "boot EROFS" if p["bootable"] else "composefs EROFS"
                    raise ComposefsError(f"No {kind} image linked")
                return image_id

            try:
                image_id = await self._run(resolve)
            except NotFoundError:
                raise _err(OCI, "NoSuchImage", image=p["image"]) from None
            fd = await self._run(self._mount_fd, repo, image_id, p["options"], call.fds)
        return {"fd_index": 0}, [fd]

    async def pull(self, call: Call) -> AsyncIterator[Reply]:
        """Progress frames (only when the client asked for ``more``), then the
        ``completed`` frame. The pull runs in a worker thread; its progress
        callback feeds an asyncio queue and raises once the client is gone,
        which aborts the pull before anything is tagged."""
        from ..oci import storage

        p = call.params
        if p["local_fetch"] in ("zerocopy", "zero-copy"):
            raise _err(OCI, "InternalError", message="local_fetch zerocopy is not supported")
        if p["storage_root"] is not None:
            raise _err(OCI, "InternalError", message="storage_root is not supported")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        last_progress: dict[str, float] = {}
        # Set when the client goes away: wakes the pull's downloads even
        # while the registry sends nothing (no progress callback then).
        stop = storage.PullStop()

        def progress(ev: Any) -> None:
            if call.cancelled.is_set() or self._closing.is_set():
                raise _Cancelled("pull cancelled (client disconnected or service stopping)")
            if not call.more:
                return
            frame = _progress_frame(ev, last_progress)
            if frame is not None:
                loop.call_soon_threadsafe(queue.put_nowait, frame)

        with self._use(p["handle"], OCI) as repo:

            def work() -> Reply:
                # As the reference: no `name`, no tag (the CLI tags with the image).
                boot = _boot_transform(repo) if p["bootable"] else None
                # the boot image is committed before the tag: a failed
                # --bootable pull tags nothing
                result = storage.pull(
                    repo, p["image"], p["name"], progress=progress, boot=boot, stop=stop
                )
                boot_image = result.boot_image_ids.get(repo.erofs_version) if boot else None
                return {
                    "manifest_digest": result.manifest_digest,
                    "config_digest": result.config_digest,
                    "manifest_verity": result.manifest_verity,
                    "config_verity": result.config_verity,
                    "stats": str(result.stats),
                    "boot_image": boot_image,
                    "boot_image_mode": None,
                    "boot_image_format_version": (
                        f"V{repo.erofs_version}" if boot_image is not None else None
                    ),
                }

            task = loop.run_in_executor(self._pool, work)
            try:
                while not task.done() or not queue.empty():
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait(
                        {getter, task}, timeout=_CANCEL_POLL, return_when=asyncio.FIRST_COMPLETED
                    )
                    if call.cancelled.is_set() or self._closing.is_set():
                        stop.set()
                    if getter.done():
                        yield getter.result()
                    else:
                        getter.cancel()
                try:
                    completed = task.result()
                except VarlinkCallError:
                    raise
                except Exception as e:
                    raise self._internal(call.method, e) from None
                yield {"completed": completed}
            finally:
                # Client gone (generator closed early): stop the pull and wait
                # for it, so the handle stays open until it has unwound.
                if not task.done():
                    call.cancelled.set()
                    stop.set()
                    with contextlib.suppress(BaseException):
                        await task


def _boot_transform(repo: Any) -> Callable[[Any], None]:
    from .. import boot

    def transform(root: Any) -> None:
        boot.transform_for_boot(root, repo=repo)

    return transform


_PROGRESS_INTERVAL = 0.1  # seconds between progress frames of one component
# How often a running Pull looks whether its client went away (the server's
# own hang-up check runs every 0.2 s).
_CANCEL_POLL = 0.2


def _progress_frame(ev: Any, last: dict[str, float]) -> Reply | None:
    """A library `ProgressEvent` as a `PullProgress` frame (progress
    throttled per component; a pull reads in small chunks)."""
    if ev.kind == "started":
        return {"started": {"id": ev.id, "total": ev.total, "unit": "Bytes"}}
    if ev.kind == "progress":
        now = time.monotonic()
        if now - last.get(ev.id, 0.0) < _PROGRESS_INTERVAL and ev.fetched != ev.total:
            return None
        last[ev.id] = now
        return {"progress": {"id": ev.id, "fetched": ev.fetched, "total": ev.total}}
    if ev.kind == "skipped":
        return {"skipped": {"id": ev.id}}
    if ev.kind == "done":
        return {"done": {"id": ev.id, "transferred": ev.fetched}}
    return {"message": ev.message or ev.kind}
