"""What TLS costs Citadel: ``/encrypt`` over TLS 1.3 against plain HTTP, in one run.

Two ``citadel serve`` processes (one worker each, the same settings but for
the TLS files, an EC P-256 certificate the script makes) are loaded in turn
by wrk (``apt-get install wrk``), one thread:

- keep-alive: every connection kept open, so TLS costs only its record layer;
- a new connection per request (``Connection: close``): plain HTTP pays a TCP
  connection, TLS a TCP connection and a full TLS 1.3 handshake (wrk resumes
  no session), so the difference is the server's cost of a full handshake.

For reference, the same app under uvicorn's own TLS (``ssl_certfile=``, no
handshake deadline, no reload) with keep-alive: the cost of Citadel's listener.
It then times full handshakes one at a time from Python (client and server
on one machine: an upper bound of the latency a handshake adds).

    python scripts/bench_tls.py [--duration 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]

from bench import PLAINTEXT, SENTINEL, citadel_env, free_port  # noqa: E402
from tls_support import Authority  # noqa: E402


@dataclass
class Row:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@contextmanager
def citadel(work: Path, env: dict[str, str], scheme: str, ca: Path | None) -> Iterator[str]:
    """``citadel serve`` (one worker) until ``/health`` answers; yields its base URL."""
    port = free_port()
    log = work / f"citadel-{scheme}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "citadel", "serve", "--port", str(port)],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"{scheme}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                verify: ssl.SSLContext | bool = (
                    ssl.create_default_context(cafile=str(ca)) if ca else True
                )
                if httpx.get(url + "/health", verify=verify, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"citadel did not start: {log.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


@contextmanager
def uvicorn_tls(work: Path, env: dict[str, str], cert: Path, key: Path, ca: Path) -> Iterator[str]:
    """The same app and protocol under uvicorn's own TLS, for reference."""
    port = free_port()
    code = (
        "import uvicorn\n"
        "from citadel.http.serving import uvicorn_options\n"
        f"uvicorn.run('citadel.app:app_from_env', factory=True, host='127.0.0.1', port={port},"
        f" ssl_certfile={str(cert)!r}, ssl_keyfile={str(key)!r}, **uvicorn_options())\n"
    )
    log = work / "uvicorn-tls.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        context = ssl.create_default_context(cafile=str(ca))
        while True:
            try:
                if httpx.get(url + "/health", verify=context, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start: {log.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def wrk(url: str, duration: int, conns: int, *, close: bool) -> Row:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps({'plaintext': PLAINTEXT}))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["X-Internal-API-Key"] = "{SENTINEL}"\n'
        + ('wrk.headers["Connection"] = "close"\n' if close else "")
        + "done = function(summary, latency, requests)\n"
        '  io.write(string.format("BENCH %f %f %d %d\\n", latency:percentile(50),'
        " latency:percentile(99), summary.requests,"
        " summary.errors.status + summary.errors.connect + summary.errors.read"
        " + summary.errors.write + summary.errors.timeout))\n"
        "end\n"
    )
    script.close()
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "-s", script.name, url + "/encrypt"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    found = re.search(r"BENCH (\S+) (\S+) (\d+) (\d+)", out)
    assert found is not None, out
    p50, p99, _n, errors = found.groups()
    return Row("", rps, float(p50) / 1000, float(p99) / 1000, int(errors))


def handshakes(port: int, ca: Path, count: int) -> tuple[list[float], list[float]]:
    """Seconds to connect (TCP only), and to connect and finish a full TLS handshake."""
    context = ssl.create_default_context(cafile=str(ca))
    tcp, tls = [], []
    for _ in range(count):
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)):
            tcp.append(time.perf_counter() - start)
        start = time.perf_counter()
        with (
            socket.create_connection(("127.0.0.1", port)) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            tls.append(time.perf_counter() - start)
    return tcp, tls


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--handshakes", type=int, default=300)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench_tls: wrk is needed (apt-get install wrk)")
    print(
        f"wrk -t1, {args.connections} connections, {args.duration}s per row, 1 uvicorn worker "
        f"per server, {os.cpu_count()} cores shared by wrk and the server; {ssl.OPENSSL_VERSION}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        authority = Authority.make("bench CA")
        ca = authority.write(work / "ca.crt")
        cert, key = authority.server().write(work, "server")
        plain_env = citadel_env(work)
        tls_env = {
            **plain_env,
            "CITADEL_TLS_CERT_FILE": str(cert),
            "CITADEL_TLS_KEY_FILE": str(key),
        }
        rows: list[Row] = []
        for scheme, env, ca_file in (("http", plain_env, None), ("https", tls_env, ca)):
            with citadel(work, env, scheme, ca_file) as url:
                wrk(url, 2, args.connections, close=False)  # warm-up
                for close in (False, True):
                    row = wrk(url, args.duration, args.connections, close=close)
                    kind = "new connection per request" if close else "keep-alive"
                    row.name = f"{'TLS 1.3' if scheme == 'https' else 'plain HTTP'}, {kind}"
                    rows.append(row)
                if scheme == "https":
                    port = int(url.rsplit(":", 1)[1])
                    tcp, tls = handshakes(port, ca, args.handshakes)
        with uvicorn_tls(work, plain_env, cert, key, ca) as url:
            wrk(url, 2, args.connections, close=False)  # warm-up
            reference = wrk(url, args.duration, args.connections, close=False)
            reference.name = "uvicorn's own TLS (reference), keep-alive"
    print(f"\n{'POST /encrypt':44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for r in [*rows, reference]:
        print(f"{r.name:44} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.errors:7d}")
    plain_ka, plain_close, tls_ka, tls_close = rows
    print(
        f"\nkeep-alive: TLS serves {tls_ka.rps / plain_ka.rps:.0%} of plain HTTP's req/s, "
        f"p99 {tls_ka.p99_ms / plain_ka.p99_ms:.2f}x"
    )
    print(
        f"Citadel's listener against uvicorn's own TLS, keep-alive: {tls_ka.rps / reference.rps:.0%}"
        f" of its req/s, p99 {tls_ka.p99_ms / reference.p99_ms:.2f}x (one run each: noisy)"
    )
    per_handshake_ms = (1 / tls_close.rps - 1 / plain_close.rps) * 1000
    print(
        f"new connection per request: TLS {tls_close.rps / plain_close.rps:.0%} of plain's req/s; "
        f"a full handshake costs the server about {per_handshake_ms:.2f} ms of its time"
    )
    print(
        f"one at a time from Python ({args.handshakes}): TCP connect p50 {_ms(tcp, 0.5):.2f} ms, "
        f"TCP + TLS 1.3 handshake p50 {_ms(tls, 0.5):.2f} ms, p99 {_ms(tls, 0.99):.2f} ms "
        f"(mean added by TLS {(statistics.mean(tls) - statistics.mean(tcp)) * 1000:.2f} ms)"
    )


if __name__ == "__main__":
    main()
