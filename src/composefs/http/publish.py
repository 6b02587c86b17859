"""`publish`: write a self-contained static tree of some refs of a
repository, ready for a web server, CDN or object store (what
composefs-rs's ``examples/s3-uploader.py`` uploads, minus everything the
refs do not need).

The tree has the repository layout that `fetch` reads:
``objects/XX/REST`` (hardlinked from the repository when on the same
filesystem, else copied), ``streams/<content id>``, ``images/<id>`` and
the refs (``streams/refs/…``, ``images/refs/…``) as relative symlinks —
or, with ``link_files``, as small regular files holding the symlink target,
for stores that cannot keep symlinks (serve them as
``text/x-symlink-target``). Never written: ``meta.json``, objects no
published ref reaches, anything else of the repository.

Publishing again into the same directory adds what is missing; objects
appear atomically (link or rename), names after the objects they reach.
"""

from __future__ import annotations

import errno
import os
import posixpath
import secrets
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._atomic import replacing
from ..errors import HttpError, NotFoundError, RepositoryError
from . import _repo, core

if TYPE_CHECKING:
    from ..repository import Repository


@dataclass
class PublishResult:
    dest: str
    objects_written: int = 0
    objects_present: int = 0
    bytes_written: int = 0
    streams: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)


def _list_links(root: str, prefix: str) -> list[str]:
    """Relative paths (``prefix/…``) of the symlinks below ``root/prefix``."""
    out = []
    top = os.path.join(root, prefix)
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in sorted(
            filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        ):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                out.append(os.path.relpath(full, root))
    return sorted(set(out))


def _link_target(repo: Repository, relpath: str) -> str:
    """Where repository symlink `relpath` points, as a repository path."""
    try:
        target = os.readlink(relpath, dir_fd=repo.fileno())
    except FileNotFoundError:
        raise NotFoundError(f"{relpath} not found") from None
    except OSError as e:
        if e.errno == errno.EINVAL:
            raise HttpError(f"{relpath} is not a symlink") from None
        raise
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(relpath), target))
    if joined.startswith("../") or joined.startswith("/"):
        raise HttpError(f"{relpath} points outside the repository")
    return joined


def _object_of(target: str, algorithm: str, what: str) -> str:
    """The object id of repository path ``objects/XX/REST``."""
    parts = target.split("/")
    if len(parts) != 3 or parts[0] != "objects" or len(parts[1]) != 2:
        raise HttpError(f"{what} does not lead to an object")
    return core.check_object_id(parts[1] + parts[2], algorithm)


def _rel(from_path: str, to_path: str) -> str:
    return posixpath.relpath(to_path, posixpath.dirname(from_path))


class _Tree:
    """The destination directory: atomic object files and links."""

    def __init__(self, repo: Repository, dest: str, link_files: bool) -> None:
        self.repo = repo
        self.dest = os.path.abspath(dest)
        self.link_files = link_files
        self._can_link = True
        os.makedirs(self.dest, 0o755, exist_ok=True)
        if os.path.exists(os.path.join(self.dest, "meta.json")):
            raise HttpError(f"{dest} is a repository, not a publish directory")

    def _mkparent(self, relpath: str) -> str:
        path = os.path.join(self.dest, relpath)
        os.makedirs(os.path.dirname(path), 0o755, exist_ok=True)
        return path

    def put_object(self, object_id: str, result: PublishResult) -> None:
        relpath = f"objects/{self.repo.object_relpath(object_id)}"
        path = self._mkparent(relpath)
        if os.path.lexists(path):
            result.objects_present += 1
            return
        src = os.path.join(self.repo.objects_dir, self.repo.object_relpath(object_id))
        st = os.stat(src)
        if not stat.S_ISREG(st.st_mode):  # never publish a FIFO or device
            raise RepositoryError(f"object {object_id} is not a regular file")
        size = st.st_size
        if self._can_link:
            try:
                os.link(src, path)
            except FileExistsError:
                result.objects_present += 1
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES):
                    raise
                self._can_link = False
            else:
                result.objects_written += 1
                result.bytes_written += size
                return
        with self.repo.open_object_file(object_id) as fsrc, replacing(path, mode=0o644) as fdst:
            shutil.copyfileobj(fsrc, fdst, 1 << 20)
        result.objects_written += 1
        result.bytes_written += size

    def put_link(self, relpath: str, target_relpath: str) -> None:
        """``relpath`` → ``target_relpath`` (both tree paths), atomically replaced."""
        core.check_relpath(relpath, "path")
        path = self._mkparent(relpath)
        target = _rel(relpath, target_relpath)
        if self.link_files:
            with replacing(path, mode=0o644) as f:
                f.write(os.fsencode(target))
            return
        tmp = f"{os.path.dirname(path)}/.tmp-{secrets.token_hex(6)}"
        try:
            os.symlink(target, tmp)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise


def publish(
    repo: Repository,
    dest: str,
    names: Sequence[str] = (),
    *,
    images: Sequence[str] = (),
    link_files: bool = False,
) -> PublishResult:
    """Publish streams `names` (content ids like ``oci-config-sha256:…`` or
    ``refs/…``, e.g. ``refs/oci/latest``) and images `images` (image ids or
    ``refs/…``) with everything they reference into directory `dest`. With
    neither, every stream ref and image ref of the repository is published."""
    if not names and not images:
        names = [p[len("streams/") :] for p in _list_links(repo.path, "streams/refs")]
        images = [p[len("images/") :] for p in _list_links(repo.path, "images/refs")]
        if not names and not images:
            raise NotFoundError("the repository has no refs to publish (name streams or images)")
    result = PublishResult(os.path.abspath(dest))
    alg = repo.algorithm

    # Names → object ids (and the link chains that lead there).
    links: dict[str, str] = {}  # tree path → tree path it points at
    stream_ids: dict[str, str | None] = {}  # object id → content id (if named)
    image_ids: set[str] = set()
    for name in names:
        core.check_relpath(name, "stream name")
        path = f"streams/{name}"
        for _ in range(core.MAX_LINK_HOPS):
            target = _link_target(repo, path)
            links[path] = target
            if not target.startswith("streams/"):
                break
            path = target
        stream_id = _object_of(target, alg, f"streams/{name}")
        content_id = path[len("streams/") :]
        stream_ids[stream_id] = None if "/" in content_id else content_id
        if name.startswith("refs/"):
            result.refs.append(name)
    for name in images:
        core.check_relpath(name, "image name")
        path = f"images/{name}"
        target = _link_target(repo, path)
        links[path] = target
        if target.startswith("images/"):
            links[target] = _link_target(repo, target)
            target = links[target]
        image_ids.add(_object_of(target, alg, f"images/{name}"))

    # The closure: streams through digest-keyed named refs, images, objects.
    objects: set[str] = set()
    todo = list(stream_ids)
    seen = set(todo)
    while todo:
        oid = todo.pop()
        _, object_refs, named = _repo.stream_refs(repo, oid)
        objects.update(object_refs)
        for key, ref_id in named.items():
            objects.add(ref_id)
            if core.is_image_key(key):
                image_ids.add(ref_id)
                continue
            digest = core.key_digest(key)
            if digest is None or ref_id in seen:
                continue
            seen.add(ref_id)
            todo.append(ref_id)
            child_type, _, _ = _repo.stream_refs(repo, ref_id)
            cid = core.content_id_for(child_type, f"{digest[0]}:{digest[1]}")
            if cid is not None and repo.has_stream(cid) == ref_id:
                stream_ids.setdefault(ref_id, cid)
                links[f"streams/{cid}"] = f"objects/{repo.object_relpath(ref_id)}"
    objects |= seen
    for image_id in sorted(image_ids):
        if not repo.has_object(image_id):
            raise NotFoundError(f"image {image_id} not found")
        objects.add(image_id)
        objects.update(_repo.image_objects(repo, image_id))
        links[f"images/{image_id}"] = f"objects/{repo.object_relpath(image_id)}"

    # Nothing is written before every name resolved.
    tree = _Tree(repo, dest, link_files)
    for object_id in sorted(objects):
        if not repo.has_object(object_id):
            raise NotFoundError(f"object {object_id} not found (run fsck)")
        tree.put_object(object_id, result)
    # Content names first, refs last: a ref never points at nothing.
    for path in sorted(links, key=lambda p: ("/refs/" in f"/{p}", p)):
        tree.put_link(path, links[path])
    result.streams = sorted(p[len("streams/") :] for p in links if p.startswith("streams/"))
    result.images = sorted(image_ids)
    return result
