"""Network plumbing shared by the HTTP clients (OCI registries, composefs
HTTP fetch): TLS contexts with the podman/docker CA conventions, proxy
selection (``https_proxy``/``no_proxy``), loopback detection and one-line
descriptions of urllib3's nested exceptions."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import ssl
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from .errors import ComposefsError

if TYPE_CHECKING:
    import urllib3

_M = TypeVar("_M", bound="urllib3.PoolManager")


class NetOptions(Protocol):
    """What `proxy_for` and `make_ssl_context` read from a client's options."""

    tls_verify: bool
    cert_dir: str | None
    ca_file: str | None
    certs_d: tuple[str, ...]
    proxy: str | None
    env: Mapping[str, str] | None


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and localhost: where plain HTTP is acceptable."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(
        ".localhost"
    ):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def no_proxy_match(host: str, port: int, no_proxy: str) -> bool:
    """curl-style ``no_proxy``: ``*``, host names matching themselves and
    their subdomains (a leading ``.`` or ``*.`` is optional), ``host:port``,
    and IP addresses or CIDR networks."""
    host = host.lower().strip("[]")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if ip is not None:
            try:
                if ip in ipaddress.ip_network(entry.strip("[]"), strict=False):
                    return True
                continue
            except ValueError:
                pass  # not an address: maybe host:port
        name, _, eport = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if eport and eport.isdigit():
            if int(eport) != port:
                continue
            entry = name
        entry = entry.removeprefix("*").removeprefix(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


def proxy_for(url: str, options: NetOptions) -> str | None:
    """The proxy URL to use for `url`, or None for a direct connection."""
    if options.proxy is not None:
        return options.proxy or None
    scheme, host, port = origin(url)
    if is_loopback(host):
        return None
    env = os.environ if options.env is None else options.env

    def get(name: str) -> str:
        return env.get(name) or env.get(name.upper()) or ""

    proxy = get(f"{scheme}_proxy") or get("all_proxy")
    if not proxy or no_proxy_match(host, port, get("no_proxy")):
        return None
    return proxy if "://" in proxy else "http://" + proxy


def proxy_manager(
    proxy: str, like: urllib3.PoolManager, num_pools: int, error: type[ComposefsError]
) -> urllib3.ProxyManager:
    """A pool manager sending through `proxy` (``http[s]://[USER:PASS@]HOST:PORT``,
    credentials as Proxy-Authorization), with `like`'s headers and
    connection settings (TLS context, timeouts, retries)."""
    import urllib3

    parsed = urllib.parse.urlsplit(proxy)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise error(f"unsupported proxy URL {redact(proxy)!r} (use http://HOST:PORT)")
    proxy_headers = None
    if parsed.username:
        user = urllib.parse.unquote(parsed.username)
        password = urllib.parse.unquote(parsed.password or "")
        proxy_headers = urllib3.make_headers(proxy_basic_auth=f"{user}:{password}")
    netloc = parsed.hostname if ":" not in parsed.hostname else f"[{parsed.hostname}]"
    if parsed.port:
        netloc += f":{parsed.port}"
    return bound_heads(
        urllib3.ProxyManager(
            f"{parsed.scheme}://{netloc}",
            num_pools=num_pools,
            headers=like.headers,
            proxy_headers=proxy_headers,
            **dict(like.connection_pool_kw),
        )
    )


def bound_heads(manager: _M) -> _M:
    """`manager`, with pools whose responses must bring their status line
    and headers within one read timeout in total (see `_headers`)."""
    from . import _headers

    manager.pool_classes_by_scheme = dict(_headers.POOL_CLASSES)
    return manager


def make_ssl_context(
    opts: NetOptions, hostport: str, error: type[ComposefsError] = ComposefsError
) -> ssl.SSLContext:
    """The TLS context for `hostport`: system CAs (``SSL_CERT_FILE``/``SSL_CERT_DIR``),
    `opts.ca_file`, `opts.cert_dir` and ``<certs_d>/HOST:PORT`` CAs and client
    certificates, or no verification at all without `opts.tls_verify`."""
    ctx = ssl.create_default_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR
    if not opts.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    dirs: list[Path] = []
    if opts.cert_dir:
        d = Path(opts.cert_dir)
        if not d.is_dir():
            raise error(f"certificate directory not found: {d}")
        dirs.append(d)
    for base in opts.certs_d:
        d = Path(base) / hostport
        if d.is_dir():
            dirs.append(d)
    try:
        if opts.ca_file:
            ctx.load_verify_locations(cafile=opts.ca_file)
        for d in dirs:
            for crt in sorted(d.glob("*.crt")):
                ctx.load_verify_locations(cafile=str(crt))
            for cert in sorted(d.glob("*.cert")):
                key = cert.with_suffix(".key")
                if not key.exists():
                    raise error(f"client certificate {cert} has no matching {key.name}")
                ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        raise error(f"cannot load TLS certificates: {e}") from None
    return ctx


def socket_of(resp: urllib3.BaseHTTPResponse) -> socket.socket | None:
    """The socket a response body is read from: the connection's, or (once
    http.client detached it for a ``Connection: close`` answer) the one
    under the response's own file object."""
    sock = getattr(getattr(resp, "connection", None), "sock", None)
    if sock is None:
        raw = getattr(getattr(getattr(resp, "_fp", None), "fp", None), "raw", None)
        sock = getattr(raw, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


def shut_down(resp: urllib3.BaseHTTPResponse) -> None:
    """Shut down the connection under `resp` (from any thread): a read
    waiting on it returns at once."""
    sock = socket_of(resp)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def net_errors() -> tuple[type[BaseException], ...]:
    import http.client

    import urllib3.exceptions as ue

    return (
        ue.ProtocolError,
        ue.TimeoutError,
        ue.NewConnectionError,
        ue.ProxyError,
        ue.DecodeError,
        http.client.HTTPException,
        ConnectionError,
        socket.timeout,
    )


def ssl_error_cls() -> type[BaseException]:
    import urllib3.exceptions as ue

    return ue.SSLError


def describe(e: BaseException) -> str:
    """One line for a network exception (urllib3's are verbose and nested)."""
    inner: BaseException = e
    for attr in ("reason", "__context__"):
        nxt = getattr(inner, attr, None)
        if isinstance(nxt, BaseException):
            inner = nxt
    text = str(inner) or type(inner).__name__
    if isinstance(e, ssl_error_cls()) and e.args and isinstance(e.args[0], BaseException):
        text = str(e.args[0])
    # urllib3 prefixes "<HTTPConnection object at 0x..>: "
    text = re.sub(r"<[^>]*object at 0x[0-9a-f]+>:\s*", "", text)
    return " ".join(text.split())


def is_cert_failure(e: BaseException) -> bool:
    for cand in (e, *(e.args or ())):
        if isinstance(cand, ssl.SSLCertVerificationError):
            return True
    return "CERTIFICATE_VERIFY_FAILED" in str(e)


def redact(url: str) -> str:
    """A URL without its password (for messages)."""
    p = urllib.parse.urlsplit(url)
    if p.password is None:
        return url
    return p._replace(netloc=p.netloc.replace(":" + p.password + "@", ":***@")).geturl()


def origin(url: str) -> tuple[str, str, int]:
    p = urllib.parse.urlsplit(url)
    port = p.port or (443 if p.scheme == "https" else 80)
    return p.scheme, (p.hostname or "").lower(), port
