"""Issue 15, finding 6: key files that other local users could read or replace.

The keyring (``CITADEL_LOCAL_KEYRING``), the API keys file
(``CITADEL_API_KEYS_FILE``) and the development key files must grant nothing
to others, at most read to the group, and belong to Citadel's user or root.
Production refuses anything else, at start-up (exit 2, one line naming the
setting and the mode to use, never a value) and on a hot reload (the keys in
force stay); development logs ``secret_file_unsafe`` and starts.

Every server here is a real ``python -m citadel serve`` process.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import KEYS, PSEUDONYM_KEY, headers, run, serving, sha256_form, wait_until

from citadel.config import secret_file_problem
from citadel.keyring import Key, create_keyring, dump_keyring, load_keyring

NEW_KEY = "new-sentinel-key-" + "7" * 40
KEYS_DOC = {caller: [key] for caller, key in KEYS.items()}


def keyring_at(path: Path, mode: int) -> Path:
    create_keyring(path, origin="operator")
    path.chmod(mode)
    return path


def keys_file_at(path: Path, mode: int, doc: dict[str, list[str]] | None = None) -> Path:
    path.write_text(json.dumps(doc or KEYS_DOC))
    path.chmod(mode)
    return path


def production_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {
        "CITADEL_ENV": "production",
        "CITADEL_AUDIT_PSEUDONYM_KEY": PSEUDONYM_KEY,
        "CITADEL_LOCAL_KEYRING": str(tmp / "keyring.json"),
        "CITADEL_API_KEYS_FILE": str(tmp / "api-keys.json"),
        # The reload tests poll with keys that are refused until the file loads.
        "CITADEL_RATE_LIMIT_PER_CALLER": "1000000/minute",
        "CITADEL_RATE_LIMIT_AUTH_FAILURES": "1000000/minute",
    }
    env.update(extra)
    return env


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def assert_one_line_refusal(stderr: str, setting: str, mode: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert setting in lines[0] and f"mode {mode}" in lines[0], stderr
    assert "chmod 600" in lines[0], stderr
    assert "Traceback" not in stderr
    for key in KEYS.values():
        assert key not in stderr


# -- the rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "refused"),
    [
        (0o600, False),
        (0o400, False),
        (0o640, False),
        (0o440, False),
        (0o700, False),
        (0o644, True),
        (0o666, True),
        (0o604, True),
        (0o601, True),
        (0o660, True),
        (0o620, True),
        (0o650, True),
        (0o777, True),
    ],
)
def test_the_rule_no_other_permission_and_the_group_reads_at_most(mode: int, refused: bool) -> None:
    problem = secret_file_problem(mode, os.geteuid())
    assert (problem is not None) == refused
    if problem is not None:
        assert f"{mode:04o}" in problem and "chmod 600" in problem


def test_the_rule_owner_is_citadels_user_or_root() -> None:
    assert secret_file_problem(0o600, 0, euid=10001) is None
    assert secret_file_problem(0o600, 10001, euid=10001) is None
    problem = secret_file_problem(0o600, 4242, euid=10001)
    assert problem is not None and "uid 4242" in problem and "chown" in problem


# -- production: start-up refuses -------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o666, 0o660])
def test_production_refuses_an_unsafe_keyring(tmp_path: Path, mode: int) -> None:
    keyring_at(tmp_path / "keyring.json", mode)
    keys_file_at(tmp_path / "api-keys.json", 0o600)
    result = run(["serve"], tmp_path, **production_env(tmp_path))
    assert result.returncode == 2, result.stderr
    assert_one_line_refusal(result.stderr, "CITADEL_LOCAL_KEYRING", f"{mode:04o}")


@pytest.mark.parametrize("mode", [0o644, 0o666, 0o660])
def test_production_refuses_an_unsafe_api_keys_file(tmp_path: Path, mode: int) -> None:
    keyring_at(tmp_path / "keyring.json", 0o600)
    keys_file_at(tmp_path / "api-keys.json", mode)
    result = run(["serve"], tmp_path, **production_env(tmp_path))
    assert result.returncode == 2, result.stderr
    assert_one_line_refusal(result.stderr, "CITADEL_API_KEYS_FILE", f"{mode:04o}")


def test_production_refuses_an_unsafe_api_keys_file_with_the_evervault_provider(
    tmp_path: Path,
) -> None:
    # No keyring involved at all: the API keys file is checked on its own.
    keys_file_at(tmp_path / "api-keys.json", 0o644)
    env = production_env(
        tmp_path,
        CITADEL_PROVIDER="evervault",
        EVERVAULT_APP_ID="app_0e0e0e0e0e0e",
        EVERVAULT_API_KEY="ev:key:1:not-a-real-key",
        EVERVAULT_API_URL="http://127.0.0.1:9/",
    )
    result = run(["serve"], tmp_path, **env)
    assert result.returncode == 2, result.stderr
    assert_one_line_refusal(result.stderr, "CITADEL_API_KEYS_FILE", "0644")


def secret_volume(mount: Path, name: str, mode: int) -> Path:
    """A Kubernetes Secret volume's layout: ``name -> ..data/name``, ``..data -> ..<ts>``."""
    (mount / "..2026_01_01").mkdir(parents=True)
    real = mount / "..2026_01_01" / name
    if name == "keyring.json":
        keyring_at(real, mode)
    else:
        keys_file_at(real, mode)
    (mount / "..data").symlink_to("..2026_01_01")
    (mount / name).symlink_to(f"..data/{name}")
    return mount / name


def test_production_checks_the_file_a_symlink_resolves_to(tmp_path: Path) -> None:
    keyring = secret_volume(tmp_path / "keyring", "keyring.json", 0o644)
    keys = secret_volume(tmp_path / "api-keys", "api-keys.json", 0o440)
    assert stat.S_IMODE(os.lstat(keyring).st_mode) == 0o777  # the link itself: always 0777
    env = production_env(
        tmp_path, CITADEL_LOCAL_KEYRING=str(keyring), CITADEL_API_KEYS_FILE=str(keys)
    )
    result = run(["serve"], tmp_path, **env)
    assert result.returncode == 2, result.stderr
    assert_one_line_refusal(result.stderr, "CITADEL_LOCAL_KEYRING", "0644")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_production_refuses_a_file_owned_by_another_user(tmp_path: Path) -> None:
    keyring_at(tmp_path / "keyring.json", 0o600)
    os.chown(keys_file_at(tmp_path / "api-keys.json", 0o600), 4242, 4242)
    result = run(["serve"], tmp_path, **production_env(tmp_path))
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "CITADEL_API_KEYS_FILE" in line and "uid 4242" in line and "chown" in line, line
    assert len(line.splitlines()) == 1


# -- production: safe modes start ------------------------------------------------------


@pytest.mark.parametrize(
    ("keyring_mode", "keys_mode"), [(0o600, 0o600), (0o400, 0o400), (0o440, 0o640)]
)
def test_production_starts_with_owner_only_or_group_read_files(
    tmp_path: Path, keyring_mode: int, keys_mode: int
) -> None:
    keyring_at(tmp_path / "keyring.json", keyring_mode)
    keys_file_at(tmp_path / "api-keys.json", keys_mode)
    with serving(tmp_path, **production_env(tmp_path)) as (url, proc):
        r = httpx.post(
            url + "/encrypt", json={"plaintext": "x"}, headers=headers("sentinel"), timeout=5
        )
        assert r.status_code == 200, r.text
    assert proc.stdout is not None
    assert not [e for e in json_lines(proc.stdout.read()) if e["event"] == "secret_file_unsafe"]
    # The same set-up with one bit more, read for others, is refused: the mode is the line.
    (tmp_path / "api-keys.json").chmod(keys_mode | 0o004)
    result = run(["serve"], tmp_path, **production_env(tmp_path))
    assert result.returncode == 2, result.stderr
    assert_one_line_refusal(result.stderr, "CITADEL_API_KEYS_FILE", f"{keys_mode | 0o004:04o}")


def test_production_starts_on_a_kubernetes_secret_volume_at_0440(tmp_path: Path) -> None:
    # deploy/kubernetes mounts both Secrets with defaultMode 0440 and the pod's fsGroup.
    keyring = secret_volume(tmp_path / "keyring", "keyring.json", 0o440)
    keys = secret_volume(tmp_path / "api-keys", "api-keys.json", 0o440)
    env = production_env(
        tmp_path, CITADEL_LOCAL_KEYRING=str(keyring), CITADEL_API_KEYS_FILE=str(keys)
    )
    with serving(tmp_path, **env) as (url, _):
        assert httpx.get(url + "/ready", timeout=5).status_code == 200
    # Kubernetes' own default, defaultMode 0644 (0444 read-only), would be refused.
    keyring.resolve().chmod(0o444)
    result = run(["serve"], tmp_path, **env)
    assert result.returncode == 2, result.stderr
    assert_one_line_refusal(result.stderr, "CITADEL_LOCAL_KEYRING", "0444")


# -- production: a hot reload of an unsafe file is refused, the keys in force stay -----


def encrypt(url: str, key: str) -> httpx.Response:
    return httpx.post(
        url + "/encrypt", json={"plaintext": "x"}, headers={"X-Internal-API-Key": key}, timeout=5
    )


def replace_with_mode(path: Path, data: bytes, mode: int) -> None:
    """An atomic replace whose new file has ``mode`` (as a careless `cp` would leave it)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def events_in(log: Path, name: str) -> list[dict[str, Any]]:
    return [e for e in json_lines(log.read_text()) if e.get("event") == name]


def test_production_does_not_reload_an_unsafe_api_keys_file(tmp_path: Path) -> None:
    keyring_at(tmp_path / "keyring.json", 0o600)
    keys = keys_file_at(tmp_path / "api-keys.json", 0o600)
    log = tmp_path / "serve.log"
    with serving(tmp_path, log=log, **production_env(tmp_path)) as (url, _):
        assert encrypt(url, KEYS["sentinel"]).status_code == 200
        doc = {**KEYS_DOC, "sentinel": [sha256_form(NEW_KEY)]}
        replace_with_mode(keys, json.dumps(doc).encode(), 0o644)
        wait_until(lambda: bool(events_in(log, "api_keys_reload_failed")))
        (failed,) = events_in(log, "api_keys_reload_failed")
        assert "CITADEL_API_KEYS_FILE" in failed["problem"] and "0644" in failed["problem"]
        assert encrypt(url, KEYS["sentinel"]).status_code == 200  # the old keys stay
        assert encrypt(url, NEW_KEY).status_code == 401
        keys.chmod(0o600)  # the fix alone is a change: the file is loaded now
        wait_until(lambda: encrypt(url, NEW_KEY).status_code == 200)
        assert encrypt(url, KEYS["sentinel"]).status_code == 401
    assert NEW_KEY not in log.read_text()


def test_production_does_not_reload_an_unsafe_keyring(tmp_path: Path) -> None:
    ring_path = keyring_at(tmp_path / "keyring.json", 0o600)
    keys_file_at(tmp_path / "api-keys.json", 0o600)
    log = tmp_path / "serve.log"
    before = load_keyring(ring_path)
    fresh = Key.generate(taken=before.ids)
    after = before.add(fresh).activate(fresh.id)

    def active_kid(url: str) -> str:
        r = encrypt(url, KEYS["sentinel"])
        assert r.status_code == 200, r.text
        kid: str = r.json()["encrypted_data"].split(":")[1]
        return kid

    with serving(tmp_path, log=log, **production_env(tmp_path)) as (url, _):
        assert active_kid(url) == before.active
        replace_with_mode(ring_path, dump_keyring(after), 0o644)
        wait_until(lambda: bool(events_in(log, "keyring_reload_failed")))
        failed = events_in(log, "keyring_reload_failed")[0]
        assert "0644" in failed["problem"] and failed["keeping_active"] == before.active
        assert active_kid(url) == before.active
        ring_path.chmod(0o600)
        wait_until(lambda: active_kid(url) == fresh.id)


# -- development: a warning, and start-up goes on ----------------------------------------


def test_development_warns_about_unsafe_files_and_starts(tmp_path: Path) -> None:
    keyring_at(tmp_path / "keyring.json", 0o644)
    keys_file_at(tmp_path / "api-keys.json", 0o666)
    env = production_env(tmp_path)
    env.pop("CITADEL_ENV")
    with serving(tmp_path, **env) as (url, proc):
        assert encrypt(url, KEYS["sentinel"]).status_code == 200
    assert proc.stdout is not None
    warned = {
        e["setting"]: e
        for e in json_lines(proc.stdout.read())
        if e["event"] == "secret_file_unsafe"
    }
    assert set(warned) == {"CITADEL_LOCAL_KEYRING", "CITADEL_API_KEYS_FILE"}
    ring, keys = warned["CITADEL_LOCAL_KEYRING"], warned["CITADEL_API_KEYS_FILE"]
    assert (ring["mode"], keys["mode"]) == ("0644", "0666")
    assert ring["path"] == str((tmp_path / "keyring.json").resolve())
    assert ring["level"] == "warning"
    assert "0600" in ring["expected"] and "0440" in ring["expected"]


def test_development_warns_about_unsafe_generated_key_files(tmp_path: Path) -> None:
    with serving(tmp_path):  # creates .citadel/ with its key files, all 0600
        pass
    dev = tmp_path / ".citadel"
    for name in ("keyring.json", "dev-api-keys.json", "audit-pseudonym.key"):
        assert stat.S_IMODE((dev / name).stat().st_mode) == 0o600
        (dev / name).chmod(0o644)
    with serving(tmp_path) as (url, proc):
        assert httpx.get(url + "/health", timeout=5).status_code == 200
    assert proc.stdout is not None
    warned = {
        e["setting"]: e["mode"]
        for e in json_lines(proc.stdout.read())
        if e["event"] == "secret_file_unsafe"
    }
    assert warned == {
        "CITADEL_LOCAL_KEYRING": "0644",
        "CITADEL_API_KEYS": "0644",
        "CITADEL_AUDIT_PSEUDONYM_KEY": "0644",
    }
