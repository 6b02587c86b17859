"""The IO-free core of composefs HTTP fetching (composefs-rs ``composefs-http``).

A repository is served as a static tree: ``streams/NAME`` is a splitstream
(its bytes, or — for object stores without symlinks — a body of type
``text/x-symlink-target`` naming the symlink's target), and
``objects/XX/REST`` are the objects. This module builds those paths, reads
symlink targets without letting them escape the tree, classifies HTTP
answers, and knows the named-ref rules: a ref keyed ``[kind:]sha256:HEX``
names a splitstream whose reassembled content must hash to HEX, a
``composefs.image…`` ref names an EROFS image. No sockets, no files.
"""

from __future__ import annotations

import enum
import posixpath
import re
import urllib.parse
from dataclasses import dataclass

from ..errors import HttpError
from ..splitstream import (
    CONTENT_OCI_BLOB,
    CONTENT_OCI_CONFIG,
    CONTENT_OCI_LAYER,
    CONTENT_OCI_MANIFEST,
)

SYMLINK_CONTENT_TYPE = "text/x-symlink-target"
#: A symlink target is a short relative path; anything longer is hostile.
MAX_LINK_BODY = 4096
#: Symlinks followed from one ``streams/NAME`` (refs → stream → object).
MAX_LINK_HOPS = 8
MAX_REDIRECTS = 8
IMAGE_KEY_PREFIX = "composefs.image"

_HEX_LEN = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")
#: ``sha256:HEX`` or ``config:sha256:HEX`` (any ``kind:`` prefix).
_DIGEST_KEY_RE = re.compile(r"(?:[a-z][a-z0-9_.-]*:)?(sha256|sha512):([0-9a-f]+)")
_STREAM_PREFIX = {
    CONTENT_OCI_LAYER: "oci-layer-",
    CONTENT_OCI_BLOB: "oci-layer-",  # artifact blobs are named by their digest too
    CONTENT_OCI_CONFIG: "oci-config-",
    CONTENT_OCI_MANIFEST: "oci-manifest-",
}


# ---------------------------------------------------------------- URLs and paths


def base_url(url: str) -> str:
    """`url` checked (http/https, a host, no query) and ending in ``/``."""
    try:
        p = urllib.parse.urlsplit(url)
        p.port  # noqa: B018  (raises on a bad port)
    except ValueError as e:
        raise HttpError(f"invalid URL {url!r}: {e}") from None
    if p.scheme not in ("http", "https") or not p.hostname:
        raise HttpError(f"invalid URL {url!r}: expected http://HOST/PATH or https://HOST/PATH")
    if p.query or p.fragment:
        raise HttpError(f"invalid URL {url!r}: a repository URL has no query or fragment")
    path = p.path if p.path.endswith("/") else p.path + "/"
    return urllib.parse.urlunsplit((p.scheme, p.netloc, path, "", ""))


def check_relpath(path: str, what: str) -> list[str]:
    """Components of a safe relative path (no ``..``, ``.``, empty parts, NUL)."""
    parts = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\0" in path
        or any(p in ("", ".", "..") for p in parts)
        or len(path) > 4096
    ):
        raise HttpError(f"invalid {what} {path!r}")
    return parts


def stream_path(name: str) -> str:
    check_relpath(name, "stream name")
    return f"streams/{name}"


def is_content_id(name: str) -> bool:
    """A name ``streams/<name>`` may have locally (not ``refs``, no ``/``, no dot-file)."""
    return (
        bool(name)
        and "/" not in name
        and "\0" not in name
        and name != "refs"
        and (not name.startswith("."))
    )


def check_object_id(object_id: str, algorithm: str) -> str:
    if len(object_id) != _HEX_LEN[algorithm] or not _HEX_RE.fullmatch(object_id):
        raise HttpError(f"invalid {algorithm} object id {object_id!r}")
    return object_id


def object_path(object_id: str, algorithm: str) -> str:
    check_object_id(object_id, algorithm)
    return f"objects/{object_id[:2]}/{object_id[2:]}"


def url_for(base: str, relpath: str) -> str:
    """`base` (from `base_url`) joined with a repository path, percent-encoded
    (stream names hold ``%`` and ``:``; tags are stored ``%2F``-encoded)."""
    return base + urllib.parse.quote(relpath, safe="/:@+=,-._~")


@dataclass(frozen=True)
class LinkTarget:
    """Where a symlink inside the served tree points: a stream or an object."""

    stream: str | None = None
    object_id: str | None = None


def resolve_link(path: str, target: str, algorithm: str) -> LinkTarget:
    """Resolve symlink `target` found at repository path `path`; it must stay
    inside ``streams/`` or name an object under ``objects/``."""
    if not target or target.startswith("/") or "\0" in target or len(target) > MAX_LINK_BODY:
        raise HttpError(f"{path}: invalid symlink target {target[:200]!r}")
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    parts = joined.split("/")
    if parts[0] == "objects" and len(parts) == 3 and len(parts[1]) == 2:
        object_id = parts[1] + parts[2]
        if len(object_id) == _HEX_LEN[algorithm] and _HEX_RE.fullmatch(object_id):
            return LinkTarget(object_id=object_id)
        raise HttpError(
            f"{path}: symlink names {joined!r}, not a {algorithm} object "
            "(is the server's repository of another algorithm?)"
        )
    if parts[0] == "streams" and len(parts) > 1 and ".." not in parts:
        return LinkTarget(stream="/".join(parts[1:]))
    raise HttpError(f"{path}: symlink target {target!r} escapes the repository")


def decode_link_body(path: str, body: bytes) -> str:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(f"{path}: symlink target is not UTF-8") from None
    return text.strip("\n")


def is_symlink_response(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() == SYMLINK_CONTENT_TYPE


# ---------------------------------------------------------------- responses


class Action(enum.Enum):
    OK = "ok"
    REDIRECT = "redirect"
    RETRY = "retry"
    NOT_FOUND = "not-found"
    FAIL = "fail"


_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})


def classify(status: int) -> Action:
    if status == 200:
        return Action.OK
    if status in _REDIRECT_STATUS:
        return Action.REDIRECT
    if status in _RETRY_STATUS:
        return Action.RETRY
    if status in (404, 410):
        return Action.NOT_FOUND
    return Action.FAIL


def redirect_target(current: str, location: str | None) -> str:
    """The absolute URL a redirect points at (http/https only)."""
    if not location:
        raise HttpError(f"{current}: redirect without a Location")
    url = urllib.parse.urljoin(current, location.strip())
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise HttpError(f"{current}: redirect to a non-HTTP URL {url!r}")
    return url


def same_origin(a: str, b: str) -> bool:
    pa, pb = urllib.parse.urlsplit(a), urllib.parse.urlsplit(b)

    def port(p: urllib.parse.SplitResult) -> int:
        return p.port or (443 if p.scheme == "https" else 80)

    return (pa.scheme, (pa.hostname or "").lower(), port(pa)) == (
        pb.scheme,
        (pb.hostname or "").lower(),
        port(pb),
    )


def parse_content_length(value: str | None) -> int | None:
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():
        raise HttpError(f"invalid Content-Length {value[:40]!r}")
    return int(value)


# ---------------------------------------------------------------- named refs


def key_digest(key: str) -> tuple[str, str] | None:
    """(algorithm, hex) a named-ref key promises for the reassembled stream:
    ``sha256:HEX`` and ``config:sha256:HEX``; None for other keys."""
    m = _DIGEST_KEY_RE.fullmatch(key)
    if m is None:
        return None
    alg, hexd = m.group(1), m.group(2)
    if len(hexd) != _HEX_LEN[alg]:
        return None
    return alg, hexd


def is_image_key(key: str) -> bool:
    return key == IMAGE_KEY_PREFIX or key.startswith(IMAGE_KEY_PREFIX + ".")


_CONTENT_ID_RE = re.compile(r"oci-(?:layer|config|manifest)-((?:sha256|sha512):[0-9a-f]+)")


def content_id_digest(content_id: str) -> tuple[str, str] | None:
    """(algorithm, hex) an OCI stream name (``oci-config-sha256:HEX``…) promises."""
    m = _CONTENT_ID_RE.fullmatch(content_id)
    return None if m is None else key_digest(m.group(1))


def content_id_for(content_type: int, digest: str) -> str | None:
    """The local stream name (``streams/<id>``) of a stream whose content has
    `digest` (``sha256:HEX``): OCI streams are named by their content digest."""
    prefix = _STREAM_PREFIX.get(content_type)
    return None if prefix is None else prefix + digest
