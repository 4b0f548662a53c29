"""``from_env()`` on both clients: exactly the contract's variables, errors that name them only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import respx
from support import CLIENT_BASE, FakeTime

from citadel_client import AsyncCitadelClient, CitadelClient, ConfigError
from citadel_client.config import read_env

KEY = "CANARY-ENV-API-KEY-77c1a0"
CANARY_PATH_PART = "CANARY-PATH-e41b"


def env(**values: str) -> dict[str, str]:
    return {"CITADEL_URL": CLIENT_BASE, **values}


def sync_from(environ: dict[str, str], fake: FakeTime, **kw: Any) -> CitadelClient:
    return CitadelClient.from_env(environ, sleep=fake.sleep, clock=fake.clock, **kw)


def test_from_env_sends_the_api_key_of_citadel_api_key(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").respond(200, json={"encrypted_data": "ct"})
    with sync_from(env(CITADEL_API_KEY=KEY), fake) as client:
        assert client.encrypt("x") == "ct"
    assert route.calls.last.request.headers["X-Internal-API-Key"] == KEY


def test_from_env_reads_the_key_file_without_its_newline(
    mocked: respx.MockRouter, fake: FakeTime, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    route = mocked.post("/encrypt").respond(200, json={"encrypted_data": "ct"})
    with sync_from(env(CITADEL_API_KEY_FILE=str(key_file)), fake) as client:
        client.encrypt("x")
    assert route.calls.last.request.headers["X-Internal-API-Key"] == KEY


@pytest.mark.anyio
async def test_async_from_env_sends_the_api_key(mocked: respx.MockRouter, fake: FakeTime) -> None:
    route = mocked.post("/decrypt").respond(200, json={"plaintext": "p"})
    client = AsyncCitadelClient.from_env(env(CITADEL_API_KEY=KEY), sleep=fake.asleep)
    async with client:
        with await client.decrypt("ct") as plain:
            assert plain.reveal() == "p"
    assert route.calls.last.request.headers["X-Internal-API-Key"] == KEY


def test_from_env_passes_the_other_options_through(
    mocked: respx.MockRouter, fake: FakeTime
) -> None:
    route = mocked.post("/encrypt").respond(200, json={"encrypted_data": "ct"})
    with sync_from(env(CITADEL_API_KEY=KEY), fake, user_id="user-1") as client:
        client.encrypt("x")
    assert route.calls.last.request.headers["X-User-ID"] == "user-1"


def test_empty_variables_count_as_unset() -> None:
    with pytest.raises(ConfigError, match="CITADEL_URL is not set"):
        read_env({"CITADEL_URL": "  ", "CITADEL_API_KEY": KEY})


def assert_names_only(exc: pytest.ExceptionInfo[ConfigError], variable: str) -> None:
    text = str(exc.value) + repr(exc.value)
    assert variable in text
    assert KEY not in text and CANARY_PATH_PART not in text
    # Nothing chained either: an OSError's message would name the path.
    assert exc.value.__cause__ is None
    assert exc.value.__context__ is None or exc.value.__suppress_context__


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"CITADEL_API_KEY": KEY}, "CITADEL_URL"),
        ({"CITADEL_URL": f"ftp://{CANARY_PATH_PART}/", "CITADEL_API_KEY": KEY}, "CITADEL_URL"),
        ({"CITADEL_URL": f"http://{CANARY_PATH_PART}\x00/", "CITADEL_API_KEY": KEY}, "CITADEL_URL"),
        (env(), "CITADEL_API_KEY"),
        (env(CITADEL_API_KEY=KEY, CITADEL_API_KEY_FILE="/x"), "CITADEL_API_KEY_FILE"),
        (env(CITADEL_API_KEY_FILE=f"/nonexistent/{CANARY_PATH_PART}"), "CITADEL_API_KEY_FILE"),
        (env(CITADEL_API_KEY=KEY + "\u00e9"), "CITADEL_API_KEY"),
        (env(CITADEL_API_KEY=KEY, CITADEL_CA_FILE=f"/no/{CANARY_PATH_PART}"), "CITADEL_CA_FILE"),
        (
            env(CITADEL_API_KEY=KEY, CITADEL_CLIENT_CERT_FILE=f"/no/{CANARY_PATH_PART}"),
            "CITADEL_CLIENT_CERT_FILE",
        ),
        (env(CITADEL_API_KEY=KEY, CITADEL_CLIENT_KEY_FILE="/no/key"), "CITADEL_CLIENT_KEY_FILE"),
    ],
    ids=[
        "no-url",
        "not-http",
        "not-a-url",
        "no-key",
        "key-and-key-file",
        "unreadable-key-file",
        "non-ascii-key",
        "bad-ca",
        "bad-cert",
        "key-without-cert",
    ],
)
def test_a_bad_environment_names_the_variable_never_its_value(
    environ: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        CitadelClient.from_env(environ)
    assert_names_only(exc, variable)
    with pytest.raises(ConfigError) as exc:
        AsyncCitadelClient.from_env(environ)
    assert_names_only(exc, variable)


def test_an_empty_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("\n")
    with pytest.raises(ConfigError, match="CITADEL_API_KEY_FILE names an empty file"):
        read_env(env(CITADEL_API_KEY_FILE=str(tmp_path / "key")))


def test_only_the_contracts_variables_are_read() -> None:
    """The server's CITADEL_API_KEYS, or a generic API_KEY, is not the client's key."""
    with pytest.raises(ConfigError, match="neither CITADEL_API_KEY nor CITADEL_API_KEY_FILE"):
        read_env(env(CITADEL_API_KEYS='{"sentinel": ["k"]}', API_KEY=KEY, citadel_api_key=KEY))


def test_from_env_reads_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, mocked: respx.MockRouter, fake: FakeTime
) -> None:
    for name in ("CITADEL_API_KEY_FILE", "CITADEL_CA_FILE", "CITADEL_CLIENT_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("CITADEL_CLIENT_KEY_FILE", raising=False)
    monkeypatch.setenv("CITADEL_URL", CLIENT_BASE)
    monkeypatch.setenv("CITADEL_API_KEY", KEY)
    route = mocked.post("/rewrap").respond(200, json={"encrypted_data": "ct2"})
    with CitadelClient.from_env(sleep=fake.sleep) as client:
        assert client.rewrap("ct") == "ct2"
    assert route.calls.last.request.headers["X-Internal-API-Key"] == KEY


def test_env_settings_repr_hides_the_key() -> None:
    assert KEY not in repr(read_env(env(CITADEL_API_KEY=KEY)))


def test_verify_false_is_refused() -> None:
    with pytest.raises(ConfigError, match="verify=False is refused"):
        CitadelClient(CLIENT_BASE, KEY, verify=False)


def test_a_bad_base_url_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ConfigError, match="base_url must be an http"):
        CitadelClient("citadel:8004", KEY)
    with pytest.raises(ConfigError, match="base_url is not a URL"):
        AsyncCitadelClient("http://citadel\x00/", KEY)
