"""This tree against an earlier revision (2.1.0 by default), in the same run and the same venv.

Two measures, because a shared machine's throughput varies by a third from
one run to the next:

- **instructions per request** (with valgrind installed: ``apt-get install
  valgrind``): callgrind counts what one process executes, whatever else the
  machine does. Each tree serves a keep-alive connection in-process
  (``scripts/bench_inprocess.py``: the real protocol and app, a fake socket,
  no kernel), twice with different request counts; the difference divided by
  the difference in requests is the cost of one request, start-up excluded.
- **req/s under wrk**: each round starts a fresh ``citadel serve`` (1 worker)
  of each tree in turn, the order alternating, and loads every path; the
  medians and their ratio. Fresh processes, because two processes of the same
  code differ by up to a fifth on this machine.

    python scripts/bench_compare.py [--against 92eecc9] [--rounds 6] [--duration 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

ROOT = bench.ROOT
BASELINE = "92eecc9"  # 2.1.0: "Performance notes for 2.1.0"
PATHS = ["/encrypt", "/decrypt", "/sign", "/rewrap"]


@contextmanager
def worktree(revision: str) -> Iterator[Path]:
    where = Path(tempfile.mkdtemp(prefix="citadel-baseline-")) / "tree"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), revision],
        check=True,
        capture_output=True,
    )
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
            check=False,
            capture_output=True,
        )


def tree_env(tree: Path, work: Path) -> dict[str, str]:
    return bench.citadel_env(work, PYTHONPATH=f"{tree}:{tree}/client")


def instructions(tree: Path, path: str, requests: int) -> int:
    """Instructions callgrind counts for start-up plus ``requests`` requests to ``path``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONPATH": f"{tree}:{tree}/client"}
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                bench.PY,
                str(ROOT / "scripts" / "bench_inprocess.py"),
                path,
                str(requests),
            ],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            check=True,
        )
    for line in done.stderr.splitlines():
        if "Collected :" in line:
            return int(line.rsplit(":", 1)[1])
    raise RuntimeError(done.stderr[-2000:])


def one_server(tree: Path, args: argparse.Namespace) -> dict[str, float]:
    """A fresh ``citadel serve`` of ``tree``: req/s of each path, after a warm-up."""
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with bench.server(["citadel"], tree_env(tree, work), work, work / "server.log") as url:
            ct = httpx.post(
                url + "/encrypt",
                json={"plaintext": bench.PLAINTEXT},
                headers={"X-Internal-API-Key": bench.SENTINEL},
            ).json()["encrypted_data"]
            for path in args.paths:
                body, key = bench.operation_body(path, ct)
                bench.wrk(url, path, body, key, 1, args.connections)  # warm-up
                result = bench.wrk(url, path, body, key, args.duration, args.connections)
                if result.errors:
                    raise RuntimeError(f"{tree} answered {path} with {result.errors} errors")
                found[path] = result.rps
    return found


def throughput(trees: dict[str, Path], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Medians over rounds, each round a fresh server process of each tree, in alternating order.

    One server process kept for every round is not enough: two processes of
    the same code differ by up to a fifth here (where their memory and their
    CPU land), so each round starts its own.
    """
    runs: dict[str, dict[str, list[float]]] = {p: {n: [] for n in trees} for p in args.paths}
    order = list(trees)
    for round_ in range(args.rounds):
        for name in order if round_ % 2 == 0 else order[::-1]:
            for path, rps in one_server(trees[name], args).items():
                runs[path][name].append(rps)
    medians: dict[str, dict[str, float]] = {}
    for path in args.paths:
        medians[path] = {name: statistics.median(values) for name, values in runs[path].items()}
        this, base = (medians[path][name] for name in order)
        print(
            f"{path:9} req/s median of {args.rounds} servers each: this tree {this:8.0f}  "
            f"{args.against} {base:8.0f}  ratio {this / base:.1%}   "
            f"(this: {[round(v) for v in runs[path][order[0]]]}, "
            f"{args.against}: {[round(v) for v in runs[path][order[1]]]})",
            flush=True,
        )
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--against", default=BASELINE, help="a git revision (default: 2.1.0)")
    parser.add_argument("--paths", nargs="+", default=PATHS)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=int, default=4)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--requests", type=int, default=2000, help="per instruction count")
    parser.add_argument("--skip-instructions", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    with worktree(args.against) as old:
        trees = {"this tree": ROOT, args.against: old}
        if not args.skip_instructions:
            if shutil.which("valgrind") is None:
                print("instructions: valgrind is not installed (apt-get install valgrind)")
            else:
                few, many = 200, 200 + args.requests
                jobs = [(t, p, n) for p in args.paths for t in trees.values() for n in (few, many)]
                # One valgrind per core: each is single-threaded and counts its own process only.
                with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
                    counted = pool.map(lambda job: instructions(*job), jobs)
                    found = dict(zip(jobs, counted, strict=True))
                for path in args.paths:
                    this, base = (
                        (found[(tree, path, many)] - found[(tree, path, few)]) / (many - few)
                        for tree in trees.values()
                    )
                    print(
                        f"{path:9} instructions/request: this tree {this:9,.0f}  "
                        f"{args.against} {base:9,.0f}  ratio {this / base:.1%}",
                        flush=True,
                    )
        if not args.skip_throughput:
            if shutil.which("wrk") is None:
                print("throughput: wrk is not installed (apt-get install wrk)")
            else:
                throughput(trees, args)


if __name__ == "__main__":
    main()
