"""The HTTP transport of composefs fetch: a bounded urllib3 connection pool
(HTTP/1.1 keep-alive), TLS and proxies as for OCI registries (`composefs._net`),
redirects followed by hand (credentials stay with the repository's origin),
retries with exponential backoff on transient failures, and response bodies
read under a size limit and a per-transfer deadline, optionally verified
against an fs-verity digest as they stream in.
"""

from __future__ import annotations

import base64
import os
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from .. import _net, fsverity
from ..errors import HttpError, HttpNotFound
from . import core

if TYPE_CHECKING:
    import ssl

    import urllib3

T = TypeVar("T")
USER_AGENT = "composefs-py/0.1 (cfsctl fetch)"
_CHUNK = 256 * 1024


class _Transient(Exception):
    """A failure worth retrying (network error, 5xx, truncated body)."""


@dataclass
class HttpOptions:
    """Tunables of `HttpClient` (the CLI flags map 1:1; TLS and proxy options
    mean what they mean for `composefs.oci.registry.RegistryOptions`).

    `creds` (``USER:PASS``, or from the URL's userinfo) is sent as HTTP Basic
    auth to the repository URL's own origin only, never to a redirect target
    on another host. `transfer_timeout` bounds one whole response (a server
    that drips an endless body is cut off); `max_stream_size` bounds a stream
    body, `max_object_size` an object.
    """

    creds: str | None = None
    tls_verify: bool = True
    cert_dir: str | None = None
    ca_file: str | None = None
    certs_d: tuple[str, ...] = ("/etc/containers/certs.d", "/etc/docker/certs.d")
    proxy: str | None = None
    env: Mapping[str, str] | None = field(default=None, repr=False)
    retries: int = 4
    backoff: float = 0.25
    max_backoff: float = 8.0
    connect_timeout: float = 30.0
    read_timeout: float = 60.0
    transfer_timeout: float = 900.0
    # Parallel requests hide a real network's round trips (5,000 small
    # objects one after another at 20 ms each take 100 s). On loopback they
    # only cost CPU: bench_http on 2 CPUs, --jobs 1 3.3 s of CPU, 32 7.4 s.
    max_workers: int = 32
    max_stream_size: int = 256 << 20
    max_object_size: int = 1 << 40


class Body:
    """A response body as a binary file: reads are bounded by `limit` and the
    deadline; with `expected_id` the fs-verity digest is computed on the way
    and checked as soon as the last byte is read — before a caller that
    stores it can link the object in."""

    def __init__(
        self,
        client: HttpClient,
        resp: urllib3.BaseHTTPResponse,
        url: str,
        *,
        limit: int,
        deadline: float,
        expected_id: str | None = None,
        algorithm: str = "sha256",
    ) -> None:
        self._client = client
        self._resp = resp
        self.url = url
        self._limit = limit
        self._deadline = deadline
        self.position = 0
        encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
        if encoding not in ("identity", "gzip", "deflate", "x-gzip"):
            raise HttpError(f"{url}: unsupported Content-Encoding {encoding!r}")
        # A declared length describes the encoded body: only usable unencoded.
        self.length = (
            core.parse_content_length(resp.headers.get("Content-Length"))
            if encoding == "identity"
            else None
        )
        if self.length is not None and self.length > limit:
            raise HttpError(f"{url}: body of {self.length} bytes exceeds the limit of {limit}")
        self._expected = expected_id
        self._hasher = fsverity.FsVerityHasher(algorithm) if expected_id is not None else None
        self._checked = False
        self.content_type = resp.headers.get("Content-Type")

    def read(self, n: int = -1) -> bytes:
        if self._checked:
            return b""
        self._client.check_cancel()
        if time.monotonic() > self._deadline:
            raise HttpError(
                f"{self.url}: transfer took longer than "
                f"{self._client.options.transfer_timeout:g} s; giving up"
            )
        want = _CHUNK if n is None or n < 0 else min(n, _CHUNK)
        if self.length is not None:
            want = min(want, self.length - self.position)
        try:
            # read1: whatever has arrived (read(n) would wait for all n
            # bytes, so a server dripping a byte at a time would never be
            # cut off by the deadline).
            data = self._resp.read1(want) if want > 0 else b""
        except _net.net_errors() as e:
            raise _Transient(f"{self.url}: {_net.describe(e)}") from None
        self.position += len(data)
        if self.position > self._limit:
            raise HttpError(f"{self.url}: body exceeds the limit of {self._limit} bytes")
        if self._hasher is not None and data:
            self._hasher.update(data)
        if not data or (self.length is not None and self.position == self.length):
            self._finish()
        return data

    def _finish(self) -> None:
        if self.length is not None and self.position < self.length:
            raise _Transient(
                f"{self.url}: body truncated at {self.position} of {self.length} bytes"
            )
        if self._hasher is not None and not self._checked:
            got = self._hasher.hexdigest()
            if got != self._expected:
                raise HttpError(
                    f"{self.url}: content has fs-verity digest {got}, not the id it is served as"
                )
        self._checked = True

    def read_all(self) -> bytes:
        parts = []
        while chunk := self.read():
            parts.append(chunk)
        return b"".join(parts)


class HttpClient:
    """GETs of paths under one repository URL; thread-safe (one pool shared
    by up to `options.max_workers` threads, each with a kept-alive connection)."""

    def __init__(
        self,
        url: str,
        options: HttpOptions | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        cancel: threading.Event | None = None,
    ) -> None:
        import ssl

        import urllib3

        self.options = opts = options or HttpOptions()
        p = urllib.parse.urlsplit(url)
        creds = opts.creds
        if p.username is not None:
            # Userinfo leaves the URL (never logged) and becomes Basic auth.
            if creds is None:
                creds = urllib.parse.unquote(p.username)
                if p.password is not None:
                    creds += ":" + urllib.parse.unquote(p.password)
            netloc = p.netloc.rsplit("@", 1)[1]
            url = urllib.parse.urlunsplit(p._replace(netloc=netloc))
        self.base = core.base_url(url)
        self._auth: str | None = None
        if creds:
            self._auth = "Basic " + base64.b64encode(creds.encode()).decode()
        self._sleep = sleep
        self.cancel = cancel or threading.Event()
        # Responses whose bodies are being read, for `abort`.
        self._reading: set[urllib3.BaseHTTPResponse] = set()
        self._reading_lock = threading.Lock()
        # A mistyped path is reported now, not at the first HTTPS request.
        if opts.cert_dir and not os.path.isdir(opts.cert_dir):
            raise HttpError(f"certificate directory not found: {opts.cert_dir}")
        if opts.ca_file and not os.path.isfile(opts.ca_file):
            raise HttpError(f"CA file not found: {opts.ca_file}")
        self._tls_lock = threading.Lock()
        self._ssl_context: ssl.SSLContext | None = None
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._pool = _net.bound_heads(
            urllib3.PoolManager(
                num_pools=4,
                maxsize=max(1, opts.max_workers),
                block=True,  # at most max_workers connections per host, reused
                cert_reqs=ssl.CERT_REQUIRED if opts.tls_verify else ssl.CERT_NONE,
                assert_hostname=None if opts.tls_verify else False,
                retries=False,
                timeout=urllib3.Timeout(connect=opts.connect_timeout, read=opts.read_timeout),
                headers={"User-Agent": USER_AGENT, "Accept-Encoding": "gzip"},
            )
        )
        if not opts.tls_verify:
            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)

    def close(self) -> None:
        self._pool.clear()
        for mgr in self._proxied.values():
            mgr.clear()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise HttpError("fetch cancelled")

    def abort(self) -> None:
        """Cancel (see `cancel`), and wake the transfers waiting on a silent
        connection: each fails at once instead of at the read timeout."""
        self.cancel.set()
        with self._reading_lock:
            reading = list(self._reading)
        for resp in reading:
            _net.shut_down(resp)

    # -- sending -------------------------------------------------------------

    def _manager(self, url: str) -> urllib3.PoolManager:
        if url.startswith("https:"):
            with self._tls_lock:
                if self._ssl_context is None:
                    _, host, port = _net.origin(url)
                    self._ssl_context = _net.make_ssl_context(
                        self.options, f"{host}:{port}", HttpError
                    )
                    for pool in (self._pool, *self._proxied.values()):
                        pool.connection_pool_kw["ssl_context"] = self._ssl_context
        proxy = _net.proxy_for(url, self.options)
        if proxy is None:
            return self._pool
        with self._tls_lock:
            mgr = self._proxied.get(proxy)
            if mgr is None:
                mgr = self._proxy_manager(proxy)
                self._proxied[proxy] = mgr
            return mgr

    def _proxy_manager(self, proxy: str) -> urllib3.ProxyManager:
        return _net.proxy_manager(proxy, self._pool, 4, HttpError)

    def _open(self, relpath: str) -> tuple[urllib3.BaseHTTPResponse, str]:
        """One attempt: GET `relpath`, following redirects. Returns the 200
        response (body unread) and its final URL; raises `_Transient` for
        what a retry may fix."""
        url = core.url_for(self.base, relpath)
        first = url
        for _hop in range(core.MAX_REDIRECTS + 1):
            self.check_cancel()
            headers = {}
            if self._auth is not None and _net.origin(url) == _net.origin(self.base):
                headers["Authorization"] = self._auth
            try:
                resp = self._manager(url).request(
                    "GET",
                    url,
                    headers=headers,
                    redirect=False,
                    retries=False,
                    preload_content=False,
                    decode_content=True,
                )
            except _net.net_errors() as e:
                raise _Transient(f"{url}: {_net.describe(e)}") from None
            except _net.ssl_error_cls() as e:
                raise HttpError(f"{url}: TLS error: {_net.describe(e)}") from None
            action = core.classify(resp.status)
            if action is core.Action.OK:
                return resp, url
            location = resp.headers.get("Location")
            reason = resp.reason or ""
            _release(resp)
            if action is core.Action.REDIRECT:
                url = core.redirect_target(url, location)
                continue
            if action is core.Action.RETRY:
                raise _Transient(f"{url}: HTTP {resp.status} {reason}".rstrip())
            if action is core.Action.NOT_FOUND:
                raise HttpNotFound(f"{url}: not found (HTTP {resp.status})")
            raise HttpError(f"{url}: HTTP {resp.status} {reason}".rstrip())
        raise HttpError(f"{first}: more than {core.MAX_REDIRECTS} redirects (a redirect loop?)")

    def get(
        self,
        relpath: str,
        consume: Callable[[Body], T],
        *,
        limit: int,
        expected_id: str | None = None,
        algorithm: str = "sha256",
    ) -> T:
        """GET `relpath` and hand its body to `consume`; the whole exchange
        (request and body) is retried with backoff on transient failures,
        so `consume` must start over cleanly when called again."""
        attempt = 0
        while True:
            try:
                resp, url = self._open(relpath)
                with self._reading_lock:
                    self._reading.add(resp)
                try:
                    if self.cancel.is_set():  # an abort that missed it
                        _net.shut_down(resp)
                    body = Body(
                        self,
                        resp,
                        url,
                        limit=limit,
                        deadline=time.monotonic() + self.options.transfer_timeout,
                        expected_id=expected_id,
                        algorithm=algorithm,
                    )
                    return consume(body)
                finally:
                    with self._reading_lock:
                        self._reading.discard(resp)
                    _release(resp)
            except _Transient as e:
                attempt += 1
                if attempt > self.options.retries:
                    raise HttpError(f"{e} (gave up after {attempt} attempts)") from None
                self._backoff(attempt)

    def _backoff(self, attempt: int) -> None:
        delay = min(self.options.backoff * (2 ** (attempt - 1)), self.options.max_backoff)
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            self.check_cancel()
            self._sleep(min(left, 0.1))


def _release(resp: urllib3.BaseHTTPResponse) -> None:
    """Give the connection back to the pool. A small unread rest (an error
    page, a redirect body) is drained so the connection stays alive; an
    unknown or large rest closes it (draining an endless body never ends)."""
    remaining = getattr(resp, "length_remaining", None)
    try:
        if remaining is not None and remaining <= 65536:
            resp.drain_conn()
        elif remaining != 0 and not resp.closed:
            resp.close()
        resp.release_conn()
    except Exception:  # a broken connection is simply dropped
        resp.close()
