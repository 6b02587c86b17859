"""OCI images in a repository: the names this module always had.

The work is done in three modules, one job each; import from them in new
code:

- `composefs.oci.pull`: the pull pipeline (fetch, verify, import, commit);
- `composefs.oci.stored`: the stored-image model (stream names and tags,
  open, list, tag, untag, inspect, layers, trees) and the on-disk layout;
- `composefs.oci.fsck`: OCI fsck.

This module re-exports their public names so ``storage.pull``,
``storage.list_images``, ``storage.open_image_ref``… keep working.
"""

from __future__ import annotations

from .fsck import (
    OciFsckResult,
    oci_fsck,
)
from .pull import (
    ImportStats,
    PullResult,
    PullStop,
    commit_boot_images,
    commit_image_refs,
    human_bytes,
    import_layer,
    pull,
    pull_from_source,
)
from .stored import (
    BOOT_IMAGE_REF_KEYS,
    IMAGE_REF_KEYS,
    OCI_REF_PREFIX,
    REFERRER_REF_PREFIX,
    ImageInfo,
    OciImage,
    build_tree,
    config_stream,
    config_tree,
    decode_tag,
    encode_tag,
    image_tree,
    inspect_json,
    iter_images,
    layer_dumpfile,
    layer_info,
    layer_members,
    layer_stream,
    layer_tar,
    list_images,
    list_referrers,
    list_tags,
    manifest_stream,
    member_dump_line,
    open_image,
    open_image_ref,
    resolve_tag,
    resolve_tree,
    tag_image,
    tag_ref,
    untag_image,
    validate_tag,
)

__all__ = [
    "BOOT_IMAGE_REF_KEYS",
    "IMAGE_REF_KEYS",
    "OCI_REF_PREFIX",
    "REFERRER_REF_PREFIX",
    "ImageInfo",
    "ImportStats",
    "OciFsckResult",
    "OciImage",
    "PullResult",
    "PullStop",
    "build_tree",
    "commit_boot_images",
    "commit_image_refs",
    "config_stream",
    "config_tree",
    "decode_tag",
    "encode_tag",
    "human_bytes",
    "image_tree",
    "import_layer",
    "inspect_json",
    "iter_images",
    "layer_dumpfile",
    "layer_info",
    "layer_members",
    "layer_stream",
    "layer_tar",
    "list_images",
    "list_referrers",
    "list_tags",
    "manifest_stream",
    "member_dump_line",
    "oci_fsck",
    "open_image",
    "open_image_ref",
    "pull",
    "pull_from_source",
    "resolve_tag",
    "resolve_tree",
    "tag_image",
    "tag_ref",
    "untag_image",
    "validate_tag",
]
