"""Real registries for the OCI tests, all on loopback, all started here.

* `registry_plain`: Debian's ``docker-registry`` (CNCF distribution 2.8),
  plain HTTP. Test images are pushed to it with ``skopeo copy``.
* `registry_auth`: the same storage behind htpasswd basic auth (bcrypt entry
  made by ``htpasswd -B``).
* `registry_tls`: the same storage over HTTPS with a self-signed certificate
  made by ``openssl``; `ca_file` is the CA to trust.
* `front`: a small Python server of our own in front of `registry_plain`
  that speaks bearer-token auth (its own ``/token`` endpoint), redirects blob
  downloads to a second address (127.0.0.2) and injects faults (5xx, dropped
  or short bodies, corrupted or replaced content). It records every request,
  so tests can check which credentials went where.

Everything is session scoped (free ports, temporary storage) and stopped at
the end; `front` resets its faults and logs for every test.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from testlib import drip, free_port, need_tool, wait_for_hangup

OCI_INDEX = "application/vnd.oci.image.index.v1+json"

USER = "cfsuser"
PASSWORD = "cfs-Pa55:word"  # a ':' inside on purpose


# ---------------------------------------------------------------- root helpers


# ---------------------------------------------------------------- processes


def _answers(url: str, ca: str | None = None) -> bool:
    import ssl

    p = urllib.parse.urlsplit(url)
    conn: http.client.HTTPConnection
    if p.scheme == "https":
        ctx = ssl.create_default_context(cafile=ca)
        conn = http.client.HTTPSConnection(p.hostname or "", p.port, timeout=2, context=ctx)
    else:
        conn = http.client.HTTPConnection(p.hostname or "", p.port, timeout=2)
    try:
        conn.request("GET", p.path)
        return conn.getresponse().status in (200, 401)
    except OSError:
        return False
    finally:
        conn.close()


@dataclass
class Registry:
    """One running registry process (or our front server)."""

    host: str  # "127.0.0.1:PORT", what goes into references
    scheme: str
    storage: Path
    proc: subprocess.Popen[bytes] | None = None
    ca_file: str | None = None
    username: str | None = None
    password: str | None = None
    log: Path | None = None

    def ref(self, name: str) -> str:
        return f"{self.host}/{name}"

    @property
    def creds(self) -> str:
        return f"{self.username}:{self.password}"


_REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {storage}
  cache:
    blobdescriptor: inmemory
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: composefs-tests-only
{extra}"""


def _die_with_parent(cmd: list[str]) -> list[str]:
    """`cmd` wrapped so that it gets SIGTERM when the process that started it
    dies: a killed run must not leave a registry listening behind."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd] if setpriv else cmd


def _start_registry(workdir: Path, storage: Path, name: str, extra: str, scheme: str) -> Registry:
    exe = need_tool("docker-registry")
    for _ in range(5):  # a free port can be taken between probe and bind
        port = free_port()
        conf = workdir / f"{name}.yml"
        conf.write_text(_REGISTRY_CONFIG.format(storage=storage, port=port, extra=extra))
        log = workdir / f"{name}.log"
        logf = open(log, "ab")
        proc = subprocess.Popen(
            _die_with_parent([exe, "serve", str(conf)]),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logf.close()
        reg = Registry(f"127.0.0.1:{port}", scheme, storage, proc, log=log)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and proc.poll() is None:
            if _answers(
                f"{scheme}://127.0.0.1:{port}/v2/",
                ca=str(workdir / "tls" / "cert.pem") if scheme == "https" else None,
            ):
                return reg
            time.sleep(0.05)
        _stop(reg)
    raise RuntimeError(
        f"docker-registry {name} did not start; see {log}:\n{log.read_text()[-2000:]}"
    )


def _stop(reg: Registry) -> None:
    proc = reg.proc
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="session")
def registry_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="session")
def registry_plain(registry_workdir: Path) -> Iterator[Registry]:
    storage = registry_workdir / "storage"
    storage.mkdir()
    reg = _start_registry(registry_workdir, storage, "plain", "", "http")
    yield reg
    _stop(reg)


@pytest.fixture(scope="session")
def registry_auth(registry_workdir: Path, registry_plain: Registry) -> Iterator[Registry]:
    htpasswd = need_tool("htpasswd")
    hfile = registry_workdir / "htpasswd"
    # -B: bcrypt, the only hash the registry accepts; -i: password on stdin.
    subprocess.run(
        [htpasswd, "-B", "-i", "-c", str(hfile), USER],
        input=PASSWORD.encode(),
        check=True,
        capture_output=True,
    )
    extra = f"auth:\n  htpasswd:\n    realm: cfs-test-realm\n    path: {hfile}\n"
    reg = _start_registry(registry_workdir, registry_plain.storage, "auth", extra, "http")
    reg.username, reg.password = USER, PASSWORD
    yield reg
    _stop(reg)


@pytest.fixture(scope="session")
def registry_tls(registry_workdir: Path, registry_plain: Registry) -> Iterator[Registry]:
    openssl = need_tool("openssl")
    tls = registry_workdir / "tls"
    tls.mkdir()
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(tls / "key.pem"),
            "-out",
            str(tls / "cert.pem"),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    extra = f"  tls:\n    certificate: {tls / 'cert.pem'}\n    key: {tls / 'key.pem'}\n"
    reg = _start_registry(registry_workdir, registry_plain.storage, "tls", extra, "https")
    reg.ca_file = str(tls / "cert.pem")
    yield reg
    _stop(reg)


# ---------------------------------------------------------------- test images


def _det_bytes(seed: int, n: int) -> bytes:
    """Incompressible but reproducible content (so blobs have real size)."""
    return random.Random(seed).randbytes(n)


def layer(
    files: dict[str, bytes], dirs: tuple[str, ...] = (), symlinks: dict[str, str] | None = None
) -> bytes:
    """An uncompressed layer tar (built with OCI-A's ocitestlib), parents first."""
    import ocitestlib as L

    entries: list[Any] = []
    seen: set[str] = set()

    def add_dir(path: str) -> None:
        parts = [p for p in path.split("/") if p]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in seen:
                seen.add(d)
                entries.append(L.directory(d))

    for d in dirs:
        add_dir(d)
    for name, data in sorted(files.items()):
        add_dir(os.path.dirname(name))
        entries.append(L.file(name, data))
    for name, target in sorted((symlinks or {}).items()):
        add_dir(os.path.dirname(name))
        entries.append(L.symlink(name, target))
    return bytes(L.tar_layer(entries))


class LayoutBuilder:
    """An OCI image layout with tagged images and tagged indexes (on ocitestlib)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        self.index: list[dict[str, Any]] = []

    def image(
        self,
        layers: list[bytes],
        compression: str = "gzip",
        arch: str = "amd64",
        variant: str | None = None,
    ) -> dict[str, Any]:
        """Write config, layers and manifest; return its descriptor (with platform)."""
        import ocitestlib as L

        spec = L.ImageSpec(
            layers, compression=compression, tag=None, architecture=arch, variant=variant
        )
        return dict(L.build_image(self.path, spec).descriptor)

    def tag(self, desc: dict[str, Any], tag: str) -> None:
        entry = {k: v for k, v in desc.items() if k != "platform"}
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        self.index.append(entry)
        (self.path / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self.index})
        )

    def tag_index(self, descs: list[dict[str, Any]], tag: str) -> dict[str, Any]:
        import hashlib

        raw = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descs}, separators=(",", ":")
        ).encode()
        hexd = hashlib.sha256(raw).hexdigest()
        (self.path / "blobs" / "sha256" / hexd).write_bytes(raw)
        d = {"mediaType": OCI_INDEX, "digest": "sha256:" + hexd, "size": len(raw)}
        self.tag(d, tag)
        return d


@dataclass
class PushedImage:
    name: str  # repository:tag inside the registry
    digest: str | None  # manifest (or index) digest, when preserved by the push
    files: dict[str, bytes]  # what the merged image should contain
    layers: list[dict[str, Any]] = field(default_factory=list)


def skopeo_copy(src: str, dest: str, *extra: str) -> None:
    skopeo = need_tool("skopeo")
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    policy = Path(os.environ.get("TMPDIR", "/tmp")) / "cfs-test-skopeo-policy.json"
    if not policy.exists():
        policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
    proc = subprocess.run(
        [
            skopeo,
            "--policy",
            str(policy),
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            *extra,
            src,
            dest,
        ],
        env=env,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"skopeo copy {src} {dest} failed: {proc.stderr.decode(errors='replace')}"
        )


BASE_FILES = {
    "etc/hostname": b"composefs-test\n",
    "usr/bin/tool": _det_bytes(1, 300_000),
    "usr/share/doc/readme": b"read me\n" * 50,
}
TOP_FILES = {"usr/lib/data.bin": _det_bytes(2, 150_000), "etc/motd": b"hello\n"}


@pytest.fixture(scope="session")
def oci_images(
    registry_plain: Registry, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, PushedImage]:
    """Test images pushed to `registry_plain` (and so visible through the others).

    plain    two gzip layers (OCI manifest, digests preserved)
    multi    an index: linux/amd64, linux/arm64/v8, linux/arm/v7
    zstd     one zstd layer
    v2s2     `plain` converted by skopeo to a Docker schema 2 manifest
    """
    layout = tmp_path_factory.mktemp("layout")
    b = LayoutBuilder(layout)
    images: dict[str, PushedImage] = {}

    base = layer(BASE_FILES, dirs=("tmp",), symlinks={"bin": "usr/bin"})
    top = layer(TOP_FILES)
    plain = b.image([base, top])
    b.tag(plain, "plain")
    images["plain"] = PushedImage("test/plain:v1", plain["digest"], {**BASE_FILES, **TOP_FILES})

    arches = [("amd64", None), ("arm64", "v8"), ("arm", "v7")]
    descs = []
    for i, (arch, variant) in enumerate(arches):
        f = {
            "etc/arch": f"{arch}{variant or ''}\n".encode(),
            "usr/bin/tool": _det_bytes(10 + i, 20_000),
        }
        descs.append(b.image([layer(f)], "gzip", arch, variant))
    idx = b.tag_index(descs, "multi")
    images["multi"] = PushedImage("test/multi:v1", idx["digest"], {})
    images["multi"].layers = descs

    zfiles = {"opt/z/data": _det_bytes(3, 100_000), "opt/z/small": b"zstd!\n"}
    zimg = b.image([layer(zfiles)], "zstd")
    b.tag(zimg, "zstd")
    images["zstd"] = PushedImage("test/zstd:v1", zimg["digest"], zfiles)

    host = registry_plain.host
    skopeo_copy(f"oci:{layout}:plain", f"docker://{host}/test/plain:v1", "--preserve-digests")
    skopeo_copy(
        f"oci:{layout}:multi", f"docker://{host}/test/multi:v1", "--all", "--preserve-digests"
    )
    skopeo_copy(f"oci:{layout}:zstd", f"docker://{host}/test/zstd:v1", "--preserve-digests")
    skopeo_copy(f"oci:{layout}:plain", f"docker://{host}/test/v2s2:v1", "--format", "v2s2")
    images["v2s2"] = PushedImage("test/v2s2:v1", None, {**BASE_FILES, **TOP_FILES})
    return images


# ---------------------------------------------------------------- front server


@dataclass
class Fault:
    """One injected misbehaviour. `where`: "front" or "blobs" (the 127.0.0.2 host).

    actions: status (arg: HTTP code), drop (close after `arg` body bytes with
    the full Content-Length announced), short (no Content-Length, close
    after `arg` bytes), corrupt (flip the byte at `arg`), append (arg bytes
    added), replace (arg: (body, content type)), trickle (full
    Content-Length, one byte every `arg` seconds), stall (full
    Content-Length, `arg` bytes, then silence on an open connection), hold
    (like stall, until the test sets `release`, at most 60 s). The token
    endpoint takes status, replace, trickle and stall too.
    """

    where: str
    path: str  # regex searched in the request path
    action: str
    arg: Any = None
    count: int | None = 1  # None: forever
    hits: int = 0
    release: threading.Event = field(default_factory=threading.Event)


@dataclass
class Logged:
    where: str
    method: str
    path: str
    headers: dict[str, str]


class FrontState:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.lock = threading.Lock()
        self.port = 0
        self.blob_port = 0
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.require_token = True
            self.require_creds: tuple[str, str] | None = None
            self.redirect_blobs = False
            self.faults: list[Fault] = []
            self.tokens: set[str] = set()
            self.log: list[Logged] = []
            self.token_requests: list[Logged] = []
            self.honor_range = True
            self.reject_tokens = False  # 401 even for tokens we issued
            self.realm: str | None = None  # the bearer realm to announce instead of ours

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ref(self, name: str) -> str:
        return f"{self.host}/{name}"

    def fault(
        self, where: str, path: str, action: str, arg: Any = None, count: int | None = 1
    ) -> Fault:
        f = Fault(where, path, action, arg, count)
        with self.lock:
            self.faults.append(f)
        return f

    def take_fault(self, where: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if (
                    f.where == where
                    and re.search(f.path, path)
                    and (f.count is None or f.hits < f.count)
                ):
                    f.hits += 1
                    return f
        return None

    def requests(self, where: str | None = None, path: str = "") -> list[Logged]:
        with self.lock:
            return [
                r
                for r in self.log
                if (where is None or r.where == where) and re.search(path, r.path)
            ]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    # -- helpers
    def _send(
        self, status: int, body: bytes, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(
            {"errors": [{"code": code, "message": code.lower().replace("_", " ")}]}
        ).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def _handle(self, method: str) -> None:
        st: FrontState = self.server.state
        where: str = self.server.role
        path, _, query = self.path.partition("?")
        # Read any request body now: a keep-alive connection must not keep it
        # unread when we answer early (401, injected faults).
        self._body = b""
        if method in ("POST", "PUT", "PATCH"):
            self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with st.lock:
            st.log.append(Logged(where, method, self.path, dict(self.headers.items())))
        if path == "/token":
            return self._token(st, query, where)
        if where == "front":
            if not path.startswith("/v2/"):
                return self._error(404, "NOT_FOUND")
            m = re.match(r"/v2/(.+?)/(manifests|blobs|tags)/", path)
            repo = m.group(1) if m else ""
            if st.require_token:
                authz = self.headers.get("Authorization", "")
                valid = authz.startswith("Bearer ") and authz[7:] in st.tokens
                if st.reject_tokens or not valid:
                    actions = "pull" if method in ("GET", "HEAD") else "pull,push"
                    realm = st.realm or f"http://{st.host}/token"
                    challenge = f'Bearer realm="{realm}",service="cfs-test"' + (
                        f',scope="repository:{repo}:{actions}"' if repo else ""
                    )
                    return self._error(401, "UNAUTHORIZED", {"WWW-Authenticate": challenge})
            backend_path = path
            fault = st.take_fault("front", path)
            if fault is not None and fault.action == "status":
                return self._error(int(fault.arg), "INJECTED")
            if fault is not None and fault.action == "trickle-head":
                return self._trickle_head(float(fault.arg))
            bm = re.fullmatch(r"/v2/(.+)/blobs/(sha\d+:[0-9a-f]+)", path)
            if bm and st.redirect_blobs and fault is None and method == "GET":
                loc = f"http://127.0.0.2:{st.blob_port}/blobs/{bm.group(1)}/{bm.group(2)}?sig=x"
                return self._send(307, b"", {"Location": loc})
        else:
            bm = re.fullmatch(r"/blobs/(.+)/(sha\d+:[0-9a-f]+)", path)
            if not bm:
                return self._error(404, "NOT_FOUND")
            backend_path = f"/v2/{bm.group(1)}/blobs/{bm.group(2)}"
            fault = st.take_fault("blobs", path)
            if fault is not None and fault.action == "status":
                return self._error(int(fault.arg), "INJECTED")
        self._proxy(st, method, backend_path, fault)
        return None

    def _token(self, st: FrontState, query: str, where: str = "front") -> None:
        with st.lock:
            st.token_requests.append(Logged(where, "GET", self.path, dict(self.headers.items())))
        if st.require_creds is not None:
            want = "Basic " + base64.b64encode(":".join(st.require_creds).encode()).decode()
            if self.headers.get("Authorization") != want:
                return self._error(401, "UNAUTHORIZED")
        fault = st.take_fault(where, "/token")
        if fault is not None and fault.action == "status":
            return self._error(int(fault.arg), "INJECTED")
        tok = secrets.token_hex(12)
        with st.lock:
            st.tokens.add(tok)
        body = json.dumps({"token": tok, "expires_in": 300}).encode()
        if fault is not None and fault.action == "replace":
            body = fault.arg
        if fault is not None and fault.action in ("trickle", "stall"):
            return self._slow(200, body, {"Content-Type": "application/json"}, fault)
        return self._send(200, body, {"Content-Type": "application/json"})

    def _trickle_head(self, every: float) -> None:
        """The status line, then one header byte every `every` seconds (a
        header line that never ends); gives up after 60 s or when the
        client leaves."""
        self.close_connection = True
        drip(self.wfile, b"HTTP/1.1 200 OK\r\nX-Slow: ", b"a", every, seconds=60)

    def _slow(self, status: int, body: bytes, headers: dict[str, str], fault: Fault) -> None:
        """trickle / stall: the whole Content-Length announced, the body not
        (or only very slowly) sent; gives up after 60 s or when the client leaves."""
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        end = time.monotonic() + 60
        try:
            if fault.action == "stall":
                self.wfile.write(body[: int(fault.arg or 0)])
                self.wfile.flush()
                wait_for_hangup(self.connection)
            else:
                for i in range(len(body)):
                    if time.monotonic() >= end:
                        return
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(float(fault.arg))
        except OSError:
            return

    def _proxy(self, st: FrontState, method: str, path: str, fault: Fault | None) -> None:
        headers = {
            k: v for k, v in self.headers.items() if k.lower() in ("accept", "content-type", "host")
        }
        rng = self.headers.get("Range")
        if rng and st.honor_range:
            headers["Range"] = rng
        body = None
        if method in ("POST", "PUT", "PATCH"):
            body = self._body
            headers["Content-Length"] = str(len(body))
        full = path + ("?" + self.path.partition("?")[2] if "?" in self.path else "")
        conn = http.client.HTTPConnection(st.backend, timeout=30)
        try:
            conn.request(method, full, body=body, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out_headers = {
                k: v
                for k, v in resp.getheaders()
                if k.lower()
                in (
                    "content-type",
                    "docker-content-digest",
                    "content-range",
                    "accept-ranges",
                    "location",
                    "docker-upload-uuid",
                    "range",
                )
            }
            status = resp.status
        finally:
            conn.close()
        if fault is not None:
            if fault.action == "corrupt":
                pos = int(fault.arg or 0) % max(len(body), 1)
                body = body[:pos] + bytes([body[pos] ^ 0xFF]) + body[pos + 1 :]
            elif fault.action == "append":
                body = body + bytes(fault.arg)
            elif fault.action == "replace":
                body, ctype = fault.arg
                out_headers["Content-Type"] = ctype
                out_headers.pop("Docker-Content-Digest", None)
            elif fault.action in ("drop", "short"):
                return self._cut(status, body, out_headers, int(fault.arg), fault.action == "drop")
            elif fault.action in ("trickle", "stall"):
                return self._slow(status, body, out_headers, fault)
            elif fault.action == "hold":
                return self._hold(status, body, out_headers, int(fault.arg), fault.release)
        self._send(status, body, out_headers, method)
        return None

    def _hold(
        self, status: int, body: bytes, headers: dict[str, str], n: int, release: threading.Event
    ) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body[:n])
        self.wfile.flush()
        release.wait(60)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _cut(
        self, status: int, body: bytes, headers: dict[str, str], n: int, with_length: bool
    ) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if with_length:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body[:n])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], state: FrontState, role: str) -> None:
        super().__init__(addr, _Handler)
        self.state = state
        self.role = role


@pytest.fixture(scope="session")
def front_server(registry_plain: Registry) -> Iterator[FrontState]:
    state = FrontState(registry_plain.host)
    front = _Server(("127.0.0.1", 0), state, "front")
    blobs = _Server(("127.0.0.2", 0), state, "blobs")
    state.port = front.server_address[1]
    state.blob_port = blobs.server_address[1]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (front, blobs)]
    for t in threads:
        t.start()
    yield state
    for s in (front, blobs):
        s.shutdown()
        s.server_close()


@pytest.fixture
def front(front_server: FrontState) -> FrontState:
    """The front server with no faults, empty logs, bearer auth on."""
    front_server.reset()
    return front_server


@pytest.fixture
def fast_options() -> Any:
    """Registry options with short backoff so retry tests stay fast."""
    from composefs.oci.registry import RegistryOptions

    return RegistryOptions(backoff=0.01, max_backoff=0.05, retries=3, env={"HOME": "/nonexistent"})


# ---------------------------------------------------------------- forward proxy


class ProxyState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.port = 0
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.log: list[Logged] = []
            self.require_auth: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _ProxyHandler(BaseHTTPRequestHandler):
    """A tiny forward proxy: CONNECT tunnels and absolute-form GET/HEAD."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _allowed(self) -> bool:
        st: ProxyState = self.server.state
        with st.lock:
            st.log.append(Logged("proxy", self.command, self.path, dict(self.headers.items())))
        if st.require_auth is None:
            return True
        want = "Basic " + base64.b64encode(":".join(st.require_auth).encode()).decode()
        if self.headers.get("Proxy-Authorization") == want:
            return True
        self.send_response(407)
        self.send_header("Proxy-Authenticate", 'Basic realm="proxy"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_CONNECT(self) -> None:
        import selectors

        if not self._allowed():
            return
        host, _, port = self.path.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        sel = selectors.DefaultSelector()
        sel.register(self.connection, selectors.EVENT_READ, upstream)
        sel.register(upstream, selectors.EVENT_READ, self.connection)
        try:
            while True:
                for key, _ in sel.select(timeout=30):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            upstream.close()

    def _forward(self) -> None:
        if not self._allowed():
            return
        u = urllib.parse.urlsplit(self.path)
        conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=30)
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("proxy-authorization", "connection")
        }
        try:
            conn.request(self.command, u.path + (f"?{u.query}" if u.query else ""), headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        finally:
            conn.close()

    do_GET = _forward
    do_HEAD = _forward


@pytest.fixture(scope="session")
def proxy_server() -> Iterator[ProxyState]:
    state = ProxyState()
    srv = _Server(("127.0.0.1", 0), state, "proxy")  # type: ignore[arg-type]
    srv.RequestHandlerClass = _ProxyHandler
    state.port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield state
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def proxy(proxy_server: ProxyState) -> ProxyState:
    proxy_server.reset()
    return proxy_server
