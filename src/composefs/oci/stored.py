"""The stored-image model: OCI images in a composefs repository (composefs-rs 0.7.0 layout).

Stream names and tags, opening an image by digest / tag / reference,
listing, tagging and untagging, `inspect`, reading layers back (members,
tar, dumpfile) and building the merged filesystem tree of an image. The
pull pipeline (`composefs.oci.pull`) writes what this module reads; OCI
fsck is `composefs.oci.fsck`.

Streams (all splitstreams, see `composefs.splitstream`):

- ``oci-layer-<diff_id>`` (content type ``ocilayer``): a layer tar split
  by `composefs.oci.tar` -- headers inline, file contents > 64 bytes as
  objects. Artifact blobs (non-tar layers of non-image manifests) are
  ``oci-layer-<digest>`` streams of type ``oci_blob`` holding one object.
- ``oci-config-<digest>`` (``ociconfg``): the raw config JSON as one object;
  named refs: every diff_id -> its layer stream, and the committed EROFS
  images ``composefs.image`` (V2), ``composefs.image.v1`` (V1) and, our
  extension for repositories that commit V0, ``composefs.image.v0``.
- ``oci-manifest-<digest>`` (``ocimanif``): the raw manifest JSON as one
  object; named refs ``config:<config digest>`` -> config stream and every
  diff_id -> its layer stream.
- tags: ``streams/refs/oci/<enc(tag)>`` -> the manifest stream, with
  ``%`` -> ``%25`` and ``/`` -> ``%2F``.

A pull writes layers first, then the images, then the config stream, then
the manifest stream, and tags last: a failure at any point leaves no tag
and no stream naming something incomplete (only unreferenced objects,
which ``gc`` removes).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from ..errors import DigestMismatch, NotFoundError, OciError
from ..splitstream import (
    CONTENT_OCI_CONFIG,
    CONTENT_OCI_LAYER,
    CONTENT_OCI_MANIFEST,
    ObjectRef,
    SplitStreamReader,
)
from ..tree import Directory
from . import tar as _tar
from .image import (
    MAX_JSON_SIZE,
    ImageManifest,
    digest_of,
    load_json,
    parse_digest,
    read_at_most,
)

if TYPE_CHECKING:
    from ..repository import Repository

OCI_REF_PREFIX = "oci/"
REFERRER_REF_PREFIX = "oci-referrers/"
IMAGE_REF_KEYS = {2: "composefs.image", 1: "composefs.image.v1", 0: "composefs.image.v0"}
BOOT_IMAGE_REF_KEYS = {2: "composefs.image.boot", 1: "composefs.image.boot.v1"}
ALL_IMAGE_REF_KEYS = frozenset(IMAGE_REF_KEYS.values()) | frozenset(BOOT_IMAGE_REF_KEYS.values())


# -- names ------------------------------------------------------------------


def layer_stream(diff_id: str) -> str:
    return f"oci-layer-{diff_id}"


def config_stream(digest: str) -> str:
    return f"oci-config-{digest}"


def manifest_stream(digest: str) -> str:
    return f"oci-manifest-{digest}"


def encode_tag(tag: str) -> str:
    return tag.replace("%", "%25").replace("/", "%2F")


def decode_tag(encoded: str) -> str:
    out = []
    i = 0
    while i < len(encoded):
        if encoded.startswith("%2F", i):
            out.append("/")
            i += 3
        elif encoded.startswith("%25", i):
            out.append("%")
            i += 3
        else:
            out.append(encoded[i])
            i += 1
    return "".join(out)


def validate_tag(tag: str) -> None:
    if not tag:
        raise OciError("tag names cannot be empty")
    if tag.startswith("@"):
        raise OciError(f"invalid tag {tag!r}: a leading '@' is reserved for digest references")
    if "\0" in tag or tag in (".", ".."):
        raise OciError(f"invalid tag {tag!r}")
    if len(encode_tag(tag)) > 255:
        raise OciError("tag is too long")


def tag_ref(tag: str) -> str:
    return OCI_REF_PREFIX + encode_tag(tag)


# -- reading stored data ------------------------------------------------------------


def read_json_stream(
    repo: Repository, content_id: str, verity: str | None, content_type: int
) -> tuple[bytes, dict[str, str]]:
    """The one external object of a manifest/config stream, and its named refs."""
    try:
        reader = repo.open_stream(content_id, verity, content_type)
    except NotFoundError:
        raise NotFoundError(f"stream {content_id} not found") from None
    with reader:
        refs = reader.object_refs
        if len(refs) != 1:
            raise OciError(f"{content_id}: expected exactly 1 external object, got {len(refs)}")
        named = dict(reader.named_refs)
    with repo.open_object_file(refs[0]) as f:
        data = read_at_most(f, MAX_JSON_SIZE + 1)
    if len(data) > MAX_JSON_SIZE:
        raise OciError(f"{content_id}: document is too large")
    return data, named


def config_diff_ids(raw: bytes, n_layers: int | None) -> tuple[dict[str, Any], list[str]]:
    config = load_json(raw, "image config")
    if not isinstance(config, dict):
        raise OciError("image config is not a JSON object")
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) for d in diff_ids):
        raise OciError("image config has no rootfs.diff_ids list")
    for d in diff_ids:
        parse_digest(d)
    if n_layers is not None and len(diff_ids) != n_layers:
        raise OciError(f"image config lists {len(diff_ids)} diff_ids for {n_layers} layers")
    return config, list(diff_ids)


@dataclass
class OciImage:
    """A stored image (or artifact): manifest, config and their refs."""

    manifest_digest: str
    manifest_verity: str
    manifest_raw: bytes
    manifest: ImageManifest
    config_digest: str
    config_verity: str
    config_raw: bytes
    config: dict[str, Any] | None
    layer_refs: dict[str, str] = field(default_factory=dict)
    image_refs: dict[str, str] = field(default_factory=dict)

    @property
    def is_container_image(self) -> bool:
        return self.manifest.is_container_image

    @property
    def diff_ids(self) -> list[str]:
        if self.config is None:
            return [d.digest for d in self.manifest.layers]
        return list(self.config["rootfs"]["diff_ids"])

    def _config_str(self, key: str) -> str:
        v = self.config.get(key) if self.config else None
        return v if isinstance(v, str) else ""

    @property
    def architecture(self) -> str:
        return self._config_str("architecture")

    @property
    def os(self) -> str:
        return self._config_str("os")

    @property
    def created(self) -> str | None:
        return self._config_str("created") or None

    def image_id(self, version: int) -> str | None:
        return self.image_refs.get(IMAGE_REF_KEYS[version])

    def boot_image_id(self, version: int) -> str | None:
        return self.image_refs.get(BOOT_IMAGE_REF_KEYS[2 if version == 2 else 1])


def open_image(repo: Repository, manifest_digest: str, verity: str | None = None) -> OciImage:
    """Open a stored image by manifest digest. Without `verity` the manifest
    and config are checked against their digests."""
    parse_digest(manifest_digest)
    mid = manifest_stream(manifest_digest)
    if verity is None:
        verity = repo.has_stream(mid)
        if verity is None:
            raise NotFoundError(f"OCI image not found: {manifest_digest}")
        check = True
    else:
        check = False
    raw, named = read_json_stream(repo, mid, verity, CONTENT_OCI_MANIFEST)
    if check and digest_of(raw, manifest_digest) != manifest_digest:
        raise DigestMismatch(f"manifest {manifest_digest}: stored content does not match")
    manifest = ImageManifest.parse(raw)
    config_digest = manifest.config.digest
    config_verity = named.get(f"config:{config_digest}")
    if config_verity is None:
        raise OciError(f"manifest {manifest_digest} has no config reference")
    config_raw, config_named = read_json_stream(
        repo, config_stream(config_digest), config_verity, CONTENT_OCI_CONFIG
    )
    if check and digest_of(config_raw, config_digest) != config_digest:
        raise DigestMismatch(f"config {config_digest}: stored content does not match")
    image_refs = {k: v for k, v in config_named.items() if k in ALL_IMAGE_REF_KEYS}
    config: dict[str, Any] | None = None
    if manifest.is_container_image:
        config, diff_ids = config_diff_ids(config_raw, None)
        layer_refs = {d: config_named[d] for d in diff_ids if d in config_named}
    else:
        wanted = {d.digest for d in manifest.layers}
        layer_refs = {k: v for k, v in named.items() if k in wanted}
    return OciImage(
        manifest_digest, verity, raw, manifest, config_digest, config_verity, config_raw, config,
        layer_refs, image_refs,
    )  # fmt: skip


def resolve_tag(repo: Repository, tag: str) -> tuple[str, str]:
    """(manifest digest, manifest stream verity) of a tag."""
    validate_tag(tag)
    ref = tag_ref(tag)
    try:
        target = os.readlink(f"streams/refs/{ref}", dir_fd=repo.fileno())
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"OCI reference not found: {tag}") from None
    part = target.rsplit("/", 1)[-1]
    if not part.startswith("oci-manifest-"):
        raise OciError(f"tag {tag} points at {part}, not a manifest")
    digest = part[len("oci-manifest-") :]
    parse_digest(digest)
    verity = repo.has_stream(manifest_stream(digest))
    if verity is None:
        raise NotFoundError(f"tag {tag}: manifest {digest} not found")
    return digest, verity


def list_tags(repo: Repository) -> list[tuple[str, str]]:
    """(tag, manifest digest) of every tag, sorted by encoded name."""
    out = []
    for name, target in repo.list_stream_refs("oci"):
        part = target.rsplit("/", 1)[-1]
        if not part.startswith("oci-manifest-"):
            continue
        digest = part[len("oci-manifest-") :]
        try:
            parse_digest(digest)
        except OciError:
            continue
        out.append((decode_tag(name), digest))
    return out


def _manifests_with_config(repo: Repository, config_digest: str) -> list[str]:
    found = []
    for _tag, digest in list_tags(repo):
        try:
            img = open_image(repo, digest)
        except (OciError, NotFoundError):
            continue
        if img.config_digest == config_digest and digest not in found:
            found.append(digest)
    return found


def open_image_ref(repo: Repository, ref: str) -> OciImage:
    """A tag, or ``@DIGEST`` naming either a manifest or a config digest.

    composefs-rs reads ``@D`` as a config digest in ``dump``/``compute-id``
    but as a manifest digest in ``inspect``; we accept both everywhere: a
    stored manifest with that digest wins, else the (single) tagged image
    whose config has it.
    """
    if not ref.startswith("@"):
        digest, verity = resolve_tag(repo, ref)
        return open_image(repo, digest, verity)
    digest = ref[1:]
    parse_digest(digest)
    if repo.has_stream(manifest_stream(digest)) is not None:
        return open_image(repo, digest)
    matches = _manifests_with_config(repo, digest)
    if len(matches) == 1:
        return open_image(repo, matches[0])
    if len(matches) > 1:
        raise OciError(f"config {digest} belongs to several images; name one by manifest digest")
    raise NotFoundError(f"OCI image not found: {digest}")


def list_referrers(repo: Repository, subject_digest: str) -> list[str]:
    prefix = REFERRER_REF_PREFIX + encode_tag(subject_digest)
    try:
        return [decode_tag(name) for name, _ in repo.list_stream_refs(prefix)]
    except OciError:
        return []


@dataclass
class ImageInfo:
    name: str
    manifest_digest: str
    is_container: bool
    architecture: str
    os: str
    created: str | None
    layer_count: int
    referrer_count: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def list_images(repo: Repository) -> list[ImageInfo]:
    """Every tagged image; unreadable ones are skipped (``oci fsck`` reports them)."""
    out = []
    for tag, digest in list_tags(repo):
        try:
            img = open_image(repo, digest)
        except (OciError, NotFoundError):
            continue
        out.append(
            ImageInfo(
                tag,
                digest,
                img.is_container_image,
                img.architecture,
                img.os,
                img.created,
                len(img.manifest.layers),
                len(list_referrers(repo, digest)),
            )
        )
    return out


def tag_image(repo: Repository, manifest_digest: str, tag: str) -> None:
    validate_tag(tag)
    parse_digest(manifest_digest)
    if repo.has_stream(manifest_stream(manifest_digest)) is None:
        raise NotFoundError(f"OCI image not found: {manifest_digest}")
    repo.name_stream(manifest_stream(manifest_digest), tag_ref(tag))


def untag_image(repo: Repository, tag: str) -> None:
    validate_tag(tag)
    if not repo.remove_stream_ref(tag_ref(tag)):
        raise NotFoundError(f"OCI reference not found: {tag}")


def inspect_json(repo: Repository, img: OciImage) -> dict[str, Any]:
    """``oci inspect`` output (composefs-rs ``OciInspectReply``)."""
    version = repo.erofs_version
    return {
        "manifest": img.manifest_raw.decode("utf-8", "replace"),
        "config": img.config_raw.decode("utf-8", "replace"),
        "referrers": list_referrers(repo, img.manifest_digest),
        "composefs_erofs": img.image_id(version),
        "composefs_boot_erofs": img.boot_image_id(version),
    }


# -- layers ----------------------------------------------------------------------


@contextmanager
def _layer_reader(
    repo: Repository, diff_id: str, verity: str | None = None
) -> Iterator[SplitStreamReader]:
    parse_digest(diff_id)
    content_id = layer_stream(diff_id)
    if verity is None:
        verity = repo.has_stream(content_id)
        if verity is None:
            raise NotFoundError(f"Layer {diff_id} not found")
    reader = repo.open_stream(content_id, verity, CONTENT_OCI_LAYER)
    try:
        yield reader
    finally:
        reader.close()


def _members(reader: SplitStreamReader) -> Iterator[_tar.TarMember]:
    def chunks() -> Iterator[bytes | _tar.External]:
        for c in reader.chunks():
            yield _tar.External(c.object_id) if isinstance(c, ObjectRef) else c

    return _tar.read_members(chunks())


def layer_members(
    repo: Repository, diff_id: str, verity: str | None = None
) -> Iterator[_tar.TarMember]:
    """The entries of a stored layer."""
    with _layer_reader(repo, diff_id, verity) as reader:
        yield from _members(reader)


def layer_tar(repo: Repository, diff_id: str, out: BinaryIO | IO[bytes]) -> int:
    """Write the reassembled layer tar (byte for byte the original)."""
    with _layer_reader(repo, diff_id) as reader:
        return reader.cat(out, repo.open_object_file)


def layer_info(repo: Repository, diff_id: str) -> dict[str, Any]:
    """``oci layer --json`` (composefs-rs ``LayerInfo``, camelCase)."""
    with _layer_reader(repo, diff_id) as reader:
        size = reader.total_size
        external_objects = len(reader.object_refs)
        entries = 0
        external_size = 0
        for m in _members(reader):
            entries += 1
            if m.external is not None:
                external_size += m.entry.size
        verity = repo.has_stream(layer_stream(diff_id))
    return {
        "diffId": diff_id,
        "verity": verity,
        "size": size,
        "entryCount": entries,
        "splitstream": {
            "externalObjects": external_objects,
            "externalSize": external_size,
            "inlineSize": size - external_size,
        },
    }


def _dump_path(path: bytes) -> bytes:
    parts = [p for p in path.split(b"/") if p and p != b"."]
    return b"/" + b"/".join(parts)


def member_dump_line(m: _tar.TarMember) -> bytes:
    """One composefs-rs-style dumpfile line for a single layer entry."""
    from ..dumpfile import escape

    e = m.entry
    path = escape(_dump_path(e.path))
    xattrs = b"".join(
        b" " + escape(k, escape_equal=True) + b"=" + escape(v, escape_equal=True)
        for k, v in sorted(e.xattrs.items())
    )
    mtime = b"%d.%d" % (e.mtime, e.mtime_nsec)
    mode = e.file_type | e.mode
    if e.kind == _tar.HARDLINK:
        return b"%s 0 @120000 - - - - 0.0 %s - -\n" % (path, escape(_dump_path(e.linkname)))
    size, rdev, payload, content, digest = 0, 0, b"-", b"-", b"-"
    if e.kind == _tar.REG:
        size = e.size
        if m.external is not None:
            payload = f"{m.external[:2]}/{m.external[2:]}".encode()
            digest = m.external.encode()
        elif m.data:
            content = escape(m.data)
    elif e.kind == _tar.SYMLINK:
        size = len(e.linkname)
        payload = escape(e.linkname)
    elif e.kind in (_tar.CHR, _tar.BLK):
        rdev = e.rdev
    return b"%s %d %o 1 %d %d %d %s %s %s %s%s\n" % (
        path, size, mode, e.uid, e.gid, rdev, mtime, payload, content, digest, xattrs,
    )  # fmt: skip


def layer_dumpfile(repo: Repository, diff_id: str, out: BinaryIO | IO[bytes]) -> None:
    for m in layer_members(repo, diff_id):
        out.write(member_dump_line(m))


# -- building the merged filesystem ------------------------------------------------


def _verified_members(repo: Repository, diff_id: str, verity: str) -> Iterator[_tar.TarMember]:
    """Layer members, after checking the reassembled layer against diff_id
    (for when the layer stream's id came from an unverified source)."""
    alg, _ = parse_digest(diff_id)
    h = hashlib.new(alg)

    class _Hasher:
        def write(self, data: bytes) -> int:
            h.update(data)
            return len(data)

    with _layer_reader(repo, diff_id, verity) as reader:
        reader.cat(_Hasher(), repo.open_object_file)  # type: ignore[arg-type]
    if f"{alg}:{h.hexdigest()}" != diff_id:
        raise DigestMismatch(f"layer {diff_id} has incorrect checksum")
    yield from layer_members(repo, diff_id, verity)


def build_tree(
    repo: Repository,
    diff_ids: list[str],
    layer_refs: dict[str, str],
    *,
    verify: bool = False,
    members: Mapping[str, Iterable[_tar.TarMember]] | None = None,
) -> Directory:
    """The merged, OCI-transformed filesystem of the layers (lowest first).

    `members` may give a layer's entries instead of reading its stream (a
    pull keeps them from the import it just did)."""
    from .layers import LayerMerger

    merger = LayerMerger()
    for diff_id in diff_ids:
        verity = layer_refs.get(diff_id)
        if verity is None:
            raise OciError(f"config has no reference to layer {diff_id}")
        kept = members.get(diff_id) if members is not None and not verify else None
        if kept is not None:
            merger.add_layer(kept)
            continue
        layer = (
            _verified_members(repo, diff_id, verity)
            if verify
            else layer_members(repo, diff_id, verity)
        )
        merger.add_layer(layer)
    return merger.finish()


def image_tree(repo: Repository, img: OciImage) -> Directory:
    if not img.is_container_image:
        raise OciError(f"{img.manifest_digest} is an artifact, not a container image")
    return build_tree(repo, img.diff_ids, img.layer_refs)


def config_tree(repo: Repository, config_digest: str, config_verity: str | None) -> Directory:
    """composefs-rs ``create_filesystem``: from a config digest; without its
    verity everything (config and layers) is re-hashed."""
    raw, named = read_json_stream(
        repo, config_stream(config_digest), config_verity, CONTENT_OCI_CONFIG
    )
    verify = config_verity is None
    if verify and digest_of(raw, config_digest) != config_digest:
        raise DigestMismatch(f"config {config_digest}: stored content does not match")
    _config, diff_ids = config_diff_ids(raw, None)
    return build_tree(repo, diff_ids, named, verify=verify)


def resolve_tree(repo: Repository, ref: str, verity: str | None = None) -> Directory:
    """The filesystem for ``oci dump``/``compute-id``: REF is a tag or @DIGEST
    (a manifest or config digest); `verity` is the config stream's id."""
    if ref.startswith("@") and verity is not None:
        return config_tree(repo, ref[1:], verity)
    if ref.startswith("@"):
        digest = ref[1:]
        parse_digest(digest)
        if repo.has_stream(manifest_stream(digest)) is None and repo.has_stream(
            config_stream(digest)
        ):
            return config_tree(repo, digest, None)
    return image_tree(repo, open_image_ref(repo, ref))


def iter_images(repo: Repository) -> Iterable[OciImage]:
    for _tag, digest in list_tags(repo):
        yield open_image(repo, digest)
