"""``docker://``: a native OCI Distribution client (composefs-rs shells out to skopeo).

What it does, and the rules it keeps:

* references ``[host[:port]/]name[:tag][@digest]`` with Docker Hub defaults
  (``docker.io`` → ``registry-1.docker.io``, one-component names get ``library/``);
* manifests and indexes, OCI and Docker schema 2. The full ``Accept`` list is
  always sent: without it a registry may 404 OCI manifests or silently convert
  schema 2 to schema 1 (a different digest);
* anonymous, basic and bearer-token authentication (`composefs.oci.auth`);
* blob redirects (301/302/303/307/308) are followed by hand so that
  credentials never travel to another origin;
* HTTPS with certificate verification (system CAs, ``SSL_CERT_FILE``, extra CA
  files, ``certs.d``-style directories). Plain HTTP only for loopback registries
  or when verification is explicitly disabled;
* HTTP(S) proxies: explicit, or ``https_proxy``/``no_proxy`` (never for loopback);
* bounded retries with exponential backoff on 429/5xx and dropped connections;
  a blob download that breaks mid-way resumes with a ``Range`` request;
* pushing: `push_image` copies any `ImageSource` to a registry (blob
  existence checks, cross-repository mounts, monolithic uploads);
* every blob's size and digest are checked while it streams: the consumer gets
  a file-like object that raises `DigestMismatch` before it reports EOF, so
  nothing unverified is ever complete. Nothing is held in memory whole.

The `RegistrySource` class implements the `transports.ImageSource` protocol;
platform selection and storage live in shared code above it.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import ssl
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TypeVar, cast

from .. import _json
from .._net import bound_heads, is_loopback, make_ssl_context, proxy_for
from .._net import describe as _describe
from .._net import is_cert_failure as _is_cert_failure
from .._net import net_errors as _net_errors
from .._net import origin as _origin
from .._net import proxy_manager as _proxy_manager
from .._net import redact as _redact
from .._net import shut_down as _shut_down
from .._net import socket_of as _socket_of
from .._net import ssl_error_cls as _ssl_error_cls
from ..errors import DigestMismatch, OciError, RegistryAuthError, RegistryError
from . import auth as _auth
from .image import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    INDEX_MEDIA_TYPES,
    MANIFEST_MEDIA_TYPES,
    MAX_JSON_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    BaseSource,
    ImageManifest,
    ImageSource,
    Platform,
    detect_media_type,
    parse_digest,
    parse_index,
    select_platform,
)

if TYPE_CHECKING:
    import urllib3

__all__ = [
    "ACCEPT_MANIFEST",
    "BlobStream",
    "Reference",
    "RegistryClient",
    "RegistryOptions",
    "RegistrySource",
    "fetch_parallel",
    "is_loopback",
    "open_source",
    "parse_reference",
    "proxy_for",
    "push_image",
]

#: Every manifest type we understand, in order of preference.
ACCEPT_MANIFEST = ", ".join((OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST))

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
USER_AGENT = "composefs-py/0.1"

_CHUNK = 1 << 20
_ERROR_BODY_MAX = 64 * 1024

# ---------------------------------------------------------------- references

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)


@dataclass(frozen=True)
class Reference:
    """A parsed ``docker://`` reference.

    `registry` is the canonical host[:port] (``docker.io`` for Docker Hub),
    `repository` the full path (``library/debian``). When both a tag and a
    digest are given the digest decides what is fetched.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Where the API actually lives (Docker Hub's API has its own name)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        return split_host_port(self.registry)[0]

    @property
    def ref(self) -> str:
        """What goes after ``/manifests/``: the digest if pinned, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        s = f"{self.registry}/{self.repository}"
        if self.tag:
            s += f":{self.tag}"
        if self.digest:
            s += f"@{self.digest}"
        return s


def split_host_port(hostport: str) -> tuple[str, int | None]:
    """``host``, ``host:5000``, ``[::1]:5000`` → (host without brackets, port)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = hostport[1:end], hostport[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") else None
    host, sep, port = hostport.rpartition(":")
    if sep and port.isdigit():
        return host, int(port)
    return hostport, None


def parse_reference(text: str) -> Reference:
    """Parse ``[docker://][host[:port]/]name[:tag][@digest]``.

    The first path component is a registry when it contains ``.`` or ``:``,
    is ``localhost``, or has upper case letters (the Docker rule); otherwise
    the image is on Docker Hub.
    """
    original = text
    if text.startswith("docker://"):
        text = text[len("docker://") :]
    if not text or len(text) > 1024:
        raise OciError(f"invalid image reference {original[:200]!r}")

    digest: str | None = None
    if "@" in text:
        text, _, digest = text.partition("@")
        try:
            parse_digest(digest)
        except OciError:
            raise OciError(
                f"invalid image reference {original!r}: bad digest (sha256:<64 hex> or sha512:<128 hex>)"
            ) from None

    registry = DOCKER_HUB
    first, slash, rest = text.partition("/")
    if slash and (
        "." in first
        or ":" in first
        or first == "localhost"
        or first.lower() != first
        or first.startswith("[")
    ):
        if not _HOST_RE.fullmatch(first):
            raise OciError(f"invalid image reference {original!r}: bad registry host {first!r}")
        registry = first
        text = rest
    tag: str | None = None
    name, colon, maybe_tag = text.rpartition(":")
    if colon:
        if not _TAG_RE.fullmatch(maybe_tag):
            raise OciError(f"invalid image reference {original!r}: bad tag {maybe_tag!r}")
        tag, text = maybe_tag, name
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in text:
        text = "library/" + text
    if not _NAME_RE.fullmatch(text) or len(text) > 255:
        raise OciError(
            f"invalid image reference {original!r}: repository names are lower case "
            "letters, digits and separators (. _ __ -) joined by '/'"
        )
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, text, tag, digest)


# ---------------------------------------------------------------- options


@dataclass
class RegistryOptions:
    """Everything a user can tune about talking to a registry (CLI flags map 1:1).

    `creds` ``USER:PASS`` (``--creds``) wins over auth files; `auth_file`
    (``--authfile``) replaces the default auth file search; `tls_verify`
    False (``--tls-verify=false``) disables certificate checks and allows plain
    HTTP; `cert_dir` (``--cert-dir``) holds ``*.crt`` CA files and optional
    ``*.cert``/``*.key`` client pairs; `ca_file` is one extra CA bundle.
    `proxy`: an ``http://[user:pass@]host:port`` proxy for every request
    (``""`` disables proxies); None means the usual ``https_proxy`` /
    ``http_proxy`` / ``all_proxy`` / ``no_proxy`` variables, which never
    apply to loopback registries. `env` replaces ``os.environ`` for auth-file
    and proxy lookup.
    """

    creds: str | None = None
    auth_file: str | None = None
    tls_verify: bool = True
    cert_dir: str | None = None
    ca_file: str | None = None
    retries: int = 4
    backoff: float = 0.25
    max_backoff: float = 8.0
    connect_timeout: float = 30.0
    read_timeout: float = 120.0
    #: overall limit for one blob download (``--transfer-timeout``), resumes
    #: included; manifests, tokens and error bodies get `read_timeout` in all
    transfer_timeout: float = 3600.0
    max_workers: int = 4
    #: directories searched for ``HOST[:PORT]/*.crt`` like podman/docker do
    certs_d: tuple[str, ...] = ("/etc/containers/certs.d", "/etc/docker/certs.d")
    proxy: str | None = None
    env: Mapping[str, str] | None = field(default=None, repr=False)


# ---------------------------------------------------------------- HTTP client


class _CertError(RegistryError):
    """TLS certificate verification failed (never answered by falling back to HTTP)."""


_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})


def _registry_error_text(body: bytes) -> str:
    """The human part of a registry's JSON error body, if any."""
    try:
        doc = _json.loads(body, "error body", RegistryError)
    except RegistryError:
        return ""
    errs = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errs, list):
        return ""
    parts = []
    for err in errs[:3]:
        if isinstance(err, dict):
            msg = err.get("message") or err.get("code")
            if isinstance(msg, str):
                parts.append(" ".join(msg.split())[:200])
    return "; ".join(parts)


class RegistryClient:
    """HTTP plumbing for one registry host: TLS, auth, retries, redirects.

    Thread-safe: blob downloads may run concurrently (the connection pool
    holds up to `max_workers` + 2 connections per host).
    """

    def __init__(
        self,
        registry: str,
        *,
        credentials: _auth.Credentials | None = None,
        options: RegistryOptions | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import urllib3

        self.registry = registry
        self.options = opts = options or RegistryOptions()
        self.api_host = DOCKER_HUB_API if registry == DOCKER_HUB else registry
        host, _port = split_host_port(self.api_host)
        self._sleep = sleep
        # Plain HTTP: loopback (nothing on the wire to protect) or explicit opt-out.
        self.loopback = is_loopback(host)
        self.allow_http = self.loopback or not opts.tls_verify
        # The TLS context is made on first HTTPS use (loading the system CA
        # store costs more than a whole pull from a local plain registry).
        self._tls_lock = threading.Lock()
        self._tls_ready = False
        self._ssl_context: ssl.SSLContext | None = None
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        # ...but a mistyped path is reported now, not on some later HTTPS hop.
        if opts.cert_dir and not os.path.isdir(opts.cert_dir):
            raise RegistryError(f"certificate directory not found: {opts.cert_dir}")
        if opts.ca_file and not os.path.isfile(opts.ca_file):
            raise RegistryError(f"CA file not found: {opts.ca_file}")
        self._pool = bound_heads(
            urllib3.PoolManager(
                num_pools=8,
                maxsize=max(2, opts.max_workers + 2),
                block=False,
                cert_reqs=ssl.CERT_REQUIRED if opts.tls_verify else ssl.CERT_NONE,
                assert_hostname=None if opts.tls_verify else False,
                retries=False,
                timeout=urllib3.Timeout(connect=opts.connect_timeout, read=opts.read_timeout),
                headers={"User-Agent": USER_AGENT},
            )
        )
        if not opts.tls_verify:
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
        self.auth = _auth.Authenticator(registry, credentials, self._fetch_token)
        self._auth_lock = threading.Lock()
        self._base_lock = threading.Lock()
        self._base: str | None = None

    def close(self) -> None:
        self._pool.clear()
        for mgr in self._proxied.values():
            mgr.clear()

    # -- low level -----------------------------------------------------------

    def _backoff(self, attempt: int, retry_after: str | None = None) -> None:
        delay = min(self.options.backoff * (2**attempt), self.options.max_backoff)
        if retry_after and retry_after.strip().isdigit():
            delay = min(max(delay, float(retry_after.strip())), self.options.max_backoff)
        if delay > 0:
            self._sleep(delay)

    def _ensure_tls(self) -> None:
        with self._tls_lock:
            if not self._tls_ready:
                self._ssl_context = make_ssl_context(self.options, self.api_host, RegistryError)
                for pool in (self._pool, *self._proxied.values()):
                    pool.connection_pool_kw["ssl_context"] = self._ssl_context
                self._tls_ready = True

    def _manager(self, url: str) -> urllib3.PoolManager:
        proxy = proxy_for(url, self.options)
        if proxy is None:
            return self._pool
        with self._tls_lock:
            mgr = self._proxied.get(proxy)
            if mgr is None:
                mgr = self._make_proxy_manager(proxy)
                self._proxied[proxy] = mgr
            return mgr

    def _make_proxy_manager(self, proxy: str) -> urllib3.ProxyManager:
        return _proxy_manager(proxy, self._pool, 8, RegistryError)

    def _send(
        self, method: str, url: str, headers: dict[str, str], body: Any = None
    ) -> urllib3.BaseHTTPResponse:
        if not self._tls_ready and url.startswith("https:"):
            self._ensure_tls()
        return self._manager(url).request(
            method,
            url,
            body=body,
            headers=headers,
            redirect=False,
            preload_content=False,
            retries=False,
            decode_content=False,
        )

    def _fetch_token(self, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """Token requests for the Authenticator: same TLS rules, retries, no redirects with creds."""
        scheme, host, _ = _origin(url)
        sends_creds = any(k.lower() == "authorization" for k in headers)
        # Credentials go to a token server over HTTPS, or in plain HTTP only
        # to the registry's own host (or anywhere with --tls-verify=false).
        own_host = (
            _origin(self._base)[1] if self._base else split_host_port(self.api_host)[0].lower()
        )
        if (
            sends_creds
            and scheme != "https"
            and not (host == own_host.strip("[]") or not self.options.tls_verify)
        ):
            raise RegistryAuthError(
                f"{self.registry}: refusing to send credentials to a plain-HTTP token server "
                f"{host} that is not the registry's host"
            )
        resp = self._request("GET", url, headers=headers, scope=None, auth=False)
        try:
            body = _read_limited(resp, MAX_JSON_SIZE, "token response", self.options)
        finally:
            resp.release_conn()
        return resp.status, body

    def _request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        scope: str | None,
        auth: bool = True,
        retry_network: bool = True,
        body: Any = None,
    ) -> urllib3.BaseHTTPResponse:
        """One logical request: auth, redirects (credentials only to the
        registry's own origin), retries with backoff. Returns the final
        response unread (caller releases it); raises RegistryError on network
        failure. A request with a `body` (a stream) is sent once: no retries,
        no redirects; the caller starts over if it must."""
        net_errors = _net_errors()
        ssl_error = _ssl_error_cls()
        max_retries = self.options.retries
        attempt = 0
        auth_tries = 0
        # Credentials belong to the registry's origin (or, for token requests,
        # the token server's): nothing else ever sees them.
        home = _origin(self._base) if auth and self._base else _origin(url)
        replayable = body is None
        target = url
        hops = 0
        while True:
            hdrs = dict(headers or {})
            same_origin = _origin(target) == home
            if not same_origin:
                # Never carry credentials (ours or the caller's) to another origin.
                hdrs = {k: v for k, v in hdrs.items() if k.lower() != "authorization"}
            sent_auth = False
            if auth and scope is not None and same_origin:
                with self._auth_lock:
                    value = self.auth.header_for(scope)
                if value:
                    hdrs["Authorization"] = value
                    sent_auth = True
            try:
                resp = self._send(method, target, hdrs, body)
            except ssl_error as e:
                if _is_cert_failure(e):
                    raise _CertError(
                        f"{_origin(target)[1]}: TLS certificate verification failed ({_describe(e)}); "
                        "give the CA with --cert-dir, or use --tls-verify=false"
                    ) from None
                if replayable and retry_network and attempt < max_retries:
                    self._backoff(attempt)
                    attempt += 1
                    target, hops = url, 0
                    continue
                raise RegistryError(f"{_origin(target)[1]}: TLS error: {_describe(e)}") from None
            except net_errors as e:
                if replayable and retry_network and attempt < max_retries:
                    self._backoff(attempt)
                    attempt += 1
                    target, hops = url, 0
                    continue
                # the host that failed: the registry, its token server or a blob host
                raise RegistryError(f"cannot reach {_hostport(target)}: {_describe(e)}") from None

            status = resp.status
            if status == 407:
                _discard(resp)
                proxy = proxy_for(target, self.options) or "proxy"
                raise RegistryError(f"{_redact(proxy)}: proxy authentication required (HTTP 407)")
            if status in _REDIRECT_STATUS and replayable:
                location = resp.headers.get("Location")
                _discard(resp)
                if not location:
                    raise RegistryError(f"{self.registry}: HTTP {status} redirect without Location")
                hops += 1
                if hops > 8:
                    raise RegistryError(f"{self.registry}: too many redirects")
                nxt = urllib.parse.urljoin(target, location)
                nscheme, nhost, _ = _origin(nxt)
                if nscheme not in ("http", "https"):
                    raise RegistryError(
                        f"{self.registry}: redirect to unsupported URL scheme {nscheme!r}"
                    )
                if (
                    nscheme == "http"
                    and _origin(target)[0] == "https"
                    and not (is_loopback(nhost) or not self.options.tls_verify)
                ):
                    raise RegistryError(
                        f"{self.registry}: refusing redirect from HTTPS to plain HTTP ({nhost})"
                    )
                target = nxt
                if status == 303:
                    method = "GET"
                continue
            if status == 401 and auth and scope is not None and _origin(target) == home:
                challenge = resp.headers.get("WWW-Authenticate")
                if not replayable:
                    # Learn the new challenge for the caller's next attempt.
                    with self._auth_lock:
                        self.auth.handle_challenge(challenge, scope, had_auth=sent_auth)
                    return resp
                _discard(resp)
                auth_tries += 1
                if auth_tries > 2:
                    raise self.auth.denied()
                with self._auth_lock:
                    self.auth.handle_challenge(challenge, scope, had_auth=sent_auth)
                target, hops = url, 0
                continue
            if status in _RETRY_STATUS and replayable and attempt < max_retries:
                retry_after = resp.headers.get("Retry-After")
                _discard(resp)
                self._backoff(attempt, retry_after)
                attempt += 1
                target, hops = url, 0
                continue
            resp.url = target  # where it came from: errors name that host
            return resp

    # -- endpoints ---------------------------------------------------------------

    def base_url(self) -> str:
        """``scheme://host[:port]``, found by pinging ``/v2/`` once.

        Loopback registries are probed over plain HTTP first (the probe
        carries no credentials, and most local registries are plain), then
        HTTPS. Everything else is HTTPS, with plain HTTP as a fallback only
        when verification is off. A certificate problem is never "solved"
        by dropping encryption.
        """
        with self._base_lock:
            if self._base is not None:
                return self._base
            if not self.allow_http:
                schemes = ["https"]
            elif self.loopback:
                schemes = ["http", "https"]
            else:
                schemes = ["https", "http"]
            last: RegistryError | None = None
            for i, scheme in enumerate(schemes):
                base = f"{scheme}://{self.api_host}"
                probing = i + 1 < len(schemes)
                try:
                    resp = self._request(
                        "GET", base + "/v2/", scope=None, auth=False, retry_network=not probing
                    )
                except _CertError:
                    raise
                except RegistryError as e:
                    last = e
                    continue
                try:
                    if probing and scheme == "http" and resp.status == 400:
                        # What an HTTPS server says to a plain-HTTP request.
                        last = RegistryError(f"{self.registry}: HTTP answered 400; trying HTTPS")
                        continue
                    if resp.status == 401:
                        self.auth.note_challenge(resp.headers.get("WWW-Authenticate"))
                    elif resp.status == 404:
                        raise RegistryError(f"{self.registry}: not a registry (no /v2/ API)")
                    elif resp.status >= 500:
                        raise RegistryError(
                            f"{self.registry}: registry answered HTTP {resp.status}"
                        )
                finally:
                    _discard(resp)
                self._base = base
                return base
            assert last is not None
            raise last

    def _url(self, repository: str, kind: str, ref: str) -> str:
        return f"{self.base_url()}/v2/{repository}/{kind}/{urllib.parse.quote(ref, safe=':')}"

    def get_manifest(self, repository: str, ref: str) -> tuple[bytes, str | None, str]:
        """Fetch a manifest or index: (raw bytes, media type, digest).

        A digest `ref` is verified; for a tag the registry's
        ``Docker-Content-Digest`` is checked when it uses the same algorithm.
        """
        scope = f"repository:{repository}:pull"
        what = (
            f"{self.registry}/{repository}:{ref}"
            if ":" not in ref
            else f"{self.registry}/{repository}@{ref}"
        )
        url = self._url(repository, "manifests", ref)
        resp = self._request("GET", url, headers={"Accept": ACCEPT_MANIFEST}, scope=scope)
        try:
            if resp.status != 200:
                raise _status_error(resp, what, "manifest")
            body = _read_limited(resp, MAX_JSON_SIZE, f"{what}: manifest", self.options)
            ctype = resp.headers.get("Content-Type")
            header_digest = resp.headers.get("Docker-Content-Digest")
        finally:
            resp.release_conn()
        media_type = (ctype or "").split(";", 1)[0].strip() or None
        if media_type not in INDEX_MEDIA_TYPES | MANIFEST_MEDIA_TYPES:
            media_type = _sniff_media_type(body, media_type, what)
        if ":" in ref:
            alg, _ = parse_digest(ref)
            actual = f"{alg}:" + hashlib.new(alg, body).hexdigest()
            if actual != ref:
                raise DigestMismatch(f"{what}: manifest digest mismatch: got {actual}")
            digest = ref
        else:
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
                raise DigestMismatch(
                    f"{what}: manifest digest mismatch: registry says {header_digest}, content is {digest}"
                )
        return body, media_type, digest

    def open_blob(self, repository: str, digest: str, size: int | None = None) -> BlobStream:
        """A verifying stream of the blob's bytes (see `BlobStream`)."""
        parse_digest(digest)
        if size is not None and size < 0:
            raise OciError(f"blob {digest}: negative size")
        scope = f"repository:{repository}:pull"
        url = self._url(repository, "blobs", digest)
        what = f"{self.registry}/{repository}@{digest}"
        resp = self._request("GET", url, scope=scope)
        if resp.status != 200:
            try:
                raise _status_error(resp, what, "blob")
            finally:
                resp.release_conn()
        return BlobStream(self, url, scope, digest, size, resp, what)

    # -- pushing ------------------------------------------------------------------

    def blob_exists(self, repository: str, digest: str, *, push: bool = False) -> bool:
        """Whether the registry has `digest` in `repository` (HEAD)."""
        parse_digest(digest)
        scope = f"repository:{repository}:pull,push" if push else f"repository:{repository}:pull"
        resp = self._request("HEAD", self._url(repository, "blobs", digest), scope=scope)
        try:
            if resp.status == 200:
                return True
            if resp.status == 404:
                return False
            raise _status_error(resp, f"{self.registry}/{repository}@{digest}", "blob")
        finally:
            resp.drain_conn()  # a HEAD answer has no body
            resp.release_conn()

    def push_blob(
        self,
        repository: str,
        digest: str,
        size: int,
        opener: Callable[[], BinaryIO],
        *,
        mount_from: str | None = None,
    ) -> bool:
        """Upload a blob unless the registry has it; False when nothing was sent.

        `opener` gives a fresh stream of the blob each attempt (an upload that
        fails half-way starts over). With `mount_from` the registry is first
        asked to mount the blob from that repository (no bytes travel). The
        registry checks the digest before it accepts the blob.
        """
        parse_digest(digest)
        scope = f"repository:{repository}:pull,push"
        what = f"{self.registry}/{repository}@{digest}"
        if self.blob_exists(repository, digest, push=True):
            return False
        base = f"{self.base_url()}/v2/{repository}/blobs/uploads/"
        attempt = 0
        while True:
            start = base
            if mount_from:
                start += "?" + urllib.parse.urlencode({"mount": digest, "from": mount_from})
            resp = self._request("POST", start, headers={"Content-Length": "0"}, scope=scope)
            try:
                if resp.status == 201 and mount_from:
                    return False  # mounted from the other repository
                if resp.status != 202:
                    raise _status_error(resp, what, "upload")
                location = resp.headers.get("Location")
            finally:
                _discard(resp)
            if not location:
                raise RegistryError(f"{what}: upload started without a Location")
            put_url = urllib.parse.urljoin(base, location)
            sep = "&" if urllib.parse.urlsplit(put_url).query else "?"
            put_url += sep + urllib.parse.urlencode({"digest": digest})
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
            try:
                with opener() as stream:
                    resp = self._request("PUT", put_url, headers=headers, scope=scope, body=stream)
            except RegistryError:
                if attempt >= self.options.retries:
                    raise
                self._backoff(attempt)
                attempt += 1
                continue
            if self._put_accepted(resp, what, "upload", attempt):
                return True
            attempt += 1

    def push_manifest(self, repository: str, ref: str, raw: bytes, media_type: str) -> str:
        """PUT a manifest or index under a tag or its digest; returns its digest."""
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        if ":" in ref and ref != digest:
            alg, _ = parse_digest(ref)
            if f"{alg}:" + hashlib.new(alg, raw).hexdigest() != ref:
                raise DigestMismatch(f"manifest does not match the digest {ref} it is pushed as")
            digest = ref
        scope = f"repository:{repository}:pull,push"
        what = (
            f"{self.registry}/{repository}:{ref}"
            if ":" not in ref
            else f"{self.registry}/{repository}@{ref}"
        )
        headers = {"Content-Type": media_type, "Content-Length": str(len(raw))}
        attempt = 0
        while True:
            resp = self._request(
                "PUT",
                self._url(repository, "manifests", ref),
                headers=headers,
                scope=scope,
                body=raw,
            )
            if self._put_accepted(resp, what, "manifest", attempt):
                return digest
            attempt += 1

    def _put_accepted(
        self, resp: urllib3.BaseHTTPResponse, what: str, kind: str, attempt: int
    ) -> bool:
        """Whether a PUT's response (released here) accepted the content.
        A refusal raises, unless it is worth retrying and `attempt` leaves
        retries: then this waits out the backoff and returns False."""
        try:
            if resp.status in (201, 204):
                return True
            retry = resp.status in _RETRY_STATUS or resp.status == 401
            err = _status_error(resp, what, kind)
        finally:
            _discard(resp)
        if not retry or attempt >= self.options.retries:
            raise err
        self._backoff(attempt)
        return False


def _discard(resp: urllib3.BaseHTTPResponse) -> None:
    """Drop a response we will not read; keep the connection if cheap."""
    try:
        length = resp.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) <= 65536:
            resp.drain_conn()
            resp.release_conn()
        else:
            resp.close()
    except Exception:
        resp.close()


class _Deadline:
    """An overall time limit for one transfer. Each read on the response's
    socket waits at most what is left (and never longer than the read
    timeout), so neither a trickle of bytes nor a stalled body (a
    Content-Length larger than what is sent) keeps a transfer alive longer."""

    __slots__ = ("end", "read_timeout", "seconds")

    def __init__(self, seconds: float, read_timeout: float) -> None:
        self.seconds = seconds
        self.read_timeout = read_timeout
        self.end = time.monotonic() + seconds

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def arm(self, resp: urllib3.BaseHTTPResponse) -> bool:
        """Bound the next read; False once the deadline has passed."""
        left = self.end - time.monotonic()
        if left <= 0:
            return False
        sock = _socket_of(resp)
        if sock is not None:
            sock.settimeout(min(self.read_timeout, max(left, 0.01)))
        return True

    def error(self, resp: urllib3.BaseHTTPResponse | None, what: str, knob: str) -> RegistryError:
        url = resp.url if resp is not None else None
        where = f"{_hostport(url)}: " if url else ""
        return RegistryError(
            f"{where}{what}: transfer not finished after {self.seconds:g} s ({knob})"
        )


def _hostport(url: str) -> str:
    p = urllib.parse.urlsplit(url)
    host = p.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{p.port}" if p.port else host


def _read_limited(
    resp: urllib3.BaseHTTPResponse, limit: int, what: str, options: RegistryOptions
) -> bytes:
    """A small document (manifest, token, error): at most `limit` bytes,
    complete within the read timeout."""
    deadline = _Deadline(options.read_timeout, options.read_timeout)
    buf = bytearray()
    while True:
        if not deadline.arm(resp):
            resp.close()
            raise deadline.error(resp, what, "read timeout")
        try:
            chunk = resp.read1(min(_CHUNK, limit + 1 - len(buf)))
        except _net_errors() as e:
            if deadline.expired():
                resp.close()
                raise deadline.error(resp, what, "read timeout") from None
            where = f"{_hostport(resp.url)}: " if resp.url else ""
            raise RegistryError(f"{where}{what}: download failed: {_describe(e)}") from None
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            resp.close()
            raise RegistryError(f"{what}: larger than {limit} bytes")


def _status_error(resp: urllib3.BaseHTTPResponse, what: str, kind: str) -> RegistryError:
    try:
        body = resp.read(_ERROR_BODY_MAX)
    except Exception:
        body = b""
    detail = _registry_error_text(body)
    status = resp.status
    if status == 401 or status == 403:
        return RegistryAuthError(
            f"{what}: access denied (HTTP {status}{': ' + detail if detail else ''})"
        )
    if status == 404:
        return RegistryError(f"{what}: {kind} not found{' (' + detail + ')' if detail else ''}")
    return RegistryError(
        f"{what}: registry answered HTTP {status}{': ' + detail if detail else ''}"
    )


def _sniff_media_type(body: bytes, declared: str | None, what: str) -> str:
    """Media type from the JSON when the header is missing or generic."""
    doc = _json.loads(body, f"{what}: manifest", RegistryError)
    if not isinstance(doc, dict):
        raise RegistryError(f"{what}: malformed manifest JSON (not an object)")
    mt = doc.get("mediaType")
    if declared in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise RegistryError(f"{what}: Docker schema 1 manifests are not supported")
    if isinstance(mt, str) and mt in INDEX_MEDIA_TYPES | MANIFEST_MEDIA_TYPES:
        return mt
    if (
        mt is None
        and doc.get("schemaVersion") == 2
        and declared in (None, "application/json", "text/plain")
    ):
        if "manifests" in doc:
            return OCI_INDEX
        if "config" in doc:
            return OCI_MANIFEST
    raise RegistryError(f"{what}: unsupported manifest media type {mt or declared or '(none)'!r}")


# ---------------------------------------------------------------- blob stream


class BlobStream(io.RawIOBase):
    """A blob being downloaded, checked as it goes.

    * never yields more than the declared size; a blob that is longer,
      shorter or hashes differently raises `DigestMismatch` from the read
      that would otherwise complete it, so a consumer that reads to EOF
      never sees a successful end of bad content;
    * a connection that drops mid-way is resumed (``Range`` request, or by
      skipping already-seen bytes when the server ignores ranges), at most
      `retries` times;
    * `finish()` reads whatever the consumer left unread (e.g. padding after
      a gzip trailer) and verifies: call it before committing anything;
    * `abort()`, from another thread, ends the download: a read waiting on
      a silent connection returns, and nothing is retried.

    `verifies_digest` is True so that a consumer can skip hashing the same
    bytes a second time.
    """

    verifies_digest = True

    def __init__(
        self,
        client: RegistryClient,
        url: str,
        scope: str,
        digest: str,
        size: int | None,
        resp: urllib3.BaseHTTPResponse,
        what: str,
    ) -> None:
        super().__init__()
        alg, self._hex = parse_digest(digest)
        self._hasher = hashlib.new(alg)
        self._client = client
        self._url = url
        self._scope = scope
        self.digest = digest
        self.size = size
        self._resp: urllib3.BaseHTTPResponse | None = resp
        self._what = what
        self._pos = 0
        self._attempt = 0
        self._verified = False
        self._failed = False
        self._aborted = False
        # No declared size (rare: only for callers that do not know it): cap
        # at something sane so a hostile server cannot stream forever.
        self._limit = size if size is not None else MAX_JSON_SIZE
        self._deadline = _Deadline(client.options.transfer_timeout, client.options.read_timeout)

    @property
    def position(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        mv = memoryview(b).cast("B")
        data = self.read(len(mv))
        n = len(data)
        mv[:n] = data
        return n

    def readall(self) -> bytes:
        out = bytearray()
        while chunk := self.read(_CHUNK):
            out += chunk
        return bytes(out)

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            return self.readall()
        if self._verified or n == 0:
            return b""
        if self._failed:
            raise RegistryError(f"{self._what}: read after a failed download")
        if self.closed:
            raise ValueError("read from a closed blob stream")
        remaining = self._limit - self._pos
        if remaining <= 0:
            self._check_end()
            return b""
        data = self._read_some(min(n, remaining))
        if not data:
            # EOF from the server before the declared size
            if self.size is None:
                self._check_end()
                return b""
            data = self._resume_after_short()
            if not data:
                self._fail(
                    DigestMismatch(f"{self._what}: truncated: got {self._pos} of {self.size} bytes")
                )
        self._hasher.update(data)
        self._pos += len(data)
        if self._pos >= self._limit:
            # Check now, not on the next call: the final bytes are only handed
            # out once the whole blob is known to be right.
            self._check_end()
        return data

    def _read_some(self, n: int) -> bytes:
        net_errors = _net_errors()
        while True:
            resp = self._resp
            assert resp is not None
            if self._aborted:
                self._fail(RegistryError(f"{self._what}: download stopped"))
            if not self._deadline.arm(resp):
                self._fail(self._deadline.error(resp, self._what, "--transfer-timeout"))
            try:
                # read1: one socket read, so the deadline is checked between
                # trickled bytes (read(n) would wait for all n of them)
                return resp.read1(n)
            except net_errors as e:
                if self._deadline.expired():
                    self._fail(self._deadline.error(resp, self._what, "--transfer-timeout"))
                self._reopen(f"{_describe(e)}")

    def _resume_after_short(self) -> bytes:
        """The server closed early (no Content-Length to catch it): resume."""
        while self._attempt < self._client.options.retries:
            self._reopen("connection closed early")
            data = self._read_some(min(_CHUNK, self._limit - self._pos))
            if data:
                return data
        return b""

    def _reopen(self, why: str) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        client = self._client
        if self._aborted:
            self._fail(RegistryError(f"{self._what}: download stopped"))
        if self._deadline.expired():
            self._fail(self._deadline.error(None, self._what, "--transfer-timeout"))
        if self._attempt >= client.options.retries:
            self._fail(
                RegistryError(
                    f"{self._what}: download failed after {self._attempt + 1} attempts: {why}"
                )
            )
        client._backoff(self._attempt)
        self._attempt += 1
        headers = {"Range": f"bytes={self._pos}-"} if self._pos else {}
        try:
            resp = client._request("GET", self._url, headers=headers, scope=self._scope)
        except RegistryError as e:
            self._fail(e)
        if resp.status == 206:
            crange = resp.headers.get("Content-Range", "")
            m = re.fullmatch(r"bytes (\d+)-\d+/(?:\d+|\*)", crange.strip())
            if not m or int(m.group(1)) != self._pos:
                resp.close()
                self._fail(
                    RegistryError(f"{self._what}: bad Content-Range {crange!r} when resuming")
                )
        elif resp.status == 200:
            # Range ignored: skip what we already have (it is hashed already;
            # the final digest check catches a server that changed its mind).
            skip = self._pos
            try:
                while skip:
                    chunk = resp.read(min(skip, _CHUNK))
                    if not chunk:
                        break
                    skip -= len(chunk)
            except _net_errors():
                skip = -1
            if skip:
                resp.close()
                self._resp = None
                self._reopen("connection closed early")
                return
        else:
            try:
                err = _status_error(resp, self._what, "blob")
            finally:
                resp.close()
            self._fail(err)
        self._resp = resp

    def _fail(self, e: Exception) -> NoReturn:
        self._failed = True
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        raise e

    def _check_end(self) -> None:
        if self._verified:
            return
        if self.size is not None:
            # Anything beyond the declared size means the blob is not what the
            # manifest says, even if the first `size` bytes happen to hash right.
            extra = b""
            try:
                assert self._resp is not None
                extra = self._resp.read(1)
            except _net_errors():
                extra = b""
            if extra:
                self._fail(
                    DigestMismatch(
                        f"{self._what}: blob is larger than its declared size {self.size}"
                    )
                )
        elif self._pos >= self._limit:
            self._fail(
                RegistryError(
                    f"{self._what}: blob larger than {self._limit} bytes without a declared size"
                )
            )
        actual = self._hasher.hexdigest()
        if actual != self._hex:
            alg = self.digest.partition(":")[0]
            self._fail(DigestMismatch(f"{self._what}: digest mismatch: content is {alg}:{actual}"))
        self._verified = True
        if self._resp is not None:
            self._resp.release_conn()
            self._resp = None

    def finish(self) -> None:
        """Read the rest (unhashed tail a consumer did not need) and verify."""
        while not self._verified:
            if not self.read(_CHUNK) and not self._verified:
                raise RegistryError(f"{self._what}: download incomplete")

    @property
    def verified(self) -> bool:
        return self._verified

    def abort(self) -> None:
        """End the download from another thread (see the class docstring):
        the connection is shut down under the reading thread."""
        self._aborted = True
        resp = self._resp
        if resp is not None:
            _shut_down(resp)

    def close(self) -> None:
        if self._resp is not None:
            # Unread data: do not return the connection to the pool half-read.
            self._resp.close()
            self._resp = None
        super().close()


# ---------------------------------------------------------------- ImageSource


class RegistrySource(BaseSource):
    """`transports.ImageSource` for ``docker://REF``."""

    def __init__(self, reference: Reference | str, options: RegistryOptions | None = None) -> None:
        self.ref = reference if isinstance(reference, Reference) else parse_reference(reference)
        self.options = opts = options or RegistryOptions()
        self._reference = "docker://" + str(self.ref)
        if opts.creds is not None:
            creds: _auth.Credentials | None = _auth.parse_creds(opts.creds)
        else:
            creds = _auth.load_credentials(
                self.ref.registry, self.ref.repository, auth_file=opts.auth_file, env=opts.env
            )
        self.client = RegistryClient(self.ref.registry, credentials=creds, options=opts)
        self.manifest_digest: str | None = None

    @property
    def reference(self) -> str:
        return self._reference

    @property
    def max_workers(self) -> int:
        return self.options.max_workers

    def get_manifest(self, digest: str | None = None) -> tuple[bytes, str | None]:
        raw, media_type, got = self.client.get_manifest(self.ref.repository, digest or self.ref.ref)
        if digest is None:
            self.manifest_digest = got
        return raw, media_type

    def open_blob(self, digest: str, size: int | None = None) -> BinaryIO:
        """The `ImageSource` call: a `BlobStream` (typed as a plain binary stream)."""
        return cast(BinaryIO, self.open_blob_stream(digest, size))

    def open_blob_stream(self, digest: str, size: int | None = None) -> BlobStream:
        return self.client.open_blob(self.ref.repository, digest, size)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RegistrySource:
        return self


def _conforms(source: RegistrySource) -> ImageSource:
    return source  # mypy checks that RegistrySource implements the protocol


def open_source(ref: str, options: RegistryOptions | None = None, **kwargs: Any) -> RegistrySource:
    """Open ``[docker://]REF``; `kwargs` are `RegistryOptions` fields."""
    if kwargs:
        base = options or RegistryOptions()
        try:
            options = RegistryOptions(**{**base.__dict__, **kwargs})
        except TypeError as e:
            raise OciError(f"bad registry option: {e}") from None
    return RegistrySource(ref, options)


# ---------------------------------------------------------------- copying to a registry


def push_image(
    source: ImageSource,
    dest: str | Reference,
    options: RegistryOptions | None = None,
    *,
    platform: Platform | None = None,
) -> str:
    """Copy the image `source` names to ``docker://DEST`` (like ``skopeo copy --all``).

    An index is copied whole (every child manifest by digest, then the
    index) unless `platform` picks one image from it. Blobs the registry
    already has are not sent; raw manifest bytes are kept, so digests do not
    change. Returns the digest the destination tag (or digest) now names.
    """
    ref = dest if isinstance(dest, Reference) else parse_reference(dest)
    opts = options or RegistryOptions()
    if opts.creds is not None:
        creds: _auth.Credentials | None = _auth.parse_creds(opts.creds)
    else:
        creds = _auth.load_credentials(
            ref.registry, ref.repository, auth_file=opts.auth_file, env=opts.env
        )
    client = RegistryClient(ref.registry, credentials=creds, options=opts)
    repo = ref.repository
    # Same registry, other repository: ask it to mount blobs instead of
    # sending them again (what skopeo does too).
    mount_from = None
    if isinstance(source, RegistrySource) and source.ref.registry == ref.registry:
        if source.ref.repository != repo:
            mount_from = source.ref.repository

    def fetch(digest: str | None, declared: str | None) -> tuple[bytes, str]:
        raw, mt = source.get_manifest(digest)
        if len(raw) > MAX_JSON_SIZE:
            raise OciError("manifest is too large")
        if digest is not None:
            alg, _ = parse_digest(digest)
            if f"{alg}:" + hashlib.new(alg, raw).hexdigest() != digest:
                raise DigestMismatch(
                    f"{source.reference}: manifest {digest} does not match its digest"
                )
        return raw, detect_media_type(raw, mt or declared)

    def copy_blobs(raw: bytes, media_type: str) -> None:
        manifest = ImageManifest.parse(raw, media_type)
        blobs = {d.digest: d for d in (manifest.config, *manifest.layers)}

        def one(d: Any) -> bool:
            return client.push_blob(
                repo,
                d.digest,
                d.size,
                lambda: source.open_blob(d.digest, d.size),
                mount_from=mount_from,
            )

        fetch_parallel(list(blobs.values()), one, opts.max_workers)

    try:
        raw, media_type = fetch(None, None)
        if media_type in INDEX_MEDIA_TYPES and platform is not None:
            entry = select_platform(parse_index(raw), platform)
            raw, media_type = fetch(entry.digest, entry.media_type or None)
        if media_type in INDEX_MEDIA_TYPES:
            for entry in parse_index(raw):
                child, child_type = fetch(entry.digest, entry.media_type or None)
                if child_type in INDEX_MEDIA_TYPES:
                    raise OciError("nested indexes are not supported when pushing")
                copy_blobs(child, child_type)
                client.push_manifest(repo, entry.digest, child, child_type)
        elif media_type in MANIFEST_MEDIA_TYPES:
            copy_blobs(raw, media_type)
        else:
            raise OciError(f"cannot push a manifest of type {media_type!r}")
        return client.push_manifest(repo, ref.ref, raw, media_type)
    finally:
        client.close()


# ---------------------------------------------------------------- parallel fetch

T = TypeVar("T")
D = TypeVar("D")


def fetch_parallel(items: Iterable[D], work: Callable[[D], T], max_workers: int = 4) -> list[T]:
    """Run `work` over `items` on a bounded thread pool; results in input order.

    The first failure cancels everything not yet started and is re-raised
    (the others' results are dropped), so a pull fails fast and cleanly.
    """
    todo = list(items)
    if max_workers <= 1 or len(todo) <= 1:
        return [work(x) for x in todo]
    results: dict[int, T] = {}
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="oci-fetch") as pool:
        futures: dict[Future[T], int] = {pool.submit(work, x): i for i, x in enumerate(todo)}
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                for p in pending:
                    p.cancel()
                raise f.exception()  # type: ignore[misc]
        for f in futures:
            results[futures[f]] = f.result()
    return [results[i] for i in range(len(todo))]
