"""API keys: forms, several per caller, the keys file and rotation without a restart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import make_settings, serve_citadel, sha256_form, wait_until

from citadel.config import SettingError
from citadel.fileio import replace_atomically
from citadel.security import Authenticator

OLD = "old-sentinel-key-" + "1" * 40
NEW = "new-sentinel-key-" + "2" * 40


def write_keys(path: Path, *keys: str) -> None:
    replace_atomically(path, json.dumps({"sentinel": list(keys)}).encode())


def test_raw_and_sha256_forms_identify_the_same_caller() -> None:
    auth = Authenticator.build({"sentinel": [OLD, sha256_form(NEW)]}, {"sentinel": ["encrypt"]})
    assert auth.caller_for(OLD.encode()) == "sentinel"
    assert auth.caller_for(NEW.encode()) == "sentinel"
    assert auth.caller_for(sha256_form(NEW).encode()) is None
    assert auth.caller_for(b"") is None
    assert auth.caller_for(None) is None


def test_one_key_for_two_callers_is_refused() -> None:
    with pytest.raises(SettingError, match="two callers"):
        Authenticator.build({"a": [OLD], "b": [sha256_form(OLD)]}, {})


def test_repr_shows_callers_not_keys() -> None:
    auth = Authenticator.build({"sentinel": [OLD]}, {})
    assert OLD not in repr(auth)
    assert "sentinel" in repr(auth)


def test_keys_file_rotation_without_restart_or_failed_request(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    write_keys(keys_file, OLD)
    settings = make_settings(
        tmp_path,
        api_keys=None,
        api_keys_file=keys_file,
        rate_limit_per_caller="100000/minute",
        rate_limit_auth_failures="100000/minute",
    )
    with serve_citadel(settings) as s, s.client() as c:

        def status(key: str) -> int:
            r = c.post("/encrypt", json={"plaintext": "x"}, headers={"X-Internal-API-Key": key})
            return r.status_code

        assert (status(OLD), status(NEW)) == (200, 401)
        write_keys(keys_file, OLD, sha256_form(NEW))  # step 1: both keys valid
        wait_until(lambda: status(NEW) == 200)
        assert status(OLD) == 200
        write_keys(keys_file, sha256_form(NEW))  # step 2: the caller switched; revoke the old
        wait_until(lambda: status(OLD) == 401)
        assert status(NEW) == 200
        keys_file.write_text("{broken")  # a bad edit keeps the keys in force
        with pytest.raises(AssertionError):
            wait_until(lambda: status(NEW) != 200, timeout=3)
    events = [e for e in s.audit.events() if e["requestor"] is None]
    assert all(e["code"] == "unauthenticated" for e in events)


# -- production: no raw key a guesser could find (issue 19, item 4) --------------------------

SHORT = "k" * 31


def test_production_refuses_a_raw_key_shorter_than_32_characters(tmp_path: Path) -> None:
    from citadel.security import resolve_api_keys

    settings = make_settings(tmp_path, env="production", api_keys={"sentinel": [SHORT]})
    with pytest.raises(SettingError) as refused:
        resolve_api_keys(settings)
    assert refused.value.variable == "CITADEL_API_KEYS"
    assert SHORT not in str(refused.value) and "32" in str(refused.value)


def test_production_refuses_a_short_raw_key_in_the_keys_file_naming_the_file_setting(
    tmp_path: Path,
) -> None:
    from citadel.security import resolve_api_keys

    path = tmp_path / "keys.json"
    write_keys(path, SHORT)
    path.chmod(0o600)
    settings = make_settings(tmp_path, env="production", api_keys=None, api_keys_file=path)
    with pytest.raises(SettingError) as refused:
        resolve_api_keys(settings)
    assert refused.value.variable == "CITADEL_API_KEYS_FILE"


def test_production_takes_a_raw_key_of_32_characters_and_any_sha256_form(tmp_path: Path) -> None:
    from citadel.security import resolve_api_keys

    keys = {"sentinel": ["k" * 32], "conductor": [sha256_form(SHORT)]}
    settings = make_settings(tmp_path, env="production", api_keys=keys)
    assert resolve_api_keys(settings)[0] == keys


def test_development_takes_a_short_raw_key(tmp_path: Path) -> None:
    from citadel.security import resolve_api_keys

    settings = make_settings(tmp_path, api_keys={"sentinel": [SHORT]})
    assert resolve_api_keys(settings)[0] == {"sentinel": [SHORT]}
