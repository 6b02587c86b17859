"""EROFS images: ``images/<id>`` and ``images/refs/<name…>``.

`ImageStore` commits trees as images (in every configured EROFS format),
imports image files, opens them with their digest verified, lists the
objects an image references, and mounts one (overlayfs over the image, with
``objects/`` as the data layer).
"""

from __future__ import annotations

import os
from typing import IO, Any, BinaryIO

from .. import fsverity
from ..errors import NotFoundError, RepositoryError
from ._fs import (
    HEX_LENGTHS,
    _check_relpath,
    _exists,
    _is_hex_id,
    _object_id_from_path,
    _open_regular,
)
from .meta import FormatConfig
from .objects import ObjectStore


class ImageStore:
    """The images of a repository, stored in `objects`; `formats` says
    which EROFS formats a commit writes."""

    def __init__(self, objects: ObjectStore, formats: FormatConfig) -> None:
        self.objects = objects
        self.formats = formats

    def format_config(self) -> FormatConfig:
        return self.formats

    def write_image(self, data: bytes | bytearray | memoryview, name: str | None = None) -> str:
        """Store an EROFS image, link ``images/<id>`` and optionally
        ``images/refs/<name>``; returns the image id. The image is not
        validated: only store images you built."""
        self.objects.ensure_writable()
        if name is not None:
            _check_relpath(name, "image name")
        object_id = self.objects.ensure_object(data)
        self._link_image(object_id, name)
        return object_id

    def link_image(self, object_id: str, name: str | None = None, *, synced: bool = False) -> None:
        """Name the stored image object `object_id` ``images/<id>`` (and
        ``images/refs/<name>``), after a sync unless `synced` (the caller
        ran `sync()` after storing it). The image is not validated."""
        self.objects.ensure_writable()
        if name is not None:
            _check_relpath(name, "image name")
        if not self.objects.has_object(object_id):
            raise NotFoundError(f"object {object_id} not found")
        self._link_image(object_id, name, synced)

    def _link_image(self, object_id: str, name: str | None, synced: bool = False) -> None:
        if not synced:
            self.objects.sync()
        self.objects.symlink(
            f"images/{object_id}", f"objects/{self.objects.object_relpath(object_id)}"
        )
        if name is not None:
            self.objects.symlink(f"images/refs/{name}", f"images/{object_id}")

    def import_image(self, source: BinaryIO | IO[bytes], name: str | None = None) -> str:
        """Store an image read from `source`; returns its id.

        The image is checked with the image reader first (as every reader of
        the repository will read it: fsck, gc, mount): anything it refuses
        (empty input, garbage, a corrupt or hostile image, one over 1 GiB) is
        an `ImageError` and nothing is stored."""
        from ..erofs.reader import MAX_IMAGE_SIZE, read_image
        from ..errors import ImageError

        self.objects.ensure_writable()
        if name is not None:
            _check_relpath(name, "image name")
        # An image is metadata only and read whole by every reader anyway.
        chunks: list[bytes] = []
        size = 0
        while chunk := source.read(1 << 20):
            size += len(chunk)
            if size > MAX_IMAGE_SIZE:
                raise ImageError(f"import-image: input larger than {MAX_IMAGE_SIZE} bytes")
            chunks.append(chunk)
        data = b"".join(chunks)
        del chunks
        try:
            read_image(data)
        except ImageError as e:
            raise ImageError(f"import-image: {e}") from None
        object_id = self.objects.ensure_object(data)
        self._link_image(object_id, name)
        return object_id

    def commit_images(self, root: Any, name: str | None = None) -> dict[int, str]:
        """Write the tree `root` (a `tree.Directory`) as an image in every
        configured format; `name` refs the default one. Returns {format: id}."""
        from ..erofs.format import FormatVersion
        from ..erofs.writer import mkfs_buffer

        self.objects.ensure_writable()
        if name is not None:
            _check_relpath(name, "image name")
        ids: dict[int, str] = {}
        for version in self.format_config().versions():
            ids[version] = self.objects.ensure_object(mkfs_buffer(root, FormatVersion(version)))
        self.objects.sync()
        for i, object_id in enumerate(ids.values()):
            self.objects.symlink(
                f"images/{object_id}", f"objects/{self.objects.object_relpath(object_id)}"
            )
            if i == 0 and name is not None:
                self.objects.symlink(f"images/refs/{name}", f"images/{object_id}")
        return ids

    def commit_image(self, root: Any, name: str | None = None) -> str:
        """`commit_images` and return the default format's id."""
        return self.commit_images(root, name)[self.format_config().default]

    def image_entry(self, name: str) -> str:
        """The ``images/`` entry `name` means, in every form the tools print
        or take: an image id as ``ALG:<hex>`` (create-image, import-image) or
        bare hex (compute-id), ``refs/NAME``, or a bare NAME that is a ref
        (as composefs-rs 0.8 resolves it). Other names are returned as given."""
        alg, sep, rest = name.partition(":")
        if sep and alg in HEX_LENGTHS:
            if alg != self.objects.algorithm:
                raise RepositoryError(
                    f"image {name}: this repository's ids are {self.objects.algorithm} digests"
                )
            if not _is_hex_id(rest, alg):
                raise RepositoryError(f"invalid image id {name!r}")
            return rest
        if (
            name
            and "/" not in name
            and "\0" not in name
            and not _is_hex_id(name, self.objects.algorithm)
            and _exists(self.objects.dirfd, f"images/refs/{name}")
        ):
            return f"refs/{name}"
        return name

    def image_id(self, name: str) -> str | None:
        """The object id of the image `name` names (any form of
        `image_entry`), or None when there is no such image."""
        entry = self.image_entry(name)
        _check_relpath(entry, "image name")
        return self.objects.resolve_id(f"images/{entry}")

    def open_image(self, name: str) -> tuple[int, bool]:
        """Open image `name` (any form of `image_entry`): an image id (its
        digest is verified — by the kernel in a secure repository, in
        userspace otherwise) or a ref (verified by the kernel against the id
        it leads to in a secure repository; not verified in an insecure one,
        as composefs-rs). Returns (fd, verity): whether overlayfs should
        require fs-verity on the image's files."""
        name = self.image_entry(name)
        _check_relpath(name, "image name")
        try:
            fd = _open_regular(f"images/{name}", self.objects.dirfd)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"image not found: {name}") from None
        try:
            if "/" in name:
                if not self.objects.insecure:
                    # a ref is no way around the digest check (composefs-rs
                    # skips it): the kernel must vouch for what it leads to
                    expected = self.objects.resolve_id(f"images/{name}")
                    measured = self.objects.measure(fd)
                    if measured is None:
                        raise RepositoryError(f"image {name} has no fs-verity")
                    if measured != expected:
                        raise RepositoryError(f"image {name}: fs-verity content mismatch")
                return fd, not self.objects.insecure
            if not _is_hex_id(name, self.objects.algorithm):
                raise RepositoryError(
                    f"invalid image name {name!r}: not a {self.objects.algorithm} id"
                )
            measured = self.objects.measure(fd)
            if measured is None:
                if not self.objects.insecure:
                    raise RepositoryError(f"image {name} has no fs-verity")
                measured = fsverity.digest_file(fd, self.objects.algorithm).hex()
            if measured != name:
                raise RepositoryError(f"image {name}: fs-verity content mismatch")
            return fd, not self.objects.insecure
        except BaseException:
            os.close(fd)
            raise

    def read_image(self, name: str) -> bytes:
        fd, _ = self.open_image(name)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def objects_for_image(self, name: str) -> list[str]:
        """Ids of the objects image `name` references (sorted)."""
        return self.image_objects(self.read_image(name))

    def image_objects(self, data: bytes) -> list[str]:
        """Sorted ids of the repository objects an image's files live in
        (backing paths that are not ``XX/<rest>`` ids are not ours)."""
        from ..erofs.reader import collect_objects

        out: set[str] = set()
        for path in collect_objects(data):
            object_id = _object_id_from_path(path, self.objects.algorithm)
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
        from ..mount import mount_composefs

        if (upperdir is None) != (workdir is None):
            raise RepositoryError("--upperdir and --workdir must be given together")
        fd, verity = self.open_image(name)
        try:
            mount_composefs(
                fd, mountpoint, [self.objects.objects_dir], verity=verity,
                upperdir=upperdir, workdir=workdir, readonly=not read_write,
            )  # fmt: skip
        finally:
            os.close(fd)
