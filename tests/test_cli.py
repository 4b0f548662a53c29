"""``citadel`` as a person runs it: a real process, real settings, real HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
import stat
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from support import CITADEL, clean_env, free_port, run, serving

SECRET_VALUE = "CANARY-SETTING-VALUE-91x"


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
        (
            {"CITADEL_API_KEYS": '{"sentinel": ["kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"]}'},
            "CITADEL_AUDIT_PSEUDONYM_KEY",
        ),
        (
            {
                "CITADEL_API_KEYS": '{"sentinel": ["kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"]}',
                "CITADEL_AUDIT_PSEUDONYM_KEY": "p" * 32,
            },
            "CITADEL_LOCAL_KEYRING",
        ),
        (
            {
                "CITADEL_API_KEYS": '{"sentinel": ["kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"]}',
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


def test_production_refuses_a_short_raw_api_key_in_one_line_without_it(tmp_path: Path) -> None:
    short = "SHORTCANARY" + "k" * 10
    result = run(
        ["serve"],
        tmp_path,
        CITADEL_ENV="production",
        CITADEL_API_KEYS=json.dumps({"sentinel": [short]}),
        CITADEL_AUDIT_PSEUDONYM_KEY="p" * 32,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "CITADEL_API_KEYS" in result.stderr
    assert "SHORTCANARY" not in result.stderr + result.stdout


def test_production_refuses_an_auto_created_keyring(tmp_path: Path) -> None:
    run(["keyring", "show"], tmp_path)  # nothing is created by show...
    with serving(tmp_path):  # ...but a development start creates one
        pass
    result = run(
        ["serve"],
        tmp_path,
        CITADEL_ENV="production",
        CITADEL_API_KEYS='{"sentinel": ["kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"]}',
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


# -- citadel keyring ----------------------------------------------------------------


def key_strings(path: Path) -> list[str]:
    """The base64 key material in a keyring file: canaries that no output may hold."""
    return [entry["key"] for entry in json.loads(path.read_text())["keys"]]


def keyring(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(["keyring", *args, "--path", str(tmp_path / "keyring.json")], tmp_path)


def test_keyring_lifecycle_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    assert keyring(tmp_path, "init").returncode == 0
    first = json.loads(path.read_text())["active"]
    assert keyring(tmp_path, "add").returncode == 0
    (added,) = {e["id"] for e in json.loads(path.read_text())["keys"]} - {first}
    assert json.loads(path.read_text())["active"] == first  # add does not activate
    assert keyring(tmp_path, "activate", added).returncode == 0
    assert keyring(tmp_path, "retire", first).returncode == 0
    states = {e["id"]: e["state"] for e in json.loads(path.read_text())["keys"]}
    assert states == {first: "retired", added: "in_force"}
    assert json.loads(path.read_text())["active"] == added
    assert keyring(tmp_path, "restore", first).returncode == 0
    assert json.loads(path.read_text())["keys"][0]["state"] == "in_force"


def test_keyring_show_prints_ids_states_and_dates_never_key_material(tmp_path: Path) -> None:
    keyring(tmp_path, "init")
    keyring(tmp_path, "rotate")
    doc = json.loads((tmp_path / "keyring.json").read_text())
    old = next(e["id"] for e in doc["keys"] if e["id"] != doc["active"])
    keyring(tmp_path, "retire", old)
    result = keyring(tmp_path, "show")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert any(line.startswith(doc["active"]) and " active " in line for line in lines)
    assert any(line.startswith(old) and " retired " in line for line in lines)
    assert doc["keys"][0]["created"] in result.stdout
    for canary in key_strings(tmp_path / "keyring.json"):
        assert canary not in result.stdout + result.stderr


def test_no_keyring_command_ever_prints_key_material(tmp_path: Path) -> None:
    outputs = [keyring(tmp_path, "init"), keyring(tmp_path, "add"), keyring(tmp_path, "rotate")]
    doc = json.loads((tmp_path / "keyring.json").read_text())
    others = [e["id"] for e in doc["keys"] if e["id"] != doc["active"]]
    outputs += [
        keyring(tmp_path, "retire", others[0]),
        keyring(tmp_path, "restore", others[0]),
        keyring(tmp_path, "activate", others[1]),
        keyring(tmp_path, "retire", others[1]),  # refused: active
        keyring(tmp_path, "show"),
    ]
    text = "".join(r.stdout + r.stderr for r in outputs)
    for canary in key_strings(tmp_path / "keyring.json"):
        assert canary not in text


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["retire", "ACTIVE"], "active key"),
        (["activate", "0badc0de"], "no key"),
        (["retire", "0badc0de"], "no key"),
        (["restore", "0badc0de"], "no key"),
        (["activate", "RETIRED"], "retired"),
        (["init"], "exists"),
    ],
    ids=[
        "retire-active",
        "activate-unknown",
        "retire-unknown",
        "restore-unknown",
        "activate-retired",
        "init-existing",
    ],
)
def test_keyring_misuse_exits_2_with_one_line_and_changes_nothing(
    tmp_path: Path, args: list[str], problem: str
) -> None:
    keyring(tmp_path, "init")
    keyring(tmp_path, "rotate")
    doc = json.loads((tmp_path / "keyring.json").read_text())
    retired = next(e["id"] for e in doc["keys"] if e["id"] != doc["active"])
    keyring(tmp_path, "retire", retired)
    before = (tmp_path / "keyring.json").read_bytes()
    named = {"ACTIVE": doc["active"], "RETIRED": retired}
    result = keyring(tmp_path, *[named.get(a, a) for a in args])
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert problem in result.stderr
    assert (tmp_path / "keyring.json").read_bytes() == before


@pytest.mark.parametrize("action", ["show", "add", "rotate"])
def test_keyring_commands_on_a_missing_keyring_exit_2_and_create_nothing(
    tmp_path: Path, action: str
) -> None:
    result = keyring(tmp_path, action)
    assert result.returncode == 2
    assert "does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_keyring_path_defaults_to_citadel_local_keyring(tmp_path: Path) -> None:
    ring = tmp_path / "elsewhere" / "ring.json"
    assert run(["keyring", "init"], tmp_path, CITADEL_LOCAL_KEYRING=str(ring)).returncode == 0
    result = run(["keyring", "rotate"], tmp_path, CITADEL_LOCAL_KEYRING=str(ring))
    assert result.returncode == 0
    assert len(json.loads(ring.read_text())["keys"]) == 2


def test_keyring_change_through_a_symlink_keeps_the_link(tmp_path: Path) -> None:
    # A Kubernetes Secret volume: keyring.json -> ..data/keyring.json, ..data -> ..2026_01.
    mount = tmp_path / "secret"
    (mount / "..2026_01").mkdir(parents=True)
    target = mount / "..2026_01" / "keyring.json"
    assert run(["keyring", "init", "--path", str(target)], tmp_path).returncode == 0
    (mount / "..data").symlink_to("..2026_01")
    (mount / "keyring.json").symlink_to("..data/keyring.json")
    result = run(["keyring", "rotate", "--path", str(mount / "keyring.json")], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (mount / "keyring.json").is_symlink()
    assert (mount / "..data").is_symlink()
    assert len(json.loads(target.read_text())["keys"]) == 2
    assert sorted(p.name for p in mount.iterdir()) == ["..2026_01", "..data", "keyring.json"]


# -- citadel audit-pseudonym -------------------------------------------------------


def test_audit_pseudonym_without_a_key_exits_non_zero_and_creates_none(tmp_path: Path) -> None:
    result = run(["audit-pseudonym", "alice"], tmp_path)
    assert result.returncode != 0
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "CITADEL_AUDIT_PSEUDONYM_KEY" in result.stderr
    assert not (tmp_path / ".citadel").exists()


def test_audit_pseudonym_uses_the_development_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / ".citadel" / "audit-pseudonym.key"
    key_file.parent.mkdir()
    key_file.write_text("d" * 64 + "\n")
    result = run(["audit-pseudonym", "alice"], tmp_path)
    expected = hmac.new(b"d" * 64, b"alice", hashlib.sha256).hexdigest()[:16]
    assert result.stdout.strip() == "u_" + expected
    assert key_file.read_text() == "d" * 64 + "\n"


def test_audit_pseudonym_matches_the_key_a_development_server_made(tmp_path: Path) -> None:
    with serving(tmp_path):
        pass
    key = (tmp_path / ".citadel" / "audit-pseudonym.key").read_bytes().strip()
    result = run(["audit-pseudonym", "alice"], tmp_path)
    assert result.stdout.strip() == "u_" + hmac.new(key, b"alice", hashlib.sha256).hexdigest()[:16]


def test_audit_pseudonym_in_production_needs_the_setting(tmp_path: Path) -> None:
    key_file = tmp_path / ".citadel" / "audit-pseudonym.key"
    key_file.parent.mkdir()
    key_file.write_text("d" * 64 + "\n")
    result = run(["audit-pseudonym", "alice"], tmp_path, CITADEL_ENV="production")
    assert result.returncode != 0
    assert "CITADEL_AUDIT_PSEUDONYM_KEY" in result.stderr
    assert result.stdout == ""


# -- issue 19, items 2 and 3: --version, serve --help, a busy port ---------------------------


def test_version_prints_the_package_version_and_exits_0(tmp_path: Path) -> None:
    from importlib.metadata import version

    result = run(["--version"], tmp_path)
    assert (result.returncode, result.stdout) == (0, f"citadel {version('citadel')}\n")


def test_serve_help_shows_each_options_default_and_meaning(tmp_path: Path) -> None:
    result = run(["serve", "--help"], tmp_path)
    assert result.returncode == 0
    for text in ("address to listen on (default: 127.0.0.1)", "(default: 8004)", "(default: 1)"):
        assert text in " ".join(result.stdout.split())


def test_serve_on_a_busy_port_says_so_in_one_line_before_it_starts(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run(["serve", "--port", str(port)], tmp_path)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        f"citadel: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]
    assert "citadel_started" not in result.stdout


def test_keyring_show_json_lists_ids_states_and_dates_and_no_key_material(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ring.json"
    assert run(["keyring", "init", "--path", str(path)], tmp_path).returncode == 0
    result = run(["keyring", "show", "--json", "--path", str(path)], tmp_path)
    doc = json.loads(result.stdout)
    (key,) = doc["keys"]
    assert (doc["active"], key["id"], key["state"]) == (key["id"], doc["active"], "active")
    material = json.loads(path.read_text())["keys"][0]
    secret_values = [v for k, v in material.items() if k not in key and isinstance(v, str)]
    assert secret_values and not any(v in result.stdout for v in secret_values)


def test_a_development_server_says_on_stderr_where_its_keys_are_never_a_key(
    tmp_path: Path,
) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [*CITADEL, "serve", "--port", str(port)],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
            time.sleep(0.05)
    finally:
        proc.terminate()
        _, banner = proc.communicate(timeout=15)
    keys = json.loads((tmp_path / ".citadel" / "dev-api-keys.json").read_text())
    assert f"http://127.0.0.1:{port}" in banner and "dev-api-keys.json" in banner
    assert not any(key in banner for entries in keys.values() for key in entries)
