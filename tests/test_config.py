"""Settings: only the contract's exact variable names are ever read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from citadel.config import DEFAULT_ACL, Settings, describe_settings_error

GENERIC = {
    "ACL": json.dumps({"api-gateway": ["decrypt"]}),
    "API_KEYS": json.dumps({"sentinel": ["letmein"]}),
    "ENV": "staging",
    "PROVIDER": "evervault",
    "acl": json.dumps({"api-gateway": ["decrypt"]}),
    "citadel_env": "staging",
    "Citadel_Acl": json.dumps({"api-gateway": ["decrypt"]}),
    "RATE_LIMIT_STORAGE_URI": "nonsense",
    "LOCAL_KEYRING": "/elsewhere.json",
}


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import os

    for name in list(os.environ):
        if name.upper().startswith(("CITADEL_", "EVERVAULT_")) or name.upper() in GENERIC:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_generic_environment_variables_change_nothing(
    clean: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in GENERIC.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.acl == DEFAULT_ACL
    assert settings.api_keys is None
    assert settings.env == "development"
    assert settings.provider == "local"
    assert settings.rate_limit_storage_uri == "memory://"
    assert settings.local_keyring == Path(".citadel/keyring.json")


def test_generic_names_in_dotenv_change_nothing(clean: Path) -> None:
    (clean / ".env").write_text("".join(f"{k}='{v}'\n" for k, v in GENERIC.items()))
    settings = Settings()
    assert settings.acl == DEFAULT_ACL
    assert settings.api_keys is None
    assert settings.env == "development"


def test_exact_names_are_read_from_the_environment(
    clean: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CITADEL_ACL", json.dumps({"conductor": ["decrypt", "sign"]}))
    monkeypatch.setenv("CITADEL_ENV", "production")
    assert Settings().acl == {"conductor": ["decrypt", "sign"]}
    assert Settings().env == "production"


def test_exact_names_are_read_from_dotenv(clean: Path) -> None:
    (clean / ".env").write_text("CITADEL_RATE_LIMIT_PER_CALLER=7/second\n")
    assert Settings().rate_limit_per_caller == "7/second"


def test_names_differing_only_in_case_are_not_read(
    clean: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("citadel_acl", json.dumps({"api-gateway": ["decrypt"]}))
    assert Settings().acl == DEFAULT_ACL


def test_from_fields_builds_settings_by_field_name(clean: Path) -> None:
    settings = Settings.from_fields(rate_limit_per_caller="5/second", env="production")
    assert (settings.rate_limit_per_caller, settings.env) == ("5/second", "production")


def test_decrypt_providers_always_include_the_encrypting_provider(clean: Path) -> None:
    settings = Settings.from_fields(decrypt_providers_raw="local", provider="local")
    assert settings.decrypt_providers == ("local",)
    settings = Settings.from_fields(
        provider="evervault",
        decrypt_providers_raw="local",
        evervault_app_id="app_x",
        evervault_api_key="ev:key:x",
    )
    assert settings.decrypt_providers == ("evervault", "local")


def test_evervault_in_decrypt_providers_requires_its_credentials(clean: Path) -> None:
    with pytest.raises(Exception) as info:
        Settings.from_fields(decrypt_providers_raw="local,evervault")
    assert "EVERVAULT_APP_ID" in describe_settings_error(info.value)


def test_per_caller_limit_overrides_replace_the_default_for_that_caller(clean: Path) -> None:
    settings = Settings.from_fields(rate_limits={"migrator": "100/second"})
    assert settings.rate_limit_for("migrator") == "100/second"
    assert settings.rate_limit_for("sentinel") == "100/minute"


@pytest.mark.parametrize(
    "uri",
    [
        "redis://:hunter2-CANARY@host:637x/0",
        "redis://:hunter2-CANARY@host:99999/0",
        "redis://:hunter2-CANARY@:6379/0",
        "redis://:hunter2-CANARY@host:6379/zero",
        "memcached://hunter2-CANARY@host",
    ],
)
def test_a_bad_storage_uri_is_named_without_its_password(clean: Path, uri: str) -> None:
    with pytest.raises(Exception) as info:
        Settings.from_fields(rate_limit_storage_uri=uri)
    line = describe_settings_error(info.value)
    assert "CITADEL_RATE_LIMIT_STORAGE_URI" in line
    assert "CANARY" not in line and "hunter2" not in line


def test_a_bad_trusted_proxy_list_is_refused(clean: Path) -> None:
    with pytest.raises(Exception) as info:
        Settings.from_fields(trusted_proxies_raw="10.0.0.0/8, not-an-address")
    assert "CITADEL_TRUSTED_PROXIES" in describe_settings_error(info.value)
    assert "not-an-address" not in describe_settings_error(info.value)
