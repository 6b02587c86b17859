"""Debian's nginx on 127.0.0.1 serving directories (used by tests/http and bench/bench_http).

`Nginx(workdir).serve(root, link_files=False)` adds a site; `start()` runs
``nginx -p PREFIX -c CONF -g 'daemon off;'`` in its own session (killed with
its parent via setpriv) and waits for every port to answer. The site
configuration is the one the README documents for published trees.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def site_config(
    root: str | Path, port: int, link_files: bool = False, tls: tuple[Path, Path] | None = None
) -> str:
    """A ``server {}`` block serving a published tree (or a repository);
    `tls` is (certificate, key) for HTTPS."""
    links = (
        # Symlinks written as files (publish --link-files) are announced as such.
        "    location /streams/ { types { } default_type text/x-symlink-target; }\n"
        "    location /images/ { types { } default_type text/x-symlink-target; }\n"
        if link_files
        else ""
    )
    ssl = f"    ssl_certificate {tls[0]};\n    ssl_certificate_key {tls[1]};\n" if tls else ""
    return (
        "server {\n"
        f"    listen 127.0.0.1:{port}{' ssl' if tls else ''};\n"
        f"{ssl}"
        f"    root {root};\n"
        "    types { } default_type application/octet-stream;\n"
        "    location / { }\n"
        f"{links}"
        "}\n"
    )


@dataclass
class Nginx:
    workdir: Path
    sites: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    ports: list[int] = field(default_factory=list)

    def serve(
        self, root: str | Path, *, link_files: bool = False, tls: tuple[Path, Path] | None = None
    ) -> str:
        port = free_port()
        self.ports.append(port)
        self.sites.append(site_config(Path(root).resolve(), port, link_files, tls))
        return f"{'https' if tls else 'http'}://127.0.0.1:{port}/"

    def start(self) -> Nginx:
        if NGINX is None:
            raise FileNotFoundError("nginx not installed (apt-get install nginx-light or nginx)")
        prefix = self.workdir
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        tmp = prefix / "tmp"
        user = "user root;\n" if os.geteuid() == 0 else ""
        conf = prefix / "nginx.conf"
        conf.write_text(
            f"{user}worker_processes 2;\npid {prefix}/nginx.pid;\n"
            f"error_log {prefix}/error.log warn;\n"
            "events { worker_connections 1024; }\n"
            "http {\n"
            "    access_log off;\n    sendfile on;\n    tcp_nopush on;\n"
            "    keepalive_requests 100000;\n"
            f"    client_body_temp_path {tmp}/body;\n    proxy_temp_path {tmp}/proxy;\n"
            f"    fastcgi_temp_path {tmp}/fastcgi;\n    uwsgi_temp_path {tmp}/uwsgi;\n"
            f"    scgi_temp_path {tmp}/scgi;\n" + "".join(self.sites) + "}\n"
        )
        setpriv = shutil.which("setpriv")
        cmd = [NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
        if setpriv:
            cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
        log = open(prefix / "stderr.log", "wb")
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 10
        for port in self.ports:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            "nginx did not start: " + (prefix / "stderr.log").read_text()[-2000:]
                        ) from None
                    time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
