"""The transport of ``cfsctl varlink``: the wire format (checked byte by byte
with the raw client), introspection against the reference's interface,
protocol errors that never end the service, socket permissions, systemd
socket activation (the real ``systemd-socket-activate``) and the shipped
unit pair."""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from varlinklib import (
    CFSCTL,
    Service,
    cfsctl,
    need_systemd_socket_activate,
    wait_for_socket,
)
from vlclient import RawClient

import varlink
from composefs.varlink import server as vlserver

REPO = "org.composefs.Repository"
OCI = "org.composefs.Oci"
SERVICE = "org.varlink.service"
ROOT = Path(__file__).resolve().parents[2]

# The reference's wire signatures (composefs-rs crates/composefs-ctl/src/
# varlink.rs: parameter and reply field names in order, with varlink types;
# error names and fields) for the methods this service implements.
REFERENCE: dict[str, dict[str, Any]] = {
    REPO: {
        "methods": {
            "InitRepository": ("path: string, algorithm: ?string, insecure: ?bool",
                               "created: bool"),
            "EnsureRepository": ("path: string, algorithm: ?string, insecure: ?bool",
                                 "status: EnsureStatus"),
            "OpenRepository": ("path: ?string, user: ?bool, system: ?bool",
                               "handle: int, hash_algorithm: ?string, objects_device_id: ?int"),
            "CloseRepository": ("handle: int", ""),
            "Fsck": ("handle: int, metadata_only: ?bool",
                     "ok: bool, has_metadata: bool, objects_checked: int, objects_corrupted: int, "
                     "streams_checked: int, streams_corrupted: int, images_checked: int, "
                     "images_corrupted: int, broken_links: int, missing_objects: int, "
                     "errors: []string"),
            "Gc": ("handle: int, dry_run: bool, roots: []string", "result: GcResult, dry_run: bool"),
            "ImageObjects": ("handle: int, name: string", "object_ids: []string"),
            "ListImageRefs": ("handle: int", "images: []ImageRefEntry"),
            "Mount": ("handle: int, name: string, options: MountParams", "fd_index: int"),
        },
        "errors": {
            "RepoNotFound": "message: string", "InvalidHandle": "handle: int",
            "InvalidSpec": "message: string", "NoSuchRef": "reference: string",
            "InternalError": "message: string",
        },
    },
    OCI: {
        "methods": {
            "ListImages": ("handle: int, filter: ?string", "images: []ImageEntry"),
            "Check": ("handle: int, image: ?string",
                      "ok: bool, images_checked: int, images_corrupted: int, errors: []string, "
                      "repo: FsckReply"),
            "Inspect": ("handle: int, image: string",
                        "manifest: string, config: string, referrers: []string, "
                        "composefs_erofs: ?string, composefs_boot_erofs: ?string"),
            "Tag": ("handle: int, manifest_digest: string, name: string", ""),
            "Untag": ("handle: int, name: string", ""),
            "ComputeId": ("handle: int, image: string, verity: ?string, bootable: bool",
                          "image_id: string"),
            "Pull": ("handle: int, image: string, name: ?string, local_fetch: string, "
                     "storage_root: ?string, bootable: bool",
                     "started: ?Started, progress: ?Progress, skipped: ?Skipped, done: ?Done, "
                     "message: ?string, completed: ?Completed"),
            "OciMount": ("handle: int, image: string, bootable: bool, options: MountParams",
                         "fd_index: int"),
        },
        "errors": {
            "RepoNotFound": "message: string", "InvalidHandle": "handle: int",
            "NoSuchImage": "image: string", "InternalError": "message: string",
        },
    },
}  # fmt: skip


@pytest.fixture
def raw(service: Service) -> Iterator[RawClient]:
    with RawClient(service.socket) as c:
        yield c


# -- wire format ------------------------------------------------------------------


def test_wire_format(raw: RawClient) -> None:
    """Replies are single JSON objects, each terminated by one NUL; two
    calls in one write get two replies, in order."""
    raw.send_raw(
        b'{"method":"org.varlink.service.GetInfo"}\0'
        b'{"method":"org.varlink.service.GetInterfaceDescription",'
        b'"parameters":{"interface":"org.composefs.Oci"}}\0'
    )
    first = raw.recv_raw()
    assert b"\0" not in first and first.startswith(b"{")
    info = json.loads(first)
    assert set(info) == {"parameters"}
    assert info["parameters"] == {
        "vendor": "org.composefs", "product": "cfsctl", "version": info["parameters"]["version"],
        "url": "https://github.com/composefs/composefs-rs",
        "interfaces": [OCI, REPO, SERVICE],
    }  # fmt: skip
    second = json.loads(raw.recv_raw())
    assert second["parameters"]["description"].startswith("interface org.composefs.Oci\n")
    # Errors: {"error": NAME, "parameters": {...}}, also NUL-terminated.
    raw.send_raw(
        b'{"method":"org.composefs.Repository.CloseRepository","parameters":{"handle":77}}\0'
    )
    assert json.loads(raw.recv_raw()) == {
        "error": f"{REPO}.InvalidHandle", "parameters": {"handle": 77},
    }  # fmt: skip
    # oneway: no reply at all; the next call's reply comes next.
    raw.send(f"{SERVICE}.GetInfo", oneway=True)
    raw.send(f"{REPO}.CloseRepository", {"handle": 78})
    assert json.loads(raw.recv_raw())["parameters"] == {"handle": 78}


def test_streamed_frames_have_continues(raw: RawClient, tmp_path: Path, layout: Any) -> None:
    repo = tmp_path / "repo"
    cfsctl("--repo", str(repo), "init", "--insecure")
    h = raw.call(f"{REPO}.OpenRepository", {"path": str(repo)})["handle"]
    raw.send(f"{OCI}.Pull", {"handle": h, "image": layout.ref("two"), "name": "two",
                             "local_fetch": "auto", "bootable": False}, more=True)  # fmt: skip
    replies = []
    while True:
        reply = json.loads(raw.recv_raw())
        replies.append(reply)
        if not reply.get("continues"):
            break
    assert all(r["continues"] is True for r in replies[:-1]) and len(replies) > 2
    assert "completed" in replies[-1]["parameters"]
    assert replies[-1].get("continues", False) is False


# -- introspection ------------------------------------------------------------------


@pytest.mark.parametrize("interface", [REPO, OCI])
def test_interface_description(service: Service, interface: str) -> None:
    """GetInterfaceDescription serves the pinned text; it parses (with the
    `varlink` package) and has the reference's methods, types and errors."""
    with varlink.Client(service.address) as client:
        with client.open(SERVICE) as s:
            text = s.GetInterfaceDescription(interface=interface)["description"]
            assert interface in s.GetInfo()["interfaces"]
    # Pinned here too, so a change to the served text fails until reviewed.
    assert text == (Path(__file__).parent / "idl" / f"{interface}.varlink").read_text()
    parsed = varlink.Interface(text)
    assert parsed.name == interface
    ref = REFERENCE[interface]
    methods = {n: m for n, m in parsed.members.items() if isinstance(m, varlink.scanner._Method)}
    assert list(methods) == list(ref["methods"])
    for name, (params, returns) in ref["methods"].items():
        assert f"method {name}({params}) -> ({returns})" in text
    for name, fields in ref["errors"].items():
        assert f"error {name} ({fields})" in text
    # Every type used is declared, every declared type is used.
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    declared = set(re.findall(r"^type (\w+)", code, re.M))
    used = set(re.findall(r":\s*(?:\?|\[\])*([A-Z]\w*)", code))
    assert declared == used


def test_interface_not_found(raw: RawClient) -> None:
    raw.send(f"{SERVICE}.GetInterfaceDescription", {"interface": "org.example.Nope"})
    assert raw.recv() == {
        "error": f"{SERVICE}.InterfaceNotFound", "parameters": {"interface": "org.example.Nope"},
    }  # fmt: skip


# -- protocol errors never end the service ------------------------------------------


def _error(raw: RawClient) -> tuple[str, dict[str, Any]]:
    reply = raw.recv()
    return reply["error"], reply.get("parameters", {})


def test_unknown_interface_and_method(raw: RawClient) -> None:
    raw.send("org.example.Nope.Call")
    assert _error(raw) == (f"{SERVICE}.InterfaceNotFound", {"interface": "org.example.Nope"})
    raw.send(f"{REPO}.Frobnicate", {})
    assert _error(raw) == (f"{SERVICE}.MethodNotFound", {"method": f"{REPO}.Frobnicate"})
    raw.send(f"{OCI}.Fsck", {"handle": 1})  # a Repository method on the wrong interface
    assert _error(raw) == (f"{SERVICE}.MethodNotFound", {"method": f"{OCI}.Fsck"})
    assert "vendor" in raw.call(f"{SERVICE}.GetInfo")


@pytest.mark.parametrize(
    ("method", "params", "bad"),
    [
        (f"{REPO}.CloseRepository", {"handle": "1"}, "handle"),
        (f"{REPO}.CloseRepository", {"handle": -1}, "handle"),
        (f"{REPO}.CloseRepository", {"handle": 1 << 64}, "handle"),
        (f"{REPO}.CloseRepository", {"handle": 1.5}, "handle"),
        (f"{REPO}.CloseRepository", {"handle": True}, "handle"),
        (f"{REPO}.CloseRepository", {}, "handle"),
        (f"{REPO}.Fsck", {"handle": 1, "metadata_only": 1}, "metadata_only"),
        (f"{REPO}.Gc", {"handle": 1, "dry_run": True, "roots": [1]}, "roots"),
        (f"{REPO}.Gc", {"handle": 1, "dry_run": True, "roots": "x"}, "roots"),
        (f"{REPO}.Gc", {"handle": 1, "roots": []}, "dry_run"),
        (f"{REPO}.Mount", {"handle": 1, "name": "x", "options": []}, "options"),
        (f"{REPO}.Mount", {"handle": 1, "name": "x", "options": {"overlay": "yes"}}, "options"),
        (f"{REPO}.InitRepository", {"path": None}, "path"),
        (f"{OCI}.Pull", {"handle": 1, "image": "x", "local_fetch": "auto"}, "bootable"),
        (f"{OCI}.Tag", {"handle": 1, "manifest_digest": {}, "name": "x"}, "manifest_digest"),
    ],
)
def test_wrong_parameter_types(raw: RawClient, method: str, params: dict[str, Any],
                               bad: str) -> None:  # fmt: skip
    raw.send(method, params, more=method.endswith("Pull"))
    assert _error(raw) == (f"{SERVICE}.InvalidParameter", {"parameter": bad})
    assert "vendor" in raw.call(f"{SERVICE}.GetInfo")  # same connection still works


@pytest.mark.parametrize(
    "message",
    [b"{not json", b"[1,2,3]", b'"a string"', b'{"parameters":{}}', b'{"method":5}',
     b'{"method":"noDots"}', b"\xff\xfe", b'{"method":"org.varlink.service.GetInfo","more":1}'],
)  # fmt: skip
def test_malformed_messages(raw: RawClient, message: bytes) -> None:
    raw.send_raw(message + b"\0")
    error, _params = _error(raw)
    assert error == vlserver.PROTOCOL_VIOLATION
    assert "vendor" in raw.call(f"{SERVICE}.GetInfo")


def test_oversized_message(service: Service) -> None:
    """A message bigger than the cap: an error reply, then the connection
    is closed; the service carries on."""
    with RawClient(service.socket) as c:
        chunk = b"x" * (1 << 20)
        c.send_raw(b'{"method":"org.composefs.Repository.Fsck","parameters":{"pad":"')
        try:
            for _ in range((vlserver.MAX_MESSAGE >> 20) + 2):
                c.send_raw(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert _error(c)[0] == vlserver.PROTOCOL_VIOLATION
        assert c.recv_raw() == b""  # closed
    with RawClient(service.socket) as c:
        assert "vendor" in c.call(f"{SERVICE}.GetInfo")
    assert service.alive()


def test_unexpected_fds_are_closed(raw: RawClient, service: Service) -> None:
    """fds sent with a call that takes none are closed by the service (it
    must not keep a client's files open)."""
    r, w = os.pipe()
    try:
        raw.call(f"{SERVICE}.GetInfo", fds=[r])
        raw.send(f"{REPO}.CloseRepository", {"handle": 5}, fds=[r, r, r])
        assert _error(raw)[0] == f"{REPO}.InvalidHandle"
        os.close(r)
        r = -1
        # Every copy of the read end is gone: writing fails with EPIPE.
        deadline = time.monotonic() + 5
        while True:
            try:
                os.write(w, b"x")
            except BrokenPipeError:
                break
            assert time.monotonic() < deadline, "the service kept a passed fd open"
            time.sleep(0.05)
    finally:
        if r >= 0:
            os.close(r)
        os.close(w)


# -- access ---------------------------------------------------------------------------


def _connect_as_nobody(path: str) -> subprocess.CompletedProcess[str]:
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "try:\n s.connect(sys.argv[1])\n"
        "except PermissionError:\n print('EACCES'); sys.exit(0)\n"
        's.sendall(b\'{"method":"org.varlink.service.GetInfo"}\\0\')\n'
        "print(s.recv(65536).split(b'\\0')[0].decode())\n"
    )
    # The system python: the venv's may not be readable by nobody.
    return subprocess.run(
        ["/usr/bin/python3", "-c", code, path], capture_output=True, text=True, check=True,
        user=65534, group=65534, extra_groups=[],
    )  # fmt: skip


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user can traverse (pytest's are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="cfs-vl-", dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user")
def test_socket_permissions(service: Service, open_dir: Path) -> None:
    """The socket is 0600 by default: another user cannot connect.
    ``--socket-mode 0666`` lets everyone call."""
    assert (os.stat(service.socket).st_mode & 0o777) == 0o600
    closed = str(open_dir / "closed.sock")
    proc = subprocess.Popen([CFSCTL, "varlink", "--address", f"unix:{closed}"])
    try:
        wait_for_socket(closed, proc)
        assert (os.stat(closed).st_mode & 0o777) == 0o600
        assert _connect_as_nobody(closed).stdout.strip() == "EACCES"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    sock = str(open_dir / "open.sock")
    proc = subprocess.Popen([CFSCTL, "varlink", "--address", sock, "--socket-mode", "0666"])
    try:
        wait_for_socket(sock, proc)
        assert (os.stat(sock).st_mode & 0o777) == 0o666
        reply = json.loads(_connect_as_nobody(sock).stdout)
        assert reply["parameters"]["product"] == "cfsctl"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_errors(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    for args, msg in (
        ([], "no --address given and not socket-activated"),
        (["--address", "tcp:127.0.0.1:5"], "unsupported varlink address"),
        (["--address", str(tmp_path / "missing" / "x.sock")], "cannot bind varlink socket"),
        (["--socket-mode", "999"], "invalid"),
    ):
        proc = subprocess.run([CFSCTL, "varlink", *args], capture_output=True, text=True, env=env)
        assert proc.returncode != 0
        assert msg in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 2


# -- systemd socket activation ---------------------------------------------------------


@contextlib.contextmanager
def _activate(
    sock: str, *extra: str, command: list[str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """systemd-socket-activate listening on `sock` for `command`; its
    output is shown when the test fails."""
    ssa = need_systemd_socket_activate()
    cmd = [ssa, "-l", sock, *extra, *(command or [CFSCTL, "varlink"])]
    log = Path(sock + ".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_socket(sock, proc)
        yield proc
    except BaseException:
        print(f"systemd-socket-activate output:\n{log.read_text(errors='replace')}")
        raise
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _exercise(sock: str, tmp_path: Path) -> None:
    with varlink.Client(f"unix:{sock}") as client:
        with client.open(REPO) as r, client.open(OCI) as o:
            path = tmp_path / f"repo-{len(os.listdir(tmp_path))}"
            assert r.InitRepository(path=str(path), insecure=True) == {"created": True}
            h = r.OpenRepository(path=str(path))["handle"]
            assert o.ListImages(handle=h) == {"images": []}
            assert r.Fsck(handle=h)["ok"] is True


def test_socket_activation_listening(tmp_path: Path) -> None:
    """systemd-socket-activate passes the listening socket (Accept=no, the
    shipped unit's mode); cfsctl serves it, for every client, with no
    --address."""
    sock = str(tmp_path / "act.sock")
    with _activate(sock):
        _exercise(sock, tmp_path)
        _exercise(sock, tmp_path)  # same service process, a second client


def test_socket_activation_accept(tmp_path: Path) -> None:
    """--accept: one service instance per connection, on a connected socket."""
    sock = str(tmp_path / "acc.sock")
    with _activate(sock, "--accept"), RawClient(sock) as c:
        assert c.call(f"{SERVICE}.GetInfo")["product"] == "cfsctl"
        repo = tmp_path / "r"
        reply = c.call(f"{REPO}.InitRepository", {"path": str(repo), "insecure": True})
        assert reply == {"created": True}


def test_shipped_units(tmp_path: Path) -> None:
    """dist/systemd: the socket unit listens (0600) where the service
    expects; the service's ExecStart, run under socket activation on that
    socket (moved to a temporary path), serves the API."""
    units = ROOT / "dist" / "systemd"
    sock_unit = configparser.ConfigParser(strict=False, interpolation=None)
    sock_unit.read(units / "composefs-varlink.socket")
    svc_unit = configparser.ConfigParser(strict=False, interpolation=None)
    svc_unit.read(units / "composefs-varlink.service")
    assert sock_unit["Socket"]["ListenStream"] == "/run/composefs/composefs.sock"
    assert sock_unit["Socket"]["SocketMode"] == "0600"
    assert svc_unit["Unit"]["Requires"] == "composefs-varlink.socket"
    exec_start = svc_unit["Service"]["ExecStart"].split()
    assert exec_start[:2] == ["/usr/bin/cfsctl", "varlink"]
    sock = str(tmp_path / "unit.sock")
    with _activate(sock, command=[CFSCTL, *exec_start[1:]]):
        _exercise(sock, tmp_path)


def test_sigterm_removes_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "t.sock")
    proc = subprocess.Popen([CFSCTL, "varlink", "--address", f"unix:{sock}"])
    wait_for_socket(sock, proc)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock)
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    assert not os.path.exists(sock)
