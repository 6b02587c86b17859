"""OCI fsck: every tagged image checked against its streams, objects and digests.

`oci_fsck` walks the tags (`composefs.oci.stored`) and reports, without
changing anything, refs that do not resolve, manifests, configs and layers
whose digests or structure are wrong, and images whose committed EROFS
files are missing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import NotFoundError, OciError
from ..splitstream import (
    CONTENT_OCI_CONFIG,
    CONTENT_OCI_MANIFEST,
)
from .image import (
    ImageManifest,
    digest_of,
    parse_digest,
)
from .stored import (
    config_diff_ids,
    config_stream,
    decode_tag,
    layer_stream,
    manifest_stream,
    read_json_stream,
    resolve_tag,
)

if TYPE_CHECKING:
    from ..repository import Repository


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
        raw, named = read_json_stream(
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
        config_raw, config_named = read_json_stream(
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
            config, diff_ids = config_diff_ids(config_raw, None)
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
