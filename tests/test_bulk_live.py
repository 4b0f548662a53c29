"""``citadel rewrap`` as a process against a real running Citadel (issue 10's bulk tool).

The Citadel is served on loopback with the local provider; a ``migrator``
caller holds ``rewrap`` and its own high limit (``CITADEL_RATE_LIMITS``), as
an operator would set a migration up. The input is made under keys that are
then rotated away from (one of them retired), so the tool has real work and
real rejects. What the server did is read from its audit sink: one
``/rewrap`` line per line sent (a batch writes one per item, with its
``batch_index``), each with the ``ct_fp`` of the ciphertext it was sent.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import KEYS, Served, make_settings, serve_citadel, wait_until

from citadel.keyring import change_keyring, create_keyring, load_keyring, rotate_keyring
from citadel.providers.local import LocalProvider
from citadel_client.fingerprint import fingerprint
from evervault_emulator import EvervaultEmulator

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MIGRATOR_KEY = "migrator-key-" + "9" * 40
N = 10_000


@dataclass
class Site:
    served: Served
    keyring: Path
    retired: str  # a key id retired before the run
    active: str  # the key the tool must rewrap into

    def provider(self) -> LocalProvider:
        """The keyring as it is now, to check thousands of ciphertexts without HTTP."""
        return LocalProvider(load_keyring(self.keyring))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Site, LocalProvider, LocalProvider]]:
    """A Citadel whose keyring went k0 -> k1 -> k2 (active), k0 retired.

    Yields the site and providers encrypting under k0 and under k1, to make input with.
    """
    keyring = tmp_path / "keyring.json"
    create_keyring(keyring, origin="operator")
    under_k0 = LocalProvider(load_keyring(keyring))
    rotate_keyring(keyring)
    under_k1 = LocalProvider(load_keyring(keyring))
    active = rotate_keyring(keyring)
    retired = under_k0.active_key_id
    change_keyring(keyring, lambda ring: ring.retire(retired))
    settings = make_settings(
        tmp_path,
        api_keys={**{c: [k] for c, k in KEYS.items()}, "migrator": [MIGRATOR_KEY]},
        acl={"sentinel": ["encrypt"], "conductor": ["decrypt"], "migrator": ["rewrap"]},
        rate_limits={"migrator": "1000000/minute"},
    )
    with serve_citadel(settings) as served:
        yield Site(served, keyring, retired, active), under_k0, under_k1


def plaintext(i: int) -> str:
    return f"exchange-secret-{i:05d}"


def record(i: int, ct: str) -> str:
    return json.dumps({"id": i, "encrypted_data": ct, "account": f"acct-{i}"})


def tool(tmp_path: Path, url: str, *argv: str, **popen: Any) -> subprocess.Popen[str]:
    """``citadel rewrap`` as a process, with the migrator's key from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITADEL_", "EVERVAULT_"))}
    env.update(PYTHONPATH=str(ROOT), CITADEL_API_KEY=MIGRATOR_KEY)
    return subprocess.Popen(
        [sys.executable, "-m", "citadel", "rewrap", *argv, "--url", url, "--concurrency", "16"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def check_rewrapped(site: Site, before: str, after: str, i: int) -> None:
    """``after`` is ``before`` with only encrypted_data changed, under the active key."""
    old, new = json.loads(before), json.loads(after)
    assert {k: v for k, v in new.items() if k != "encrypted_data"} == {
        k: v for k, v in old.items() if k != "encrypted_data"
    }, i
    assert new["encrypted_data"].startswith(f"cit1:{site.active}:"), i
    assert new["encrypted_data"] != old["encrypted_data"], i


# -- 10,000 lines with bad ones -------------------------------------------------------------------


def test_10000_lines_are_rewrapped_in_order_with_bad_lines_rejected(
    tmp_path: Path, site: tuple[Site, LocalProvider, LocalProvider]
) -> None:
    s, under_k0, under_k1 = site
    tampered = under_k1.encrypt_sync("tampered")
    tampered = tampered[:-2] + ("AA" if not tampered.endswith("AA") else "BB")
    expected_rejects = {
        137: "key_retired",
        5003: "key_retired",
        9998: "key_retired",
        1000: "invalid_ciphertext",  # not a ciphertext at all
        4000: "invalid_ciphertext",  # tampered
        7000: "invalid_ciphertext",  # a key id no keyring has
        2500: "invalid_line",  # not JSON
        6000: "missing_field",
    }
    lines = []
    for i in range(1, N + 1):
        code = expected_rejects.get(i)
        if code == "key_retired":
            lines.append(record(i, under_k0.encrypt_sync(plaintext(i))))
        elif i == 1000:
            lines.append(record(i, "definitely-not-a-ciphertext"))
        elif i == 4000:
            lines.append(record(i, tampered))
        elif i == 7000:
            lines.append(record(i, "cit1:0badc0de:" + "A" * 80))
        elif i == 2500:
            lines.append('{"id": 2500, "encrypted_data": ')
        elif i == 6000:
            lines.append(json.dumps({"id": 6000, "account": "acct-6000"}))
        else:
            lines.append(record(i, under_k1.encrypt_sync(plaintext(i))))
    src = tmp_path / "export.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "rewrapped.jsonl"

    code, err = finish(tool(tmp_path, s.served.url, str(src), "--output", str(out)))

    assert code == 1, err  # done, with rejected lines
    result = out.read_text().splitlines()
    assert len(result) == N
    check = s.provider()
    for i, (before, after) in enumerate(zip(lines, result, strict=True), 1):
        if i in expected_rejects:
            assert after == before, i  # copied unchanged
        else:
            check_rewrapped(s, before, after, i)
            assert check.decrypt_sync(json.loads(after)["encrypted_data"]) == plaintext(i), i
    rejects_file = tmp_path / "rewrapped.jsonl.rejects"
    rejects = [json.loads(line) for line in rejects_file.read_text().splitlines()]
    assert {r["line"]: r["code"] for r in rejects} == expected_rejects
    assert [r["line"] for r in rejects] == sorted(expected_rejects)
    events = [e for e in s.served.audit.events() if e["operation"] == "rewrap"]
    assert len(events) == N - 2  # one audit line per line holding a ciphertext, no retries
    assert sum(e["code"] == "ok" for e in events) == N - 8
    assert sorted(e["code"] for e in events if e["code"] != "ok") == sorted(
        code for code in expected_rejects.values() if code in ("key_retired", "invalid_ciphertext")
    )
    assert max(e.get("batch_size", 1) for e in events) == 100  # batches, after the first line
    by_item = {(e["request_id"], e.get("batch_index")): e for e in events}
    for r in rejects:
        if "request_id" in r:  # the lines that got a call lead to their audit event
            event = by_item[(r["request_id"], r.get("batch_index"))]
            assert event["code"] == r["code"]
            assert event["ct_fp"] == r["ct_fp"]
    assert f"{N - 8} rewrapped, 0 passed through, 8 rejected" in err
    assert MIGRATOR_KEY not in err
    assert plaintext(1) not in err + rejects_file.read_text()
    assert not (tmp_path / "rewrapped.jsonl.partial").exists()


def test_rewrapped_lines_decrypt_through_citadel(
    tmp_path: Path, site: tuple[Site, LocalProvider, LocalProvider]
) -> None:
    s, _, under_k1 = site
    lines = [record(i, under_k1.encrypt_sync(plaintext(i))) for i in range(1, 41)]
    src = tmp_path / "small.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "small.out.jsonl"
    code, err = finish(tool(tmp_path, s.served.url, str(src), "--output", str(out)))
    assert code == 0, err
    with s.served.client() as c:
        for i, line in enumerate(out.read_text().splitlines(), 1):
            ct = json.loads(line)["encrypted_data"]
            assert ct.startswith(f"cit1:{s.active}:")
            r = c.post(
                "/decrypt",
                json={"encrypted_data": ct},
                headers={"X-Internal-API-Key": KEYS["conductor"]},
            )
            assert r.json() == {"plaintext": plaintext(i)}


# -- interrupted, resumed, rerun ----------------------------------------------------------------


def complete_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def calls_by_run(site: Site, lines: list[str]) -> dict[str, list[int]]:
    """Line numbers sent, per run: the run from the tool's request ids
    (``rewrap-<run id>-<first line of the batch>``), each line from its event's ``ct_fp``."""
    line_of = {
        fingerprint(json.loads(line)["encrypted_data"]): number
        for number, line in enumerate(lines, 1)
        if line.endswith("}") and "encrypted_data" in json.loads(line)
    }
    runs: dict[str, list[int]] = {}
    for e in site.served.audit.events():
        if e["operation"] == "rewrap":
            _, run, _first = e["request_id"].split("-")
            runs.setdefault(run, []).append(line_of.get(e["ct_fp"], 0))  # 0: another input
    return runs


# Bad lines that never get a call, before and after where the run is killed (at 1,000 lines
# or later): the rejects of the killed run are kept once, and a rerun makes a single call.
CALLLESS_REJECTS = {
    10: "invalid_line",
    500: "missing_field",
    9000: "invalid_line",
    9500: "missing_field",
}


def test_killed_run_resumes_with_only_the_remaining_calls_and_a_rerun_makes_one(
    tmp_path: Path, site: tuple[Site, LocalProvider, LocalProvider]
) -> None:
    s, _, under_k1 = site
    lines = []
    for i in range(1, N + 1):
        if CALLLESS_REJECTS.get(i) == "invalid_line":
            lines.append(f'{{"id": {i}, "encrypted_data": "cit1:')
        elif CALLLESS_REJECTS.get(i) == "missing_field":
            lines.append(json.dumps({"id": i, "account": f"acct-{i}"}))
        else:
            lines.append(record(i, under_k1.encrypt_sync(plaintext(i))))
    src = tmp_path / "export.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "rewrapped.jsonl"
    partial = tmp_path / "rewrapped.jsonl.partial"

    proc = tool(tmp_path, s.served.url, str(src), "--output", str(out))
    try:
        wait_until(
            lambda: complete_lines(partial) >= 1000 or proc.poll() is not None,
            timeout=120,
            interval=0.01,
        )
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    kept = complete_lines(partial)
    assert 1000 <= kept < 9000
    (killed_run,) = calls_by_run(s, lines)

    code, err = finish(tool(tmp_path, s.served.url, str(src), "--output", str(out), "--resume"))

    assert code == 1, err  # finished, with the rejected lines
    runs = calls_by_run(s, lines)
    (resumed_run,) = set(runs) - {killed_run}
    called_before = set(runs[killed_run])
    assert called_before >= set(range(1, kept + 1)) - set(CALLLESS_REJECTS)  # kept lines had theirs
    # Only what was left, each line once (9000 and 9500 get no call).
    assert sorted(runs[resumed_run]) == [
        i for i in range(kept + 1, N + 1) if i not in CALLLESS_REJECTS
    ]
    assert f"({kept} lines kept from the partial output)" in err
    result = out.read_text().splitlines()
    assert len(result) == N
    check = s.provider()
    for i, (before, after) in enumerate(zip(lines, result, strict=True), 1):
        if i in CALLLESS_REJECTS:
            assert after == before, i
        else:
            check_rewrapped(s, before, after, i)
            assert check.decrypt_sync(json.loads(after)["encrypted_data"]) == plaintext(i), i
    assert not partial.exists()
    rejects_file = tmp_path / "rewrapped.jsonl.rejects"
    rejects = [json.loads(line) for line in rejects_file.read_text().splitlines()]
    assert [(r["line"], r["code"]) for r in rejects] == sorted(CALLLESS_REJECTS.items())

    # A rerun over the finished output: every ciphertext is already under the active key.
    again = tmp_path / "again.jsonl"
    code, err = finish(tool(tmp_path, s.served.url, str(out), "--output", str(again)))
    assert code == 1, err  # the same four lines are rejected again
    line_of_output = calls_by_run(s, out.read_text().splitlines())
    (rerun_id,) = set(line_of_output) - {killed_run, resumed_run}
    assert line_of_output[rerun_id] == [1]  # one call, for the first line
    assert f"1 rewrapped, {N - 5} passed through, 4 rejected" in err
    rerun = again.read_text().splitlines()
    assert rerun[1:] == result[1:]  # passed through byte for byte
    check_rewrapped(s, result[0], rerun[0], 1)  # the one call: a fresh ciphertext, same key
    assert check.decrypt_sync(json.loads(rerun[0])["encrypted_data"]) == plaintext(1)


def test_rate_limited_calls_are_retried_until_every_line_is_rewrapped(tmp_path: Path) -> None:
    keyring = tmp_path / "keyring.json"
    create_keyring(keyring, origin="operator")
    under_k0 = LocalProvider(load_keyring(keyring))
    active = rotate_keyring(keyring)
    settings = make_settings(
        tmp_path,
        api_keys={**{c: [k] for c, k in KEYS.items()}, "migrator": [MIGRATOR_KEY]},
        acl={"migrator": ["rewrap"]},
        rate_limits={"migrator": "40/second"},
    )
    lines = [record(i, under_k0.encrypt_sync(plaintext(i))) for i in range(1, 201)]
    src = tmp_path / "export.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "rewrapped.jsonl"
    with serve_citadel(settings) as served:
        # A batch counts its items against the limit and must fit in it whole: 20 of 40/s.
        code, err = finish(
            tool(tmp_path, served.url, str(src), "--output", str(out), "--batch-size", "20")
        )
        events = [e for e in served.audit.events() if e["operation"] == "rewrap"]
    assert code == 0, err
    assert sum(e["code"] == "rate_limited" for e in events) > 0  # it was held back, and waited
    assert sum(e["code"] == "ok" for e in events) == len(lines)  # then every line got through
    check = LocalProvider(load_keyring(keyring))
    for i, line in enumerate(out.read_text().splitlines(), 1):
        ct = json.loads(line)["encrypted_data"]
        assert ct.startswith(f"cit1:{active}:")
        assert check.decrypt_sync(ct) == plaintext(i)


def test_bulk_migration_from_local_to_evervault_decrypts_in_the_emulator(
    tmp_path: Path, emulator: EvervaultEmulator
) -> None:
    keyring = tmp_path / "keyring.json"
    create_keyring(keyring, origin="operator")
    under_local = LocalProvider(load_keyring(keyring))
    settings = make_settings(
        tmp_path,
        provider="evervault",
        decrypt_providers_raw="local",
        evervault_app_id=emulator.app_id,
        evervault_api_key=emulator.api_key,
        evervault_api_url=emulator.url,
        api_keys={**{c: [k] for c, k in KEYS.items()}, "migrator": [MIGRATOR_KEY]},
        acl={"migrator": ["rewrap"]},
        rate_limits={"migrator": "1000000/minute"},
    )
    lines = [record(i, under_local.encrypt_sync(plaintext(i))) for i in range(1, 301)]
    src = tmp_path / "export.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / "on-evervault.jsonl"
    with serve_citadel(settings) as served, served.client() as c:
        wait_until(lambda: c.get("/ready").status_code == 200, timeout=15)
        code, err = finish(tool(tmp_path, served.url, str(src), "--output", str(out)))
    assert code == 0, err
    result = [json.loads(line) for line in out.read_text().splitlines()]
    cts = [r["encrypted_data"] for r in result]
    assert all(ct.startswith("ev:") for ct in cts)
    assert [r["id"] for r in result] == list(range(1, 301))
    auth = base64.b64encode(f"{emulator.app_id}:{emulator.api_key}".encode()).decode()
    r = httpx.post(
        emulator.url + "decrypt",
        json={"data": cts},
        headers={"Authorization": f"Basic {auth}"},
        timeout=60,
    )
    assert r.json()["data"] == [plaintext(i) for i in range(1, 301)]


def test_a_caller_without_the_rewrap_grant_aborts_with_exit_2_and_a_resumable_partial(
    tmp_path: Path,
) -> None:
    keyring = tmp_path / "keyring.json"
    create_keyring(keyring, origin="operator")
    under_k0 = LocalProvider(load_keyring(keyring))
    rotate_keyring(keyring)
    settings = make_settings(
        tmp_path,
        api_keys={**{c: [k] for c, k in KEYS.items()}, "migrator": [MIGRATOR_KEY]},
        acl={"migrator": ["decrypt"]},  # rewrap not granted
    )
    src = tmp_path / "export.jsonl"
    src.write_text("".join(record(i, under_k0.encrypt_sync(plaintext(i))) + "\n" for i in (1, 2)))
    out = tmp_path / "out.jsonl"
    with serve_citadel(settings) as served:
        code, err = finish(tool(tmp_path, served.url, str(src), "--output", str(out)))
        events = [e for e in served.audit.events() if e["operation"] == "rewrap"]
    assert code == 2, err
    assert "grant it `rewrap` in CITADEL_ACL" in err
    assert "--resume" in err
    assert not out.exists()
    assert (tmp_path / "out.jsonl.partial").exists()
    assert [e["code"] for e in events] == ["forbidden"]  # one call, then it stopped
    assert MIGRATOR_KEY not in err
