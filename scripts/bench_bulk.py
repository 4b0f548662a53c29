"""A million-line export rewrapped by the bulk tool against one Citadel on this machine.

Makes a JSON-lines export (``id``, ``user_id``, ``encrypted_data``) whose
ciphertexts are under a local keyring's first key, encrypted in this process
with the provider's own code; rotates the keyring, so that every line needs a
rewrap; starts ``citadel serve --workers N`` on it (its audit stream written to
a file), with the job's caller granted ``rewrap`` and a high limit through
``CITADEL_RATE_LIMITS``; then times ``citadel rewrap`` over the whole export
and reads the tool's peak memory (its ``VmHWM``) and CPU.
The output is checked afterwards: same lines in the same order, every one under
the new key, nothing rejected. Nothing is asserted on the figures (goal of
issue 17: under 60 s for 1,000,000 lines, tool and server sharing the 2 cores).

    python scripts/bench_bulk.py [--lines 1000000] [--workers 2] [--concurrency 16] [--batch-size 100]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The same commit line and port choice as the batch benchmark (this directory is on sys.path).
from bench_batches import free_port, revision  # noqa: E402

from citadel.keyring import load_keyring  # noqa: E402
from citadel.providers.local import LocalProvider  # noqa: E402

PY = sys.executable
MIGRATOR = "bench-migrator-" + "m" * 40
PLAINTEXT = "binance-api-key-" + "k" * 48  # the size of a real exchange key


def make_export(path: Path, ring: Path, lines: int) -> str:
    """``lines`` rows, each its own ciphertext under the keyring's active key; returns its id."""
    provider = LocalProvider(load_keyring(ring))
    encrypt = provider.encrypt_sync
    with open(path, "w") as out:
        for i in range(lines):
            # Flat lines, as an export from SQL's row_to_json gives them.
            out.write(
                f'{{"id":{i},"user_id":"user-{i:07d}","encrypted_data":"{encrypt(PLAINTEXT)}"}}\n'
            )
    return provider.active_key_id


def citadel_env(work: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITADEL_", "EVERVAULT_"))}
    env.update(
        {
            "CITADEL_API_KEYS": json.dumps({"migrator": [MIGRATOR]}),
            "CITADEL_ACL": json.dumps({"migrator": ["rewrap"]}),
            # As the runbook says: the job's caller gets a limit of its own.
            "CITADEL_RATE_LIMITS": json.dumps({"migrator": "100000000/minute"}),
            "CITADEL_LOCAL_KEYRING": str(work / "keyring.json"),
            "CITADEL_AUDIT_PSEUDONYM_KEY": "bench-pseudonym-key-0123456789",
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


def wait_ready(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready")


TOOLS = {
    # The migration job's install (the client distribution alone): `citadel-rewrap`.
    "citadel-rewrap": [PY, "-m", "citadel_client.bulk"],
    # The same tool started through the server's CLI, which imports the server's package too.
    "citadel": [PY, "-m", "citadel", "rewrap"],
}


def sends_batches(tool: list[str]) -> bool:
    """Whether this version of the tool sends ``{"batch": [...]}`` (it has ``--batch-size``)."""
    text = subprocess.run(
        [*tool, "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    ).stdout
    return "--batch-size" in text


def wait_with_peak(pid: int) -> tuple[int, resource.struct_rusage, int]:
    """Wait for ``pid``: its exit status, its rusage, and its peak RSS in KiB (``VmHWM``).

    Not ``ru_maxrss``: the child starts as a fork of this process, and the
    kernel keeps the larger of its RSS before ``exec`` (this process's: the
    export was made here) and after. ``VmHWM`` belongs to the image ``exec``
    made, so it is the tool's own; it is read until the process exits.
    """
    peak = 0
    status_file = Path(f"/proc/{pid}/status")
    while True:
        try:
            for line in status_file.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            return status, usage, peak
        time.sleep(0.05)


def check_output(src: Path, out: Path, new_kid: str) -> tuple[int, int]:
    """(lines, lines under the new key), failing on a line out of order or with another field."""
    lines = rewrapped = 0
    prefix = f"cit1:{new_kid}:"
    with open(src) as a, open(out) as b:
        for i, (before, after) in enumerate(zip(a, b, strict=True)):
            x, y = json.loads(before), json.loads(after)
            if y["id"] != i or y["user_id"] != x["user_id"]:
                raise RuntimeError(f"output line {i} is not input line {i}")
            rewrapped += y["encrypted_data"].startswith(prefix)
            lines += 1
    return lines, rewrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000, help="default 1,000,000")
    parser.add_argument(
        "--workers", type=int, default=2, help="citadel serve --workers (default 2)"
    )
    parser.add_argument("--concurrency", type=int, help="the tool's --concurrency (its default)")
    parser.add_argument("--batch-size", type=int, help="the tool's --batch-size (its default)")
    parser.add_argument(
        "--tool",
        choices=sorted(TOOLS),
        default="citadel-rewrap",
        help="citadel-rewrap (default; run as python -m citadel_client.bulk) or citadel rewrap",
    )
    parser.add_argument("--keep", type=Path, help="work in this directory and keep its files")
    args = parser.parse_args()

    batches = sends_batches(TOOLS[args.tool])
    print(
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, {revision()}; {args.lines:,} lines;"
        f" citadel serve --workers {args.workers} (local provider, audit to a file);"
        f" {os.cpu_count()} cores shared by the tool and the server; load average"
        f" {os.getloadavg()[0]:.2f}"
    )
    if not batches:
        print("the bulk tool has no --batch-size: it sends one request per line")

    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ring, src, out = work / "keyring.json", work / "export.jsonl", work / "rewrapped.jsonl"
        for stale in (ring, out, out.with_name(out.name + ".rejects")):
            stale.unlink(missing_ok=True)
        tool = [PY, "-m", "citadel"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run([*tool, "keyring", "--path", str(ring), "init"], check=True, env=env)
        start = time.perf_counter()
        old_kid = make_export(src, ring, args.lines)
        made = time.perf_counter() - start
        size = src.stat().st_size
        print(f"export: {args.lines:,} lines, {size / 1e6:.0f} MB, made in {made:.1f} s")
        # A rotation, as in the runbook: every line of the export is now under the old key.
        subprocess.run(
            [*tool, "keyring", "--path", str(ring), "rotate"],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        new_kid = load_keyring(ring).active
        assert new_kid != old_kid

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve = [*tool, "serve", "--port", str(port), "--workers", str(args.workers)]
        audit = work / "audit.log"
        with open(audit, "wb") as log:
            server = subprocess.Popen(
                serve, cwd=work, env=citadel_env(work), stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_ready(url)
            cmd = [*TOOLS[args.tool], str(src), "--output", str(out), "--url", url]
            if args.concurrency:
                cmd += ["--concurrency", str(args.concurrency)]
            if args.batch_size:
                cmd += ["--batch-size", str(args.batch_size)]
            tool_env = {**env, "CITADEL_API_KEY": MIGRATOR}
            with open(work / "tool.stderr", "wb") as err:
                start = time.perf_counter()
                child = subprocess.Popen(cmd, env=tool_env, stderr=err, stdout=subprocess.DEVNULL)
                status, usage, peak_kib = wait_with_peak(child.pid)
                elapsed = time.perf_counter() - start
            child.returncode = os.waitstatus_to_exitcode(status)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        summary = (work / "tool.stderr").read_text().strip().splitlines()
        shown = [
            args.tool if args.tool == "citadel-rewrap" else "citadel rewrap",
            *cmd[len(TOOLS[args.tool]) :],
        ]
        print(f"tool: {' '.join(shown)}")
        print(f"tool exit status {child.returncode}; {summary[-1] if summary else '(no output)'}")
        peak_mib = peak_kib / 1024
        cpu = usage.ru_utime + usage.ru_stime
        lines, rewrapped = check_output(src, out, new_kid)
        audit_lines = sum(1 for _ in open(audit, "rb"))
        print()
        print(
            f"{'lines':>10} {'seconds':>8} {'lines/s':>9} {'peak RSS MiB':>13} {'tool CPU s':>11}"
        )
        print(
            f"{lines:10,} {elapsed:8.1f} {lines / elapsed:9.0f} {peak_mib:13.1f} {cpu:11.1f}"
            f"   {'batches' if batches else 'one request per line'}"
        )
        print(
            f"output: {lines:,} lines in input order, {rewrapped:,} under the new key {new_kid};"
            f" audit stream {audit_lines:,} lines"
        )
        if args.lines < 1_000_000:
            per_million = elapsed * 1_000_000 / max(1, args.lines)
            print(f"1,000,000 lines at this pace: {per_million:.1f} s (goal: under 60 s)")
        else:
            print(f"{lines:,} lines in {elapsed:.1f} s (goal for 1,000,000: under 60 s)")


if __name__ == "__main__":
    main()
