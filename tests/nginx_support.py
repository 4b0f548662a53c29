"""A real nginx (Debian's package) in front of a Citadel, both on loopback.

:func:`nginx_proxy` runs the nginx binary as a child process in the
foreground (``nginx -p DIR -c DIR/nginx.conf -e DIR/error.log -g 'daemon off;'``)
with everything it writes inside ``DIR``: pid file, error and access logs,
and every temporary path. Its configuration is the one an operator writes in
front of Citadel: an ``upstream`` block with ``keepalive``, ``proxy_pass``
over HTTP/1.1 with an empty ``Connection`` header (so upstream connections
are kept and reused), a ``client_max_body_size`` above Citadel's largest
body limit, and ``proxy_request_buffering`` either at its default (``on``:
nginx reads the whole body, then sends it) or ``off`` (nginx streams the body
as it arrives, so an early answer races the rest of the body).

``make test`` installs nginx (scripts/ensure-test-packages). Where it is
missing anyway, :func:`nginx_binary` fails the test, except for a user who
is not root, who could not have installed it: a skip that says so.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from support import free_port

NGINX_PATHS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
START_TIMEOUT_S = 10.0


def nginx_binary() -> str:
    """The nginx binary; a test failure when missing (a skip when not root)."""
    found = shutil.which("nginx") or next((p for p in NGINX_PATHS if os.access(p, os.X_OK)), None)
    if found is not None:
        return found
    if os.geteuid() != 0:
        pytest.skip("nginx is not installed and this user cannot install it (make test, as root)")
    pytest.fail("nginx is not installed: run scripts/ensure-test-packages (make test does)")


def _temp_path_directives(binary: str, tmp: Path) -> str:
    """A temporary path inside ``tmp`` for each module this nginx was built with."""
    built = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10).stderr
    lines = [f"client_body_temp_path {tmp}/client_body;", f"proxy_temp_path {tmp}/proxy;"]
    for module in ("fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in built:
            lines.append(f"{module}_temp_path {tmp}/{module};")
    return "\n        ".join(lines)


def nginx_conf(
    tmp: Path, binary: str, listen_port: int, upstream: str, *, request_buffering: bool
) -> str:
    host_port = urlsplit(upstream).netloc
    # As root, the workers would otherwise run as nobody, who cannot enter a
    # 0700 pytest temporary directory; any other user runs them as itself.
    user = "user root root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;

events {{
    worker_connections 256;
}}

http {{
    {_temp_path_directives(binary, tmp)}
    log_format upstream '$status $request_method $request_uri upstream=$upstream_status '
                        'sent=$request_length rt=$request_time';
    access_log {tmp}/access.log upstream;

    upstream citadel {{
        server {host_port};
        keepalive 8;
    }}

    server {{
        listen 127.0.0.1:{listen_port};
        client_max_body_size 1m;

        location / {{
            proxy_pass http://citadel;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_request_buffering {"on" if request_buffering else "off"};
        }}
    }}
}}
"""


@dataclass
class Nginx:
    url: str  # the proxy's base URL, for clients
    upstream: str  # the Citadel it proxies to
    directory: Path
    proc: subprocess.Popen[bytes]

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def access_log(self) -> list[str]:
        path = self.directory / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def upstream_connections(self) -> set[int]:
        """nginx's local ports of every TCP socket to the upstream, in any state.

        A connection nginx closed lingers in TIME_WAIT (or FIN_WAIT), so this
        counts the connections opened since the upstream's (fresh) port was bound.
        """
        port = int(urlsplit(self.upstream).port or 0)
        ports = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            local, remote = line.split()[1:3]
            if int(remote.split(":")[1], 16) == port:
                ports.add(int(local.split(":")[1], 16))
        return ports


@contextmanager
def nginx_proxy(upstream: str, tmp: Path, *, request_buffering: bool = True) -> Iterator[Nginx]:
    """nginx on a free loopback port, proxying to ``upstream``, until it answers /health."""
    binary = nginx_binary()
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(tmp, binary, port, upstream, request_buffering=request_buffering))
    # In the foreground, everything under tmp: -e opens the error log there before
    # the configuration is read (no /var/log/nginx), -p makes relative paths ours.
    command = [binary, "-p", f"{tmp}/", "-c", str(conf), "-e", f"{tmp}/error.log"]
    with open(tmp / "stderr.log", "wb") as err:
        proc = subprocess.Popen(
            [*command, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=subprocess.STDOUT,
        )
    nginx = Nginx(f"http://127.0.0.1:{port}", upstream, tmp, proc)
    try:
        _wait_for_health(nginx)
        yield nginx
    finally:
        proc.send_signal(signal.SIGTERM)  # fast shutdown of master and worker
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_for_health(nginx: Nginx) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if nginx.proc.poll() is not None:
            raise RuntimeError(f"nginx exited ({nginx.proc.returncode}):\n{_output(nginx)}")
        try:
            if httpx.get(nginx.url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nginx did not answer /health through the proxy:\n{_output(nginx)}")
        time.sleep(0.02)


def _output(nginx: Nginx) -> str:
    stderr = nginx.directory / "stderr.log"
    return (stderr.read_text(errors="replace") if stderr.exists() else "") + nginx.error_log()


def upstream_errors(nginx: Nginx) -> list[str]:
    """The error log's lines about the upstream (resets, early closes), for failure messages."""
    return [line for line in nginx.error_log().splitlines() if re.search(r"upstream", line)]
