"""Signed private requests per second, and the latency citadel_client.ccxt adds to ccxt's signing.

Starts one Citadel worker (``python -m citadel serve --workers 1``, local
provider, a throwaway keyring) on loopback, then builds Binance order requests
(HMAC-SHA256) without sending them: plain ccxt signing locally with the
plaintext (the baseline), the sync adapter (one client, one request at a
time), and the async adapter with 32 concurrent tasks. Prints requests per
second and per-request latency (p50, p99) and what the adapter adds at p50.
Nothing is asserted: the machine is shared.

    .venv/bin/python scripts/bench_ccxt.py [--requests 2000] [--tasks 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import ccxt
import httpx

from citadel_client import AsyncCitadelClient, CitadelClient
from citadel_client.ccxt import async_exchange, exchange

SECRET = "NhqPtmdSJYdKjVHjA7PZj4Mge3R5YNiP1e3UZjInClVN65XAbvqqM6A7H5fATj0j"
ORDER = {
    "symbol": "BTCUSDT",
    "side": "BUY",
    "type": "LIMIT",
    "timeInForce": "GTC",
    "quantity": "0.001",
    "price": "50000",
}
ENDPOINT = ("order", ["private"], "POST")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_citadel(tmp: Path, keys: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "CITADEL_API_KEYS": json.dumps({caller: [key] for caller, key in keys.items()}),
        "CITADEL_ACL": json.dumps({"sentinel": ["encrypt"], "conductor": ["sign"]}),
        "CITADEL_LOCAL_KEYRING": str(tmp / "keyring.json"),
        "CITADEL_AUDIT_PSEUDONYM_KEY": secrets.token_hex(16),
        "CITADEL_RATE_LIMIT_PER_CALLER": "100000000/minute",
        "CITADEL_RATE_LIMIT_PER_USER": "100000000/minute",
        "CITADEL_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "citadel", "serve", "--port", str(port), "--workers", "1"],
        env=env,
        cwd=tmp,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("Citadel did not start")


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50 * 1e3, p99 * 1e3


def bench_plain(n: int) -> tuple[list[float], float]:
    ex = ccxt.binance({"apiKey": "k", "secret": SECRET, "enableRateLimit": False})
    path, api, method = ENDPOINT
    samples = []
    start = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        ex.sign(path, api, method, dict(ORDER))
        samples.append(time.perf_counter() - t)
    return samples, time.perf_counter() - start


def bench_sync(url: str, key: str, ct: str, n: int) -> tuple[list[float], float]:
    path, api, method = ENDPOINT
    with CitadelClient(url, api_key=key) as client:
        ex = exchange(
            "binance",
            client,
            {"apiKey": "k", "secret": ct, "citadel_form": "base64", "enableRateLimit": False},
        )
        ex.signed_request(path, api, method, dict(ORDER))  # warm the connection
        samples = []
        start = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            ex.signed_request(path, api, method, dict(ORDER))
            samples.append(time.perf_counter() - t)
        return samples, time.perf_counter() - start


async def bench_async(
    url: str, key: str, ct: str, n: int, tasks: int, connections: int, batch: bool = False
) -> tuple[list[float], float]:
    path, api, method = ENDPOINT
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    transport = httpx.AsyncHTTPTransport(limits=limits)
    async with AsyncCitadelClient(url, api_key=key, transport=transport) as client:
        ex = async_exchange(
            "binance",
            client,
            {
                "apiKey": "k",
                "secret": ct,
                "citadel_form": "base64",
                "citadel_batch": batch,
                "enableRateLimit": False,
            },
        )
        samples: list[float] = []

        async def worker(count: int) -> None:
            for _ in range(count):
                t = time.perf_counter()
                await ex.signed_request(path, api, method, dict(ORDER))
                samples.append(time.perf_counter() - t)

        await asyncio.gather(*(worker(2) for _ in range(tasks)))  # warm the connections
        samples.clear()
        start = time.perf_counter()
        await asyncio.gather(*(worker(n // tasks) for _ in range(tasks)))
        elapsed = time.perf_counter() - start
        await ex.close()
        return samples, elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=32)
    parser.add_argument(
        "--connections", type=int, default=8, help="the async client's pool (httpx's limit)"
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    keys = {"sentinel": secrets.token_hex(32), "conductor": secrets.token_hex(32)}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_citadel(Path(tmp), keys)
        try:
            with CitadelClient(url, api_key=keys["sentinel"]) as sentinel:
                ct = sentinel.encrypt(SECRET)
            rows: list[tuple[str, list[float], float]] = []
            rows.append(("plain ccxt, local HMAC", *bench_plain(args.requests)))
            rows.append(("adapter, sync", *bench_sync(url, keys["conductor"], ct, args.requests)))
            for batch in (False, True):
                name = f"adapter, async, {args.tasks} tasks" + (", citadel_batch" if batch else "")
                samples, elapsed = asyncio.run(
                    bench_async(
                        url,
                        keys["conductor"],
                        ct,
                        args.requests,
                        args.tasks,
                        args.connections,
                        batch,
                    )
                )
                rows.append((name, samples, elapsed))
        finally:
            proc.terminate()
            proc.wait(10)
    base_p50 = percentiles(rows[0][1])[0]
    print(f"{'':34} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'added p50 ms':>13}")
    for name, samples, elapsed in rows:
        p50, p99 = percentiles(samples)
        print(
            f"{name:34} {len(samples) / elapsed:9.0f} {p50:8.3f} {p99:8.3f} {p50 - base_p50:13.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
