"""Walking what a splitstream or an EROFS image references (shared by fetch and publish)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import HttpError
from . import core

if TYPE_CHECKING:
    from ..repository import Repository

#: An EROFS image is read whole to list its objects.
MAX_IMAGE_SIZE = 1 << 30


def stream_refs(repo: Repository, object_id: str) -> tuple[int, list[str], dict[str, str]]:
    """(content type, object refs, named refs) of the splitstream `object_id`
    (only its header is read)."""
    with repo.open_stream("", verity=object_id) as reader:
        return reader.content_type, list(reader.object_refs), dict(reader.named_refs)


def image_objects(repo: Repository, image_id: str) -> list[str]:
    """Ids of the repository objects EROFS image `image_id` (an object) uses."""
    from ..erofs.reader import collect_objects

    fd = repo.open_object(image_id)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_IMAGE_SIZE:
            raise HttpError(f"image {image_id} is larger than {MAX_IMAGE_SIZE} bytes")
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    out = []
    for path in collect_objects(data):
        if len(path) > 3 and path[2] == "/":
            try:
                out.append(core.check_object_id(path.replace("/", "", 1), repo.algorithm))
            except HttpError:
                continue  # a backing path that is not one of ours
    return sorted(out)
