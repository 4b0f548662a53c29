"""Issue 12, findings about real processes: a broken or stalled standard output, bad settings.

``python -m citadel serve`` runs as a child process with its standard output
a pipe that the test controls: its read end closed (the log shipper gone) or
never read (the shipper stalled). Waits are bounded by client timeouts and
polling deadlines; nothing measures time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest
from support import CITADEL, KEYS, PSEUDONYM_KEY, clean_env, free_port, headers, run

SERVE_ENV = {
    "CITADEL_API_KEYS": json.dumps({caller: [key] for caller, key in KEYS.items()}),
    "CITADEL_AUDIT_PSEUDONYM_KEY": PSEUDONYM_KEY,
    "CITADEL_ACL": json.dumps(
        {"sentinel": ["encrypt"], "conductor": ["decrypt", "sign", "rewrap"]}
    ),
    "CITADEL_RATE_LIMIT_PER_CALLER": "1000000/minute",
    "CITADEL_RATE_LIMIT_AUTH_FAILURES": "1000000/minute",
}


@contextmanager
def citadel_with_stdout(
    cwd: Path, stdout: int | IO[bytes]
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m citadel serve`` writing its standard output to ``stdout``; stderr to a file."""
    port = free_port()
    with open(cwd / "stderr.log", "wb") as err:
        proc = subprocess.Popen(
            [*CITADEL, "serve", "--port", str(port)],
            cwd=cwd,
            env=clean_env(**SERVE_ENV),
            stdout=stdout,
            stderr=err,
        )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_for_health(url: str, proc: subprocess.Popen[bytes], cwd: Path) -> None:
    for _ in range(300):
        if proc.poll() is not None:
            raise AssertionError(f"citadel exited: {(cwd / 'stderr.log').read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        threading.Event().wait(0.1)
    raise AssertionError("citadel did not answer /health")


def encrypt(c: httpx.Client, caller: str | None = "sentinel") -> httpx.Response:
    return c.post("/encrypt", json={"plaintext": "x"}, headers=headers(caller))


def assert_audit_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["code"] == "provider_unavailable"
    assert int(r.headers["retry-after"]) >= 1


# -- finding 3: standard output closed ---------------------------------------------


@pytest.fixture
def closed_stdout(tmp_path: Path) -> Iterator[str]:
    read_end, write_end = os.pipe()
    with citadel_with_stdout(tmp_path, write_end) as (url, proc):
        os.close(write_end)
        os.close(read_end)  # the log shipper is gone before the first request
        wait_for_health(url, proc, tmp_path)
        yield url


def test_closed_stdout_fails_an_operation_with_503_json_and_retry_after(closed_stdout: str) -> None:
    with httpx.Client(base_url=closed_stdout, timeout=5) as c:
        assert_audit_unavailable(encrypt(c))


def test_closed_stdout_fails_an_unauthenticated_operation_with_503_too(closed_stdout: str) -> None:
    with httpx.Client(base_url=closed_stdout, timeout=5) as c:
        assert_audit_unavailable(encrypt(c, None))
        r = c.post(
            "/decrypt", json={"encrypted_data": "x"}, headers={"X-Internal-API-Key": "wrong"}
        )
        assert_audit_unavailable(r)


@pytest.mark.parametrize("operation", ["decrypt", "sign", "rewrap"])
def test_closed_stdout_fails_every_operation_with_503(closed_stdout: str, operation: str) -> None:
    with httpx.Client(base_url=closed_stdout, timeout=5) as c:
        r = c.post(f"/{operation}", json={"encrypted_data": "x"}, headers=headers("conductor"))
        assert_audit_unavailable(r)


def test_closed_stdout_makes_ready_503_while_health_answers(closed_stdout: str) -> None:
    with httpx.Client(base_url=closed_stdout, timeout=5) as c:
        encrypt(c)
        assert c.get("/ready").status_code == 503
        assert c.get("/health").status_code == 200
        assert c.get("/health").json()["status"] == "degraded"


# -- finding 4: standard output stalled ---------------------------------------------


def fill_until_refused(c: httpx.Client, limit: int = 5000) -> int:
    """Encrypt until an audit line cannot be written; the number of requests served before."""
    for served in range(limit):
        r = encrypt(c)
        if r.status_code == 503:
            assert_audit_unavailable(r)
            return served
        assert r.status_code == 200, r.text
    raise AssertionError(f"{limit} audit lines fitted in a pipe nobody reads")


def test_stalled_stdout_fails_requests_fast_keeps_health_and_recovers_once_read(
    tmp_path: Path,
) -> None:
    proc_out: list[subprocess.Popen[bytes]] = []
    with citadel_with_stdout(tmp_path, subprocess.PIPE) as (url, proc):
        proc_out.append(proc)
        wait_for_health(url, proc, tmp_path)
        # Client timeouts bound every wait: a hung process fails the test with ReadTimeout.
        with httpx.Client(base_url=url, timeout=5) as c:
            served = fill_until_refused(c)
            assert served > 100  # a 64 KiB pipe holds some hundreds of lines before it stalls
            assert_audit_unavailable(encrypt(c))  # the next one fails too, within the timeout
            assert_audit_unavailable(encrypt(c, None))
            assert c.get("/health").status_code == 200
            assert c.get("/ready").status_code == 503

            assert proc.stdout is not None
            drained = threading.Thread(target=proc.stdout.read, daemon=True)
            drained.start()  # the shipper reads again, until the process ends
            statuses = []
            for _ in range(100):
                statuses.append(encrypt(c).status_code)
                if statuses[-1] == 200:
                    break
                threading.Event().wait(0.1)
            assert statuses[-1] == 200, statuses
            assert set(statuses) <= {200, 503}
            assert c.get("/ready").status_code == 200


def test_a_stalled_stdout_never_cuts_or_mixes_audit_lines(tmp_path: Path) -> None:
    """Whatever was refused, every line that reaches the pipe is one whole JSON object."""
    with citadel_with_stdout(tmp_path, subprocess.PIPE) as (url, proc):
        wait_for_health(url, proc, tmp_path)
        with httpx.Client(base_url=url, timeout=5) as c:
            served = fill_until_refused(c)
            for _ in range(5):
                encrypt(c)
            assert proc.stdout is not None
            out: list[bytes] = []
            reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)  # type: ignore[union-attr]
            reader.start()
            for _ in range(100):
                if encrypt(c).status_code == 200:
                    break
                threading.Event().wait(0.1)
        proc.send_signal(signal.SIGTERM)
        reader.join(15)
    events = [json.loads(line) for line in out[0].splitlines()]
    audits = [e for e in events if e.get("event") == "audit"]
    assert len([e for e in audits if e["code"] == "ok"]) >= served + 1
    assert all(e["operation"] == "encrypt" for e in audits)


# -- finding 5: bad settings never print their value ----------------------------------


def assert_one_line_naming(result: subprocess.CompletedProcess[str], variable: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    for secret in ("hunter2", "CANARY"):
        assert secret not in result.stderr and secret not in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "uri",
    [
        "redis://:hunter2CANARY@host:637x/0",
        "redis://:hunter2CANARY@host:99999/0",
        "redis://:hunter2CANARY@host:/0",
        "redis://:hunter2CANARY@:6379/0",
        "redis://:hunter2CANARY@host:6379/zero",
        "redis://:hunter2CANARY@[::1:6379/0",
        "rediss://user:hunter2CANARY@host:-1/0",
        "redis+unix://:hunter2CANARY@",
        "memcached://:hunter2CANARY@host:11211",
        "mongodb://:hunter2CANARY@host:27017",
        "hunter2CANARY",
    ],
)
def test_a_bad_storage_uri_exits_2_naming_the_setting_without_its_password(
    tmp_path: Path, uri: str
) -> None:
    result = run(
        ["serve", "--port", str(free_port())],
        tmp_path,
        CITADEL_RATE_LIMIT_STORAGE_URI=uri,
        **SERVE_ENV,
    )
    assert_one_line_naming(result, "CITADEL_RATE_LIMIT_STORAGE_URI")


@pytest.mark.parametrize(
    "url",
    [
        "https://user:hunter2CANARY@api.evervault.test:44x/",
        "https://user:hunter2CANARY@api.evervault.test:99999/",
        "ftp://user:hunter2CANARY@api.evervault.test/",
        "https://user:hunter2CANARY@/",
        "https://user:hunter2CANARY@[::1/",
        "hunter2CANARY",
    ],
)
def test_a_bad_evervault_url_exits_2_naming_the_setting_without_its_value(
    tmp_path: Path, url: str
) -> None:
    result = run(
        ["serve", "--port", str(free_port())],
        tmp_path,
        CITADEL_PROVIDER="evervault",
        EVERVAULT_APP_ID="app_test",
        EVERVAULT_API_KEY="ev:key:test",
        EVERVAULT_API_URL=url,
        **SERVE_ENV,
    )
    assert_one_line_naming(result, "EVERVAULT_API_URL")


@pytest.mark.parametrize(
    "proxies",
    ["10.0.0.0/8,hunter2CANARY", "10.0.0.0/33", "300.0.0.1", "hunter2CANARY/8", "10.0.0.1/abc"],
)
def test_a_bad_trusted_proxy_list_exits_2_naming_the_setting_without_its_value(
    tmp_path: Path, proxies: str
) -> None:
    result = run(
        ["serve", "--port", str(free_port())],
        tmp_path,
        CITADEL_TRUSTED_PROXIES=proxies,
        **SERVE_ENV,
    )
    assert_one_line_naming(result, "CITADEL_TRUSTED_PROXIES")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CITADEL_READ_TIMEOUT_S", "hunter2CANARY"),
        ("CITADEL_READ_TIMEOUT_S", "0"),
        ("CITADEL_READ_TIMEOUT_S", "nan"),
        ("CITADEL_RATE_LIMITS", '{"sentinel": "hunter2CANARY"}'),
        ("CITADEL_RATE_LIMIT_PER_USER", "hunter2CANARY"),
        ("CITADEL_DECRYPT_PROVIDERS", "local,hunter2CANARY"),
        ("CITADEL_MAX_SIGN_MESSAGE_BYTES", "1e999"),
    ],
)
def test_other_bad_settings_exit_2_with_one_line_and_no_value(
    tmp_path: Path, variable: str, value: str
) -> None:
    result = run(["serve", "--port", str(free_port())], tmp_path, **{**SERVE_ENV, variable: value})
    assert_one_line_naming(result, variable)
