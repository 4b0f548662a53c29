"""Throughput and latency of Citadel against a bare FastAPI endpoint, in one run.

Both servers run under the same uvicorn settings (one worker, uvloop,
httptools, no access log) and are loaded by the same generator: wrk when it is
installed (``apt-get install wrk``), otherwise a small asyncio/httpx loader
(slower, so its figures are lower for both sides). Output: req/s, p50, p99 for
each endpoint and Citadel's ratio to the bare endpoint.

    python scripts/bench.py [--duration 10] [--connections 32] [--scenario local ...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
SENTINEL = "bench-sentinel-" + "s" * 40
CONDUCTOR = "bench-conductor-" + "c" * 40
MIGRATOR = "bench-migrator-" + "m" * 40
PLAINTEXT = "binance-api-key-" + "k" * 48  # the size of a real exchange key
# Binance's documented order query: what Conductor signs for a limit order.
ORDER = (
    "symbol=LTCBTC&side=BUY&type=LIMIT&timeInForce=GTC&quantity=1&price=0.1"
    "&recvWindow=5000&timestamp=1499827319559"
)
UNLIMITED = "1000000000/minute"
UVICORN = [
    "--no-access-log",
    "--log-level",
    "warning",
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--workers",
    "1",
]


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def operation_body(path: str, ciphertext: str) -> tuple[dict[str, str], str]:
    """The body of one request to ``path`` (``ciphertext`` for those that take one), and its key."""
    return {
        "/encrypt": ({"plaintext": PLAINTEXT}, SENTINEL),
        "/decrypt": ({"encrypted_data": ciphertext}, CONDUCTOR),
        "/sign": (
            {"encrypted_data": ciphertext, "algorithm": "hmac-sha256", "message": ORDER},
            CONDUCTOR,
        ),
        "/rewrap": ({"encrypted_data": ciphertext}, MIGRATOR),
    }[path]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, path: str = "/health", timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + path, timeout=1)
            if r.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


@contextmanager
def server(
    target: list[str], env: dict[str, str], cwd: Path, log: Path, workers: int = 1
) -> Iterator[str]:
    """The bare app under uvicorn's CLI, or Citadel (``target == ["citadel"]``) as users run it."""
    port = free_port()
    if target == ["citadel"]:
        # `citadel serve`: the header guard protocol and every other edge setting included.
        cmd = [PY, "-m", "citadel", "serve", "--port", str(port), "--workers", str(workers)]
    else:
        flags = [*UVICORN[:-1], str(workers)]
        cmd = [PY, "-m", "uvicorn", *target, "--host", "127.0.0.1", "--port", str(port), *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, "/docs")
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def citadel_env(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITADEL_", "EVERVAULT_"))}
    env.update(
        {
            "CITADEL_API_KEYS": json.dumps(
                {"sentinel": [SENTINEL], "conductor": [CONDUCTOR], "migrator": [MIGRATOR]}
            ),
            "CITADEL_ACL": json.dumps(
                {"sentinel": ["encrypt"], "conductor": ["decrypt", "sign"], "migrator": ["rewrap"]}
            ),
            "CITADEL_RATE_LIMIT_PER_CALLER": UNLIMITED,
            "CITADEL_RATE_LIMIT_PER_USER": UNLIMITED,
            "CITADEL_RATE_LIMIT_AUTH_FAILURES": UNLIMITED,
            "CITADEL_LOCAL_KEYRING": str(workdir / "keyring.json"),
            "CITADEL_AUDIT_PSEUDONYM_KEY": "bench-pseudonym-key-0123456789",
            "CITADEL_DOCS": "true",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra)
    return env


def wrk(url: str, path: str, body: dict[str, str], key: str, duration: int, conns: int) -> Result:
    script = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    script.write(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(json.dumps(body))}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["X-Internal-API-Key"] = "{key}"\n'
        "done = function(summary, latency, requests)\n"
        '  io.write(string.format("BENCH %f %f %d %d\\n", latency:percentile(50),'
        " latency:percentile(99), summary.requests,"
        " summary.errors.status + summary.errors.connect + summary.errors.read"
        " + summary.errors.write + summary.errors.timeout))\n"
        "end\n"
    )
    script.close()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "-s", script.name, url + path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(script.name)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50, p99, _n, errors = re.search(r"BENCH (\S+) (\S+) (\d+) (\d+)", out).groups()  # type: ignore[union-attr]
    return Result("", rps, float(p50) / 1000, float(p99) / 1000, int(errors))


def pyload(
    url: str, path: str, body: dict[str, str], key: str, duration: int, conns: int
) -> Result:
    latencies: list[float] = []
    errors = 0

    async def worker(client: httpx.AsyncClient, stop: float) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t = time.perf_counter()
            r = await client.post(path, json=body, headers={"X-Internal-API-Key": key})
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200

    async def main() -> float:
        limits = httpx.Limits(max_connections=conns)
        async with httpx.AsyncClient(base_url=url, limits=limits) as client:
            start = time.perf_counter()
            await asyncio.gather(*(worker(client, start + duration) for _ in range(conns)))
            return time.perf_counter() - start

    elapsed = asyncio.run(main())
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return Result("", len(latencies) / elapsed, pick(0.5), pick(0.99), errors)


def measure(
    load: Callable[..., Result],
    name: str,
    url: str,
    path: str,
    body: dict[str, str],
    key: str,
    args: argparse.Namespace,
) -> Result:
    load(url, path, body, key, 2, args.connections)  # warm-up
    result = load(url, path, body, key, args.duration, args.connections)
    result.name = name
    return result


def report(rows: list[tuple[Result, Result]]) -> None:
    print(f"{'endpoint':44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'ratio':>7}")
    for citadel, bare in rows:
        for r, ratio in ((bare, ""), (citadel, f"{citadel.rps / bare.rps:.0%}")):
            print(
                f"{r.name:44} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.errors:7d} {ratio:>7}"
            )
        print(f"{'':44} p99 ratio to bare: {citadel.p99_ms / bare.p99_ms:.2f}x")


def run_local(
    args: argparse.Namespace, load: Callable[..., Result], work: Path
) -> list[tuple[Result, Result]]:
    rows = []
    bare_log, cit_log = work / "bare.log", work / "citadel.log"
    names = {"/sign": "/sign hmac-sha256"}
    paths = ["/encrypt", "/decrypt", "/sign", "/rewrap"]
    with server(["scripts.bare_app:app"], citadel_env(work), ROOT, bare_log) as bare_url:
        # The bare app validates only: a ciphertext-shaped string is enough.
        bare = [
            measure(
                load,
                f"bare FastAPI {path} (validate only)",
                bare_url,
                path,
                *operation_body(path, "x" * 120),
                args,
            )
            for path in paths
        ]
    env = citadel_env(work, **args.citadel_env)
    with server(["citadel"], env, work, cit_log) as url:
        ct = httpx.post(
            url + "/encrypt",
            json={"plaintext": PLAINTEXT},
            headers={"X-Internal-API-Key": SENTINEL},
        ).json()["encrypted_data"]
        citadel = [
            measure(
                load,
                f"citadel {names.get(path, path)} ({args.label})",
                url,
                path,
                *operation_body(path, ct),
                args,
            )
            for path in paths
        ]
        rew = citadel[3]
        bulk = bulk_rewrap(url, ct, work, args)
    rows += list(zip(citadel, bare, strict=True))
    report(rows)
    print(
        f"{'citadel rewrap (bulk tool), ' + str(bulk[0]) + ' lines':44} {bulk[1]:9.0f}"
        f"{'':36}{bulk[1] / rew.rps:.0%}  of /rewrap"
    )
    return rows


def bulk_rewrap(url: str, ct: str, work: Path, args: argparse.Namespace) -> tuple[int, float]:
    """Lines per second of `citadel rewrap` over a JSON-lines export against the same server."""
    lines = max(2000, int(args.duration * 2000))
    src, out = work / "export.jsonl", work / "rewrapped.jsonl"
    with open(src, "w") as f:
        for i in range(lines):
            f.write(json.dumps({"id": i, "encrypted_data": ct}) + "\n")
    out.unlink(missing_ok=True)
    env = {**os.environ, "CITADEL_API_KEY": MIGRATOR, "PYTHONPATH": str(ROOT)}
    # A rotation, as in the runbook: the export is under the old key, so every
    # line is rewrapped; wait until the server encrypts under the new key.
    ring = work / "keyring.json"
    subprocess.run([PY, "-m", "citadel", "keyring", "rotate", "--path", str(ring)], check=True)
    old_kid = ct.split(":")[1]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.post(
            url + "/encrypt", json={"plaintext": "x"}, headers={"X-Internal-API-Key": SENTINEL}
        )
        if r.json()["encrypted_data"].split(":")[1] != old_kid:
            break
        time.sleep(0.2)
    cmd = [PY, "-m", "citadel", "rewrap", str(src), "-o", str(out), "--url", url]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return lines, lines / (time.perf_counter() - start)


@contextmanager
def redis_server() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def latency_proxy(target_port: int, delay_s: float) -> Iterator[int]:
    """A TCP proxy that delays every chunk by ``delay_s`` in each direction."""
    import threading

    loop = asyncio.new_event_loop()
    ready: list[int] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(delay_s)
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        r2, w2 = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, w2), pipe(r2, writer))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        ready.append(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    while not ready:
        time.sleep(0.01)
    yield ready[0]


def health_under_load(url: str, args: argparse.Namespace) -> Result:
    """p99 of /health (4 connections, wrk) while /encrypt is loaded (32 connections)."""
    import threading

    results: list[Result] = []
    loader = threading.Thread(
        target=lambda: results.append(
            wrk(
                url,
                "/encrypt",
                {"plaintext": PLAINTEXT},
                SENTINEL,
                args.duration + 2,
                args.connections,
            )
        )
    )
    loader.start()
    time.sleep(1)
    out = subprocess.run(
        ["wrk", "-t1", "-c4", f"-d{args.duration}s", "--latency", url + "/health"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    loader.join()

    def ms(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return Result("", rps, ms("50"), ms("99"), 0)


def run_redis(args: argparse.Namespace, load: Callable[..., Result], work: Path) -> None:
    """Issue 4's figures: memory vs Redis limits, and /health with 100 ms in front of Redis."""
    rows: list[tuple[str, Result]] = []
    with redis_server() as port:
        for label, uri in (("memory://", "memory://"), ("redis", f"redis://127.0.0.1:{port}/0")):
            env = citadel_env(work, CITADEL_RATE_LIMIT_STORAGE_URI=uri)
            with server(["citadel"], env, work, work / "c.log") as url:
                r = measure(
                    load,
                    f"citadel /encrypt, limits in {label}",
                    url,
                    "/encrypt",
                    {"plaintext": PLAINTEXT},
                    SENTINEL,
                    args,
                )
                rows.append((label, r))
        if shutil.which("wrk"):
            health: list[Result] = []
            with latency_proxy(port, 0.1) as proxy_port:
                for label, p in (("redis direct", port), ("redis +100 ms", proxy_port)):
                    env = citadel_env(
                        work, CITADEL_RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{p}/0"
                    )
                    with server(["citadel"], env, work, work / "h.log") as url:
                        h = health_under_load(url, args)
                        h.name = f"/health under /encrypt load, {label}"
                        health.append(h)
    memory, redis = rows[0][1], rows[1][1]
    print()
    print(f"{'rate-limit storage':44} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for _label, r in rows:
        print(f"{r.name:44} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f}")
    per_req_mem, per_req_redis = 1e6 / memory.rps, 1e6 / redis.rps
    print(
        f"{'':44} Redis adds {per_req_redis - per_req_mem:.0f} us per request "
        f"({1 - redis.rps / memory.rps:.0%} of memory-storage throughput)"
    )
    print(
        f"{'':44} in-process limiter cost: {limiter_cost_us():.1f} us per request (memory storage)"
    )
    if shutil.which("wrk"):
        for h in health:
            print(f"{h.name:44} {h.rps:9.0f} {h.p50_ms:8.2f} {h.p99_ms:8.2f}")
        print(
            f"{'':44} /health p99 rise with 100 ms Redis latency: {health[1].p99_ms - health[0].p99_ms:+.2f} ms"
        )


def limiter_cost_us() -> float:
    """The in-memory limiter's own cost for one authenticated request with a user id."""
    from citadel.config import Settings
    from citadel.metrics import Metrics
    from citadel.ratelimit import RateLimiter

    limiter = RateLimiter(
        Settings.from_fields(rate_limit_per_caller=UNLIMITED, rate_limit_per_user=UNLIMITED),
        Metrics(),
    )  # type: ignore[call-arg]

    async def run(n: int) -> float:
        start = time.perf_counter()
        for i in range(n):
            await limiter.hit_caller("sentinel", f"user{i % 100}")
        return (time.perf_counter() - start) / n * 1e6

    return asyncio.run(run(50_000))


@contextmanager
def emulator_process(work: Path) -> Iterator[tuple[str, str, str]]:
    port = free_port()
    app_id, api_key = "app_bench00000001", "ev:key:1:bench"
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "evervault_emulator",
            "--port",
            str(port),
            "--app-id",
            app_id,
            "--api-key",
            api_key,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(url + "_emulator/stats", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url, app_id, api_key
    finally:
        proc.terminate()
        proc.wait()


def run_evervault(args: argparse.Namespace, load: Callable[..., Result], work: Path) -> None:
    """Issue 3's figures: /encrypt on the evervault provider, /decrypt at 50 ms upstream latency."""
    with emulator_process(work) as (emu_url, app_id, api_key):
        env = citadel_env(
            work,
            CITADEL_PROVIDER="evervault",
            EVERVAULT_APP_ID=app_id,
            EVERVAULT_API_KEY=api_key,
            EVERVAULT_API_URL=emu_url,
        )
        with server(
            ["scripts.bare_app:app"], citadel_env(work), ROOT, work / "bare.log"
        ) as bare_url:
            bare = measure(
                load,
                "bare FastAPI /encrypt (validate only)",
                bare_url,
                "/encrypt",
                {"plaintext": PLAINTEXT},
                SENTINEL,
                args,
            )
        with server(["citadel"], env, work, work / "ev.log") as url:
            wait_ready(url, "/ready")
            enc = measure(
                load,
                "citadel /encrypt (evervault provider)",
                url,
                "/encrypt",
                {"plaintext": PLAINTEXT},
                SENTINEL,
                args,
            )
            ct = httpx.post(
                url + "/encrypt",
                json={"plaintext": PLAINTEXT},
                headers={"X-Internal-API-Key": SENTINEL},
            ).json()["encrypted_data"]
            httpx.post(emu_url + "_emulator/faults", json={"path": "decrypt", "latency_ms": 50})
            conns = args.connections
            args.connections = 64
            dec = measure(
                load,
                "citadel /decrypt (evervault, 50 ms upstream)",
                url,
                "/decrypt",
                {"encrypted_data": ct},
                CONDUCTOR,
                args,
            )
            args.connections = conns
        with server(["citadel"], env, work, work / "ev2.log", workers=2) as url:
            wait_ready(url, "/ready")
            args.connections = 64
            dec2 = measure(
                load,
                "citadel /decrypt (same, --workers 2)",
                url,
                "/decrypt",
                {"encrypted_data": ct},
                CONDUCTOR,
                args,
            )
            args.connections = conns
    print()
    report([(enc, bare)])
    ideal = 64 / 0.05
    for d in (dec, dec2):
        print(
            f"{d.name:44} {d.rps:9.0f} {d.p50_ms:8.2f} {d.p99_ms:8.2f} {d.errors:7d}"
            f" {d.rps / ideal:>7.0%}"
        )
    print(f"{'':44} ratio to the ideal 64 / 0.05 s = {ideal:.0f} req/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--loader", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=["local", "redis", "evervault"],
        help="repeatable; default: all whose tools are present",
    )
    args = parser.parse_args()
    use_wrk = args.loader == "wrk" or (args.loader == "auto" and shutil.which("wrk"))
    load = wrk if use_wrk else pyload
    print(
        f"loader: {'wrk -t1' if use_wrk else 'python asyncio/httpx'}, {args.connections} connections,"
        f" {args.duration}s per endpoint, 1 uvicorn worker (uvloop, httptools), {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        scenarios = args.scenario or ["local", "redis", "evervault"]
        if "local" in scenarios:
            args.citadel_env, args.label = {}, "local provider, memory limits"
            run_local(args, load, work)
        if "redis" in scenarios and shutil.which("redis-server"):
            run_redis(args, load, work)
        if "evervault" in scenarios:
            run_evervault(args, load, work)


if __name__ == "__main__":
    main()
