"""``citadel`` as a person runs it: a real process, real settings, real HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from support import free_port

CITADEL = [sys.executable, "-m", "citadel"]
SECRET_VALUE = "CANARY-SETTING-VALUE-91x"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITADEL_", "EVERVAULT_"))}
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CITADEL, *args], cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=30
    )


@contextmanager
def serving(cwd: Path, *args: str, **env: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    port = free_port()
    proc = subprocess.Popen(
        [*CITADEL, "serve", "--port", str(port), *args],
        cwd=cwd,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"citadel did not start: {proc.stdout.read() if proc.stdout else ''}"
                )
            time.sleep(0.05)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CITADEL_ENV", SECRET_VALUE),
        ("CITADEL_PROVIDER", SECRET_VALUE),
        ("CITADEL_API_KEYS", SECRET_VALUE),
        ("CITADEL_API_KEYS", json.dumps({"sentinel": SECRET_VALUE})),
        ("CITADEL_ACL", json.dumps({"sentinel": [SECRET_VALUE]})),
        ("CITADEL_RATE_LIMIT_PER_CALLER", SECRET_VALUE),
        ("CITADEL_RATE_LIMIT_STORAGE_URI", SECRET_VALUE),
        ("CITADEL_BREAKER_FAIL_MAX", SECRET_VALUE),
        ("CITADEL_MAX_PLAINTEXT_BYTES", SECRET_VALUE),
        ("CITADEL_LOG_LEVEL", SECRET_VALUE),
        ("EVERVAULT_API_URL", SECRET_VALUE),
        ("EVERVAULT_TIMEOUT_S", SECRET_VALUE),
        ("CITADEL_AUDIT_PSEUDONYM_KEY", "short"),
    ],
)
def test_bad_setting_stops_start_up_with_one_line_naming_it(
    tmp_path: Path, variable: str, value: str
) -> None:
    result = run(["serve", "--port", str(free_port())], tmp_path, **{variable: value})
    assert result.returncode == 2
    assert SECRET_VALUE not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert SECRET_VALUE not in lines[0]
    assert "short" not in lines[0].replace("shorter", "")


def test_setting_from_dotenv_file_is_used(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"CITADEL_ENV={SECRET_VALUE}\n")
    result = run(["serve"], tmp_path)
    assert result.returncode == 2
    assert "CITADEL_ENV" in result.stderr


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, "CITADEL_API_KEYS"),
        ({"CITADEL_API_KEYS": '{"sentinel": ["k"]}'}, "CITADEL_AUDIT_PSEUDONYM_KEY"),
        (
            {"CITADEL_API_KEYS": '{"sentinel": ["k"]}', "CITADEL_AUDIT_PSEUDONYM_KEY": "p" * 32},
            "CITADEL_LOCAL_KEYRING",
        ),
        (
            {
                "CITADEL_API_KEYS": '{"sentinel": ["k"]}',
                "CITADEL_AUDIT_PSEUDONYM_KEY": "p" * 32,
                "CITADEL_DOCS": "true",
            },
            "CITADEL_DOCS",
        ),
    ],
    ids=["no-api-keys", "no-pseudonym-key", "no-keyring", "docs-on"],
)
def test_production_refuses_unsafe_set_ups(tmp_path: Path, env: dict[str, str], named: str) -> None:
    result = run(["serve"], tmp_path, CITADEL_ENV="production", **env)
    assert result.returncode == 2
    assert named in result.stderr
    assert not (tmp_path / ".citadel" / "keyring.json").exists()


def test_production_refuses_an_auto_created_keyring(tmp_path: Path) -> None:
    run(["keyring", "show"], tmp_path)  # nothing is created by show...
    with serving(tmp_path):  # ...but a development start creates one
        pass
    result = run(
        ["serve"],
        tmp_path,
        CITADEL_ENV="production",
        CITADEL_API_KEYS='{"sentinel": ["k"]}',
        CITADEL_AUDIT_PSEUDONYM_KEY="p" * 32,
    )
    assert result.returncode == 2
    assert "CITADEL_LOCAL_KEYRING" in result.stderr
    assert "auto-created" in result.stderr


def test_corrupt_keyring_stops_start_up_and_is_kept(tmp_path: Path) -> None:
    ring = tmp_path / ".citadel" / "keyring.json"
    ring.parent.mkdir()
    ring.write_text("{corrupt")
    result = run(["serve"], tmp_path)
    assert result.returncode == 2
    assert "CITADEL_LOCAL_KEYRING" in result.stderr
    assert "Traceback" not in result.stderr
    assert ring.read_text() == "{corrupt"


def test_keygen_prints_a_key_and_its_sha256_form(tmp_path: Path) -> None:
    key, hashed = run(["keygen"], tmp_path).stdout.split()
    assert len(bytes.fromhex(key)) == 32
    assert hashed == "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def test_audit_pseudonym_matches_the_hmac(tmp_path: Path) -> None:
    out = run(["audit-pseudonym", "alice"], tmp_path, CITADEL_AUDIT_PSEUDONYM_KEY="k" * 20)
    expected = hmac.new(b"k" * 20, b"alice", hashlib.sha256).hexdigest()[:16]
    assert out.stdout.strip() == "u_" + expected


def test_development_start_creates_dev_keys_and_logs_only_their_path(tmp_path: Path) -> None:
    with serving(tmp_path) as (url, proc):
        keys_file = tmp_path / ".citadel" / "dev-api-keys.json"
        keys = json.loads(keys_file.read_text())
        assert set(keys) == {"sentinel", "conductor"}
        assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
        r = httpx.post(
            url + "/encrypt",
            json={"plaintext": "dev"},
            headers={"X-Internal-API-Key": keys["sentinel"][0]},
        )
        assert r.status_code == 200
    output = proc.stdout.read() if proc.stdout else ""
    assert "dev-api-keys.json" in output
    for key in (*keys["sentinel"], *keys["conductor"]):
        assert key not in output


def test_ciphertexts_survive_a_restart(tmp_path: Path) -> None:
    with serving(tmp_path) as (url, _):
        keys = json.loads((tmp_path / ".citadel" / "dev-api-keys.json").read_text())
        ct = httpx.post(
            url + "/encrypt",
            json={"plaintext": "survives"},
            headers={"X-Internal-API-Key": keys["sentinel"][0]},
        ).json()["encrypted_data"]
    with serving(tmp_path) as (url, _):
        r = httpx.post(
            url + "/decrypt",
            json={"encrypted_data": ct},
            headers={"X-Internal-API-Key": keys["conductor"][0]},
        )
    assert r.json() == {"plaintext": "survives"}


def test_workers_share_one_keyring(tmp_path: Path) -> None:
    with serving(tmp_path, "--workers", "2") as (url, proc):
        keys = json.loads((tmp_path / ".citadel" / "dev-api-keys.json").read_text())
        s = {"X-Internal-API-Key": keys["sentinel"][0]}
        c = {"X-Internal-API-Key": keys["conductor"][0]}
        with httpx.Client(base_url=url) as client:
            cts = [
                client.post("/encrypt", json={"plaintext": f"p{i}"}, headers=s).json()[
                    "encrypted_data"
                ]
                for i in range(20)
            ]
        for i, ct in enumerate(cts):
            # a new connection each time, so both workers serve some of them
            r = httpx.post(url + "/decrypt", json={"encrypted_data": ct}, headers=c)
            assert r.json() == {"plaintext": f"p{i}"}
    assert "rate_limits_per_worker" in (proc.stdout.read() if proc.stdout else "")
