"""OCI images stored in a composefs repository (composefs-rs 0.7.0 layout).

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

import functools
import hashlib
import io
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, BinaryIO, cast

from ..errors import DigestMismatch, NotFoundError, OciError
from ..splitstream import (
    CONTENT_OCI_BLOB,
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
    Descriptor,
    ImageManifest,
    ImageSource,
    Platform,
    ProgressCallback,
    ProgressEvent,
    digest_of,
    is_tar_layer,
    layer_compression,
    load_json,
    parse_digest,
    read_at_most,
    resolve_manifest,
)
from .transports import open_source

if TYPE_CHECKING:
    from ..repository import Repository

OCI_REF_PREFIX = "oci/"
REFERRER_REF_PREFIX = "oci-referrers/"
IMAGE_REF_KEYS = {2: "composefs.image", 1: "composefs.image.v1", 0: "composefs.image.v0"}
BOOT_IMAGE_REF_KEYS = {2: "composefs.image.boot", 1: "composefs.image.boot.v1"}
_ALL_IMAGE_KEYS = frozenset(IMAGE_REF_KEYS.values()) | frozenset(BOOT_IMAGE_REF_KEYS.values())
_BLOCK = 1 << 20


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
            f"{human_bytes(self.bytes_copied)} stored, {human_bytes(self.bytes_inlined)} inlined"
        )

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


# -- reading helpers ------------------------------------------------------------------


class _HashingReader(io.RawIOBase):
    """Counts, hashes and size-checks what is read through it; `on_eof`
    runs once when the source is exhausted (to verify before anything
    downstream gets named)."""

    def __init__(
        self,
        src: Any,
        algorithm: str | None,
        limit: int | None = None,
        on_read: Callable[[int], None] | None = None,
        what: str = "blob",
        on_eof: Callable[[_HashingReader], None] | None = None,
    ) -> None:
        super().__init__()
        self._src = src
        self._hash = hashlib.new(algorithm) if algorithm else None
        self.count = 0
        self._limit = limit
        self._on_read = on_read
        self._what = what
        self._on_eof = on_eof

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1, /) -> bytes:
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

    def hexdigest(self) -> str:
        assert self._hash is not None
        return self._hash.hexdigest()


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


class _LayerSink:
    """Feeds `split_tar` output into a repository splitstream writer."""

    def __init__(self, writer: Any, stats: ImportStats, repo: Repository) -> None:
        self.writer = writer
        self.stats = stats
        self.repo = repo

    def inline(self, data: bytes | bytearray | memoryview) -> None:
        self.writer.write_inline(data)

    def entry(self, entry: _tar.TarEntry) -> None:
        pass

    def external(self, entry: _tar.TarEntry, content: _tar.ContentReader) -> None:
        self.writer.write_external_stream(content, entry.size)
        self.stats.objects_copied += 1
        self.stats.bytes_copied += entry.size


def import_layer(
    repo: Repository,
    diff_id: str,
    source: BinaryIO | IO[bytes] | _tar.Readable,
    *,
    compression: str = "none",
    name: str | None = None,
    verify: bool = True,
) -> tuple[str, ImportStats]:
    """Import one layer tar (compressed as given) as ``oci-layer-<diff_id>``.

    Streams: the layer is never held in memory. The uncompressed content
    must hash to `diff_id` (unless `verify` is off); nothing is named when
    it does not. A layer already present is not read at all. Returns the
    stream's object id and what was stored.
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
    try:
        decompressed = _decompressor(source, compression)
        try:
            tar_in = _HashingReader(decompressed, alg if verify else None)
            _tar.split_tar(tar_in, _LayerSink(writer, stats, repo))
            tar_in.drain()
            # Whatever follows the compressed data must be read too (the
            # caller may verify the blob digest at its end).
            while source.read(_BLOCK):
                pass
        except _decompress_errors() as e:
            raise OciError(f"layer {diff_id}: corrupt {compression} data: {e}") from None
        finally:
            if decompressed is not source:
                decompressed.close()
        if verify:
            actual = f"{alg}:{tar_in.hexdigest()}"
            if actual != diff_id:
                raise DigestMismatch(f"layer diff_id mismatch: expected {diff_id}, got {actual}")
        stats.bytes_inlined = writer.inline_size
        stats.layers = 1
        verity = repo.write_stream(writer, content_id, name)
    except BaseException:
        writer.close()
        raise
    return verity, stats


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
        size_before = writer.external_size
        writer.write_external_stream(cast(Any, source))
        stats.objects_copied = 1
        stats.bytes_copied = writer.external_size - size_before
        stats.layers = 1
        verity = repo.write_stream(writer, content_id)
    except BaseException:
        writer.close()
        raise
    return verity, stats


# -- reading stored data ------------------------------------------------------------


def _read_json_stream(
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


def _write_json_stream(
    repo: Repository, content_type: int, raw: bytes, content_id: str, named: dict[str, str]
) -> str:
    writer = repo.create_stream(content_type)
    try:
        for key, value in named.items():
            writer.add_named_stream_ref(key, value)
        writer.write_external(raw)
        return repo.write_stream(writer, content_id)
    except BaseException:
        writer.close()
        raise


def _config_diff_ids(raw: bytes, n_layers: int | None) -> tuple[dict[str, Any], list[str]]:
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
    raw, named = _read_json_stream(repo, mid, verity, CONTENT_OCI_MANIFEST)
    if check and digest_of(raw, manifest_digest) != manifest_digest:
        raise DigestMismatch(f"manifest {manifest_digest}: stored content does not match")
    manifest = ImageManifest.parse(raw)
    config_digest = manifest.config.digest
    config_verity = named.get(f"config:{config_digest}")
    if config_verity is None:
        raise OciError(f"manifest {manifest_digest} has no config reference")
    config_raw, config_named = _read_json_stream(
        repo, config_stream(config_digest), config_verity, CONTENT_OCI_CONFIG
    )
    if check and digest_of(config_raw, config_digest) != config_digest:
        raise DigestMismatch(f"config {config_digest}: stored content does not match")
    image_refs = {k: v for k, v in config_named.items() if k in _ALL_IMAGE_KEYS}
    config: dict[str, Any] | None = None
    if manifest.is_container_image:
        config, diff_ids = _config_diff_ids(config_raw, None)
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
    repo: Repository, diff_ids: list[str], layer_refs: dict[str, str], *, verify: bool = False
) -> Directory:
    """The merged, OCI-transformed filesystem of the layers (lowest first)."""
    from .layers import LayerMerger

    merger = LayerMerger()
    for diff_id in diff_ids:
        verity = layer_refs.get(diff_id)
        if verity is None:
            raise OciError(f"config has no reference to layer {diff_id}")
        members = (
            _verified_members(repo, diff_id, verity)
            if verify
            else layer_members(repo, diff_id, verity)
        )
        merger.add_layer(members)
    return merger.finish()


def image_tree(repo: Repository, img: OciImage) -> Directory:
    if not img.is_container_image:
        raise OciError(f"{img.manifest_digest} is an artifact, not a container image")
    return build_tree(repo, img.diff_ids, img.layer_refs)


def config_tree(repo: Repository, config_digest: str, config_verity: str | None) -> Directory:
    """composefs-rs ``create_filesystem``: from a config digest; without its
    verity everything (config and layers) is re-hashed."""
    raw, named = _read_json_stream(
        repo, config_stream(config_digest), config_verity, CONTENT_OCI_CONFIG
    )
    verify = config_verity is None
    if verify and digest_of(raw, config_digest) != config_digest:
        raise DigestMismatch(f"config {config_digest}: stored content does not match")
    _config, diff_ids = _config_diff_ids(raw, None)
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

    @property
    def image_id(self) -> str | None:
        """The image in the repository's default format (None for artifacts)."""
        return next(iter(self.image_ids.values()), None)


def _report(progress: ProgressCallback | None, event: ProgressEvent) -> None:
    if progress is not None:
        progress(event)


def _run_parallel(jobs: Sequence[Callable[[], Any]], workers: int) -> list[Any]:
    if workers <= 1 or len(jobs) <= 1:
        return [job() for job in jobs]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oci-layer") as pool:
        futures: list[Future[Any]] = [pool.submit(job) for job in jobs]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            exc = f.exception()
            if exc is not None:
                for p in pending:
                    p.cancel()
                wait(pending)
                raise exc
        return [f.result() for f in futures]


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
) -> tuple[str, ImportStats]:
    existing = repo.has_stream(layer_stream(diff_id))
    if existing is not None:
        _report(progress, ProgressEvent("skipped", diff_id))
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
        )  # fmt: skip
        if container:
            compression = layer_compression(desc.media_type)
            if compression is None:
                raise OciError(f"unsupported layer media type {desc.media_type!r}")
            verity, stats = import_layer(repo, diff_id, blob, compression=compression)
        else:
            verity, stats = _store_blob_stream(repo, desc.digest, blob)
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
) -> PullResult:
    """Pull the image `source` names into `repo`; tag it `tag` (if given)."""
    repo.ensure_writable()
    if tag is not None:
        validate_tag(tag)
    resolved = resolve_manifest(source, platform)
    manifest = resolved.manifest
    container = manifest.is_container_image
    config_raw = _fetch_small(source, manifest.config, "config")
    if container:
        _config, diff_ids = _config_diff_ids(config_raw, len(manifest.layers))
    else:
        diff_ids = [d.digest for d in manifest.layers]

    # Layers: biggest first so parallel fetches finish together.
    order = sorted(range(len(manifest.layers)), key=lambda i: -manifest.layers[i].size)
    workers = int(getattr(source, "max_workers", 1) or 1)
    seen: set[str] = set()
    jobs = []
    for i in order:
        if diff_ids[i] in seen:
            continue
        seen.add(diff_ids[i])
        desc = manifest.layers[i]
        if container and not is_tar_layer(desc.media_type):
            raise OciError(f"unsupported layer media type {desc.media_type!r}")
        jobs.append(
            functools.partial(_fetch_layer, repo, source, desc, diff_ids[i], container, progress)
        )
    stats = ImportStats()
    layer_refs: dict[str, str] = {}
    for diff_id, (verity, layer_stats) in zip(
        [j.args[3] for j in jobs], _run_parallel(jobs, workers), strict=True
    ):
        layer_refs[diff_id] = verity
        stats.merge(layer_stats)

    config_digest = manifest.config.digest
    config_named = {d: layer_refs[d] for d in diff_ids}
    image_ids: dict[int, str] = {}
    if container:
        kept = _kept_image_refs(repo, config_digest, layer_refs)
        config_named.update(kept)
        image_ids = _existing_images(repo, kept)
        if not image_ids:
            _report(progress, ProgressEvent("message", message="Building composefs image"))
            root = build_tree(repo, diff_ids, layer_refs)
            image_ids = commit_image_refs(repo, root)
        for version, image_id in image_ids.items():
            config_named[IMAGE_REF_KEYS[version]] = image_id
    config_verity = _write_json_stream(
        repo, CONTENT_OCI_CONFIG, config_raw, config_stream(config_digest), config_named
    )
    manifest_named = {f"config:{config_digest}": config_verity}
    manifest_named.update({d: layer_refs[d] for d in diff_ids})
    manifest_verity = _write_json_stream(
        repo, CONTENT_OCI_MANIFEST, resolved.raw, manifest_stream(resolved.digest), manifest_named
    )
    if tag is not None:
        repo.name_stream(manifest_stream(resolved.digest), tag_ref(tag))
    return PullResult(
        resolved.digest, manifest_verity, config_digest, config_verity, image_ids, tag, stats
    )


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
        _raw, named = _read_json_stream(repo, cid, None, CONTENT_OCI_CONFIG)
    except (OciError, NotFoundError):
        return {}
    if any(named.get(d) != v for d, v in layer_refs.items()):
        return {}
    return {k: v for k, v in named.items() if k in _ALL_IMAGE_KEYS and repo.has_object(v)}


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
) -> PullResult:
    """Pull `imgref` (``oci:DIR[:TAG]``, ``oci-archive:``, ``docker-archive:``,
    ``containers-storage:``, ``docker://``) into `repo` and tag it `tag`.
    `registry_options` (`registry.RegistryOptions`) is for ``docker://``."""
    if isinstance(platform, str):
        platform = Platform.parse(platform)
    if tag is not None:
        validate_tag(tag)
    source = open_source(imgref, registry_options)
    try:
        return pull_from_source(repo, source, tag, platform=platform, progress=progress)
    finally:
        source.close()


# -- fsck ----------------------------------------------------------------------------


@dataclass
class OciFsckResult:
    repo_result: Any
    images_checked: int = 0
    images_corrupted: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.repo_result.ok) and not self.errors

    def __str__(self) -> str:
        out = str(self.repo_result)
        if out and not out.endswith("\n"):
            out += "\n"
        out += (
            f"oci images: {self.images_checked - self.images_corrupted}/{self.images_checked} ok\n"
        )
        if self.errors:
            out += f"oci errors: {len(self.errors)}\n"
            out += "".join(f"  - {e}\n" for e in self.errors)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "images_checked": self.images_checked,
            "images_corrupted": self.images_corrupted,
            "errors": list(self.errors),
            "repo": self.repo_result.to_reply(),
        }


def _msg(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _fsck_image(repo: Repository, name: str, manifest_digest: str, result: OciFsckResult) -> None:
    """Check one image; it counts as corrupted if any check failed."""
    result.images_checked += 1
    before = len(result.errors)

    def fail(kind: str, detail: str) -> None:
        result.errors.append(f"fsck: {kind}: {name}: {detail}")

    _check_image(repo, manifest_digest, fail)
    if len(result.errors) > before:
        result.images_corrupted += 1


def _check_image(repo: Repository, manifest_digest: str, fail: Callable[[str, str], None]) -> None:
    """The checks of `_fsck_image`, reporting each problem through `fail`;
    returns early when a failure leaves nothing further to check."""
    try:
        raw, named = _read_json_stream(
            repo, manifest_stream(manifest_digest), None, CONTENT_OCI_MANIFEST
        )
    except Exception as e:
        fail("manifest-read-failed", _msg(e))
        return
    actual = digest_of(raw, manifest_digest)
    if actual != manifest_digest:
        fail("manifest-digest-mismatch", f"expected {manifest_digest}, got {actual}")
        return
    try:
        manifest = ImageManifest.parse(raw)
    except OciError as e:
        fail("manifest-parse-failed", _msg(e))
        return
    config_digest = manifest.config.digest
    config_verity = named.get(f"config:{config_digest}")
    if config_verity is None:
        fail("config-ref-missing", config_digest)
        return
    try:
        config_raw, config_named = _read_json_stream(
            repo, config_stream(config_digest), config_verity, CONTENT_OCI_CONFIG
        )
    except Exception as e:
        fail("config-read-failed", _msg(e))
        return
    actual = digest_of(config_raw, config_digest)
    if actual != config_digest:
        fail("config-digest-mismatch", f"expected {config_digest}, got {actual}")
        return
    if manifest.is_container_image:
        try:
            config, diff_ids = _config_diff_ids(config_raw, None)
        except OciError as e:
            fail("config-parse-failed", _msg(e))
            return
        for diff_id in diff_ids:
            verity = config_named.get(diff_id)
            if verity is None:
                fail("layer-ref-missing", diff_id)
                continue
            if repo.has_stream(layer_stream(diff_id)) is None:
                fail("layer-stream-missing", diff_id)
            if not repo.has_object(verity):
                fail("layer-object-missing", f"{diff_id}: object {verity} not found")
        labels = (
            config.get("config", {}).get("Labels")
            if isinstance(config.get("config"), dict)
            else None
        )
        seal = labels.get("containers.composefs.fsverity") if isinstance(labels, dict) else None
        if isinstance(seal, str):
            image = seal.partition(":")[2] or seal
            try:
                os.close(repo.open_image(image)[0])
            except Exception as e:
                fail("seal-image-missing", f"{seal}: {_msg(e)}")
    else:
        for desc in manifest.layers:
            verity = named.get(desc.digest)
            if verity is None:
                fail("artifact-layer-ref-missing", desc.digest)
            elif not repo.has_object(verity):
                fail("artifact-layer-object-missing", f"{desc.digest}: object {verity} not found")


def _fsck_bad_ref(result: OciFsckResult, kind: str, name: str, detail: str) -> None:
    """A tag that does not lead to an image: checked, and corrupted."""
    result.images_checked += 1
    result.images_corrupted += 1
    result.errors.append(f"fsck: {kind}: {name}: {detail}")


def oci_fsck(
    repo: Repository, image: str | None = None, *, metadata_only: bool = False
) -> OciFsckResult:
    """Repository fsck plus per-image OCI checks (all tags, or one)."""
    result = OciFsckResult(repo.fsck(metadata_only=metadata_only))
    if image is not None:
        try:
            digest, _verity = resolve_tag(repo, image)
        except (OciError, NotFoundError) as e:
            _fsck_bad_ref(result, "ref-resolve-failed", image, _msg(e))
            return result
        _fsck_image(repo, image, digest, result)
        return result
    for name, target in repo.list_stream_refs("oci"):
        tag = decode_tag(name)
        if tag.startswith("@"):
            _fsck_bad_ref(
                result, "invalid-ref-name", tag, "leading '@' is reserved for digest references"
            )
            continue
        part = target.rsplit("/", 1)[-1]
        digest = part[len("oci-manifest-") :] if part.startswith("oci-manifest-") else ""
        try:
            parse_digest(digest)
        except OciError:
            _fsck_bad_ref(result, "ref-resolve-failed", tag, f"invalid target {part}")
            continue
        _fsck_image(repo, tag, digest, result)
    return result


def iter_images(repo: Repository) -> Iterable[OciImage]:
    for _tag, digest in list_tags(repo):
        yield open_image(repo, digest)
