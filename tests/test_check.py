"""``citadel check`` (issue 19, item 2): every item serve needs, one line each, no port opened.

Real processes: the command as an operator runs it, with a real redis-server,
the Evervault emulator, and addresses where nothing listens.
"""

from __future__ import annotations

import json
from pathlib import Path

from support import KEYS, PSEUDONYM_KEY, RedisServer, free_port, run

from evervault_emulator import EvervaultEmulator

KEYS_ENV = json.dumps({caller: [key] for caller, key in KEYS.items()})
# An evervault instance's settings but Evervault's own.
EVERVAULT_INSTANCE = {
    "CITADEL_PROVIDER": "evervault",
    "CITADEL_API_KEYS": KEYS_ENV,
    "CITADEL_AUDIT_PSEUDONYM_KEY": PSEUDONYM_KEY,
}


def lines_of(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines())


def test_check_in_a_fresh_development_directory_is_all_ok_and_creates_nothing(
    tmp_path: Path,
) -> None:
    result = run(["check"], tmp_path)
    assert result.returncode == 0, result.stdout
    got = lines_of(result.stdout)
    assert set(got) == {
        "settings",
        "api keys and acl",
        "audit pseudonym key",
        "provider local (keyring)",
        "rate-limit storage",
        "audit stream",
    }
    assert all(text.startswith("ok") for text in got.values())
    assert list(tmp_path.iterdir()) == []


def test_check_with_a_bad_setting_exits_2_in_one_line_naming_it(tmp_path: Path) -> None:
    result = run(["check"], tmp_path, CITADEL_ENV="staging-CANARY")
    assert result.returncode == 2
    assert result.stdout.splitlines() == [result.stdout.strip()]
    assert "CITADEL_ENV" in result.stdout and "CANARY" not in result.stdout + result.stderr


def test_check_in_production_names_each_missing_setting_and_exits_2(tmp_path: Path) -> None:
    result = run(["check"], tmp_path, CITADEL_ENV="production")
    assert result.returncode == 2
    got = lines_of(result.stdout)
    assert "CITADEL_API_KEYS" in got["api keys and acl"]
    assert "CITADEL_AUDIT_PSEUDONYM_KEY" in got["audit pseudonym key"]
    assert "citadel keyring init" in got["provider local (keyring)"]


def test_check_with_an_unreachable_redis_exits_1_naming_the_setting(tmp_path: Path) -> None:
    uri = f"redis://:CANARYPASSWORD@127.0.0.1:{free_port()}/0"
    result = run(["check"], tmp_path, CITADEL_RATE_LIMIT_STORAGE_URI=uri)
    assert result.returncode == 1
    assert "CITADEL_RATE_LIMIT_STORAGE_URI" in lines_of(result.stdout)["rate-limit storage"]
    assert "CANARYPASSWORD" not in result.stdout + result.stderr


def test_check_with_a_reachable_redis_is_ok(tmp_path: Path, redis_server: RedisServer) -> None:
    result = run(["check"], tmp_path, CITADEL_RATE_LIMIT_STORAGE_URI=redis_server.url)
    assert result.returncode == 0, result.stdout
    assert lines_of(result.stdout)["rate-limit storage"] == "ok (shared)"


def test_check_fetches_the_evervault_key_from_a_reachable_evervault(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    result = run(
        ["check"],
        tmp_path,
        **EVERVAULT_INSTANCE,
        EVERVAULT_APP_ID=emulator.app_id,
        EVERVAULT_API_KEY=emulator.api_key,
        EVERVAULT_API_URL=emulator.url,
    )
    assert result.returncode == 0, result.stdout
    assert lines_of(result.stdout)["provider evervault"].startswith("ok")


def test_check_with_evervault_unreachable_exits_1(tmp_path: Path) -> None:
    result = run(
        ["check"],
        tmp_path,
        **EVERVAULT_INSTANCE,
        EVERVAULT_APP_ID="app_0123456789ab",
        EVERVAULT_API_KEY="ev:key:CANARYEVKEY",
        EVERVAULT_API_URL=f"http://127.0.0.1:{free_port()}/",
        EVERVAULT_TIMEOUT_S="2",
    )
    assert result.returncode == 1, result.stdout
    assert "EVERVAULT_API_URL" in lines_of(result.stdout)["provider evervault"]
    assert "CANARYEVKEY" not in result.stdout + result.stderr


def test_check_json_is_one_document_with_each_item_and_the_exit_code(tmp_path: Path) -> None:
    uri = f"redis://127.0.0.1:{free_port()}/0"
    result = run(["check", "--json"], tmp_path, CITADEL_RATE_LIMIT_STORAGE_URI=uri)
    doc = json.loads(result.stdout)
    assert (result.returncode, doc["ok"], doc["exit_code"]) == (1, False, 1)
    by_item = {item["item"]: item for item in doc["items"]}
    assert by_item["rate-limit storage"]["ok"] is False
    assert by_item["settings"]["ok"] is True
