"""``citadel rewrap`` (client/citadel_client/bulk/) against a small fake of POST /rewrap.

The fake follows the contract: ``cit1:oldkid01:<x>`` comes back as
``cit1:newkid01:<x>``; a ciphertext containing "bad" is 400 invalid_ciphertext,
one containing "retired" 400 key_retired; some calls are refused once with
429 and ``Retry-After: 0``; after ``fail_after`` answers it breaks every
connection. The tool runs in-process with an injected clock, so retries
never sleep, or as a subprocess where it must be killed or piped.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support import FakeTime, serve_app, wait_until

from citadel.cli import build_parser
from citadel_client import AsyncCitadelClient, bulk
from citadel_client.bulk.progress import Progress, count_lines, waiting_for
from citadel_client.errors import (
    AuditUnavailable,
    CitadelConnectionError,
    ProviderUnavailable,
    RateLimited,
)

API_KEY = "CANARY-BULK-API-KEY-4d2a"
OLD, NEW = "cit1:oldkid01:", "cit1:newkid01:"
ROOT = Path(__file__).resolve().parent.parent


class FakeCitadel:
    """A raw ASGI app for POST /rewrap, single and batch forms; counts what it answered."""

    def __init__(self, *, fail_after: int | None = None, limit_suffix: str = "7") -> None:
        self.answered = 0  # items answered (200 or an item's error): one per line that got its call
        self.bodies: list[dict[str, Any]] = []
        self.max_items = 100  # CITADEL_MAX_BATCH_ITEMS: a longer batch is refused whole (422)
        self.limited = 0
        self.broken = 0
        self.request_ids: list[str] = []
        self.fail_after = fail_after
        # A request holding a line past this one (the number a test ciphertext
        # ends with) waits unanswered until it is set to None, then is dropped
        # uncounted (its client was killed).
        self.hold_from_line: int | None = None
        self.limit_suffix = limit_suffix
        self._limited_once: set[str] = set()
        self._lock = threading.Lock()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # a killed client
                return None
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        if scope["path"] != "/rewrap" or scope["method"] != "POST":
            return await self._send(send, 404, {"detail": "x", "code": "not_found"})
        if headers.get(b"x-internal-api-key") != API_KEY.encode():
            return await self._send(send, 401, {"detail": "x", "code": "unauthenticated"})
        payload = json.loads(body)
        batch = "batch" in payload
        items = payload["batch"] if batch else [payload]
        cts = [item["encrypted_data"] for item in items]
        if self.hold_from_line is not None and any(
            int(re.sub(r"^.*?(\d+)$", r"\1", ct)) > self.hold_from_line for ct in cts
        ):
            while self.hold_from_line is not None:
                await asyncio.sleep(0.01)
            return None
        self.bodies.append(payload)
        with self._lock:
            if self.fail_after is not None and self.answered + len(cts) > self.fail_after:
                self.broken += 1
                broken = True
            else:
                broken = False
                fresh = [ct for ct in cts if ct.endswith(self.limit_suffix)]
                limited = any(ct not in self._limited_once for ct in fresh)
                if limited:  # a batch that does not fit is refused whole
                    self._limited_once.update(fresh)
                    self.limited += 1
                else:
                    self.answered += len(cts)
                    self.request_ids.append(headers.get(b"x-request-id", b"").decode())
        if broken:
            # Start an answer and drop the connection: the client sees a transport error.
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"99")],
                }
            )
            raise ConnectionAbortedError("fake: connection dropped")
        if limited:
            return await self._send(
                send, 429, {"detail": "x", "code": "rate_limited"}, [(b"retry-after", b"0")]
            )
        if batch and (len(cts) > self.max_items or any("oversize" in ct for ct in cts)):
            # Checked whole before anything is done (the answered count is the fake's own).
            return await self._send(send, 422, {"detail": "x", "code": "invalid_request"})
        if not batch and "oversize" in cts[0]:
            return await self._send(send, 413, {"detail": "x", "code": "payload_too_large"})
        results = [self._result(ct) for ct in cts]
        if batch:
            return await self._send(send, 200, {"batch": results})
        if "error" in results[0]:
            return await self._send(send, 400, {"detail": "x", **results[0]["error"]})
        await self._send(send, 200, results[0])

    @staticmethod
    def _result(ct: str) -> dict[str, Any]:
        if "bad" in ct:
            return {"error": {"code": "invalid_ciphertext", "detail": "x"}}
        if "retired" in ct:
            return {"error": {"code": "key_retired", "detail": "x"}}
        return {"encrypted_data": NEW + ct.rsplit(":", 1)[-1]}

    @staticmethod
    async def _send(
        send: Any,
        status: int,
        body: dict[str, Any],
        extra: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    ) -> None:
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


@pytest.fixture
def fake_server() -> Iterator[tuple[FakeCitadel, str]]:
    app = FakeCitadel()
    with serve_app(app) as url:
        yield app, url


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-key"
    path.write_text(API_KEY + "\n")
    return path


# -- input and expectations ------------------------------------------------------


def record(i: int, ct: str) -> str:
    return json.dumps({"id": i, "encrypted_data": ct, "user": f"u-{i}"})


def make_input(n: int, *, bad_every: int = 0, retired: tuple[int, ...] = ()) -> list[str]:
    lines = []
    for i in range(1, n + 1):
        if bad_every and i % bad_every == 0:
            ct = f"{OLD}bad{i}"
        elif i in retired:
            ct = f"cit1:retired1:x{i}"
        else:
            ct = f"{OLD}p{i:06d}"
        lines.append(record(i, ct))
    return lines


def rewrapped(line: str) -> str:
    """What the tool writes for a line the fake rewraps."""
    obj = json.loads(line)
    obj["encrypted_data"] = NEW + obj["encrypted_data"].rsplit(":", 1)[-1]
    return json.dumps(obj)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def read_rejects(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(path)]


# -- running the tool --------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["rewrap", *argv])


def run_tool(
    url: str,
    key_file: Path,
    *argv: str,
    stdin: bytes | None = None,
    stderr: io.StringIO | None = None,
) -> tuple[int, str, bytes]:
    """The tool in-process; retries wait on a fake clock, so none sleeps."""
    fake = FakeTime()

    def client(u: str, key: str, deadline: float, on_retry: Any) -> AsyncCitadelClient:
        return AsyncCitadelClient(
            u, key, deadline=deadline, sleep=fake.asleep, clock=fake.clock, on_retry=on_retry
        )

    err, out = stderr or io.StringIO(), io.BytesIO()
    args = parse(*argv, "--url", url, "--api-key-file", str(key_file))
    code = bulk.execute(
        args,
        make_client=client,
        stdin=io.BytesIO(stdin) if stdin is not None else None,
        stdout=out,
        stderr=err,
        handle_signals=False,
    )
    return code, err.getvalue(), out.getvalue()


def tool_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITADEL_", "EVERVAULT_"))}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


# -- a full run ----------------------------------------------------------------------


def test_10000_lines_come_out_rewrapped_in_order_with_rejects(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    fake, url = fake_server
    lines = make_input(10_000, bad_every=997, retired=(4242,))
    lines[2499] = "{not json"
    lines[4999] = json.dumps({"id": 5000, "user": "u-5000"})
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"

    code, err, _ = run_tool(url, key_file, str(src), "--output", str(out), "--concurrency", "16")

    assert code == 1  # finished, with rejected lines
    result = read_lines(out)
    assert len(result) == 10_000
    rejected_at = {2500, 4242, 5000} | {i for i in range(997, 10_001, 997)}
    for i, (before, after) in enumerate(zip(lines, result, strict=True), 1):
        assert after == (before if i in rejected_at else rewrapped(before)), i
    assert fake.limited > 0  # 429s happened and were retried
    assert fake.answered == 10_000 - 2  # every line with a ciphertext got exactly one answer
    assert "9987 rewrapped, 0 passed through, 13 rejected" in err
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_rejects_file_holds_line_code_and_fields_never_the_ciphertext(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    _, url = fake_server
    lines = make_input(30, bad_every=10, retired=(3,))
    lines[4] = "{not json"
    lines[5] = json.dumps({"id": 6})
    lines[6] = json.dumps({"id": 7, "encrypted_data": 5})
    lines[7] = '{"id": 8, "encrypted_data": "a", "encrypted_data": "b"}'
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"

    code, _, _ = run_tool(url, key_file, str(src), "--output", str(out))

    assert code == 1
    rejects = read_rejects(tmp_path / "out.jsonl.rejects")
    by_line = {r["line"]: r for r in rejects}
    assert [r["line"] for r in rejects] == [3, 5, 6, 7, 8, 10, 20, 30]  # in input order
    assert by_line[3]["code"] == "key_retired"
    assert by_line[3]["fields"] == {"id": 3, "user": "u-3"}
    # Line 1 went alone (its answer names the target); lines 2, 3, 4, 9, ... in one batch.
    assert by_line[3]["request_id"].startswith("rewrap-")
    assert by_line[3]["request_id"].endswith("-2") and by_line[3]["batch_index"] == 1
    assert len(by_line[3]["ct_fp"]) == 16
    assert by_line[5] == {"line": 5, "code": "invalid_line"}
    assert by_line[6] == {"line": 6, "code": "missing_field", "fields": {"id": 6}}
    assert by_line[7] == {"line": 7, "code": "missing_field", "fields": {"id": 7}}
    assert by_line[8] == {"line": 8, "code": "invalid_line"}  # a duplicated key
    assert by_line[10]["code"] == "invalid_ciphertext"
    text = (tmp_path / "out.jsonl.rejects").read_text()
    assert "cit1:" not in text and "bad10" not in text
    for i in (3, 5, 6, 7, 8, 10):  # rejected lines are copied unchanged
        assert read_lines(out)[i - 1] == lines[i - 1]


def test_clean_run_exits_0_and_writes_an_empty_rejects_file(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    _, url = fake_server
    lines = make_input(50)
    src = write_lines(tmp_path / "in.jsonl", lines)
    stale = tmp_path / "out.jsonl.rejects"
    stale.write_text('{"line": 1, "code": "from an older run"}\n')

    code, err, _ = run_tool(url, key_file, str(src), "--output", str(tmp_path / "out.jsonl"))

    assert code == 0
    assert read_lines(tmp_path / "out.jsonl") == [rewrapped(line) for line in lines]
    assert stale.read_text() == ""
    assert "50 rewrapped, 0 passed through, 0 rejected" in err


def test_rewrapped_lines_keep_every_other_byte(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    _, url = fake_server
    src = tmp_path / "in.jsonl"
    src.write_bytes(
        b'{ "z":1.50,  "encrypted_data" : "cit1:oldkid01:aa", "name":"caf\\u00e9", "n":[1 ,2]}\r\n'
        b'{"encrypted_data":"cit1:oldkid01:bb","k":"\xc3\xa9"}'  # UTF-8, and no final newline
    )
    out = tmp_path / "out.jsonl"

    assert run_tool(url, key_file, str(src), "--output", str(out))[0] == 0

    assert out.read_bytes() == (
        b'{ "z":1.50,  "encrypted_data" : "cit1:newkid01:aa", "name":"caf\\u00e9", "n":[1 ,2]}\r\n'
        b'{"encrypted_data":"cit1:newkid01:bb","k":"\xc3\xa9"}\n'
    )


def test_null_ciphertext_passes_through_without_a_call(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    fake, url = fake_server
    lines = [json.dumps({"id": 1, "encrypted_data": None}), record(2, OLD + "x")]
    src = write_lines(tmp_path / "in.jsonl", lines)

    code, err, _ = run_tool(url, key_file, str(src), "--output", str(tmp_path / "o"))

    assert code == 0 and fake.answered == 1
    assert read_lines(tmp_path / "o")[0] == lines[0]
    assert "1 rewrapped, 1 passed through" in err


# -- passing through what is done -------------------------------------------------------


def test_skip_prefix_passes_lines_through_without_a_call(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    fake, url = fake_server
    lines = [record(i, (NEW if i % 2 else OLD) + f"q{i}") for i in range(1, 101)]
    src = write_lines(tmp_path / "in.jsonl", lines)

    code, err, _ = run_tool(
        url, key_file, str(src), "--output", str(tmp_path / "o"), "--skip-prefix", NEW
    )

    assert code == 0
    assert fake.answered == 50
    assert read_lines(tmp_path / "o") == [rewrapped(line) for line in lines]
    assert "50 rewrapped, 50 passed through" in err


def test_target_prefix_is_learned_from_the_first_answer(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    fake, url = fake_server
    # Already rewrapped data: only the first line is sent, to learn the target.
    lines = [record(i, NEW + f"q{i}") for i in range(1, 201)]
    src = write_lines(tmp_path / "in.jsonl", lines)

    code, err, _ = run_tool(url, key_file, str(src), "--output", str(tmp_path / "o"))

    assert code == 0
    assert fake.answered == 1
    assert read_lines(tmp_path / "o") == lines
    assert "1 rewrapped, 199 passed through" in err


def test_rerun_on_the_output_calls_only_for_what_was_rejected(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    fake, url = fake_server
    src = write_lines(tmp_path / "in.jsonl", make_input(300, bad_every=100))
    assert run_tool(url, key_file, str(src), "--output", str(tmp_path / "a"))[0] == 1
    fake.answered = 0

    code, err, _ = run_tool(url, key_file, str(tmp_path / "a"), "--output", str(tmp_path / "b"))

    assert code == 1
    assert fake.answered == 1 + 3  # the probe that learns the target, and the 3 bad lines
    assert read_lines(tmp_path / "b") == read_lines(tmp_path / "a")
    assert "296 passed through, 3 rejected" in err


# -- interruption and resume ---------------------------------------------------------------


def test_connection_failure_aborts_with_exit_2_and_a_consistent_partial(
    tmp_path: Path, key_file: Path
) -> None:
    lines = make_input(2000)
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    fake = FakeCitadel(fail_after=700)
    with serve_app(fake) as url:
        code, err, _ = run_tool(url, key_file, str(src), "--output", str(out))

    assert code == 2
    assert not out.exists()  # only a finished run makes the output
    partial = read_lines(tmp_path / "out.jsonl.partial")
    assert 0 < len(partial) <= 700
    assert partial == [rewrapped(line) for line in lines[: len(partial)]]
    assert (tmp_path / "out.jsonl.partial").read_bytes().endswith(b"\n")
    assert "could not be reached after retries" in err
    assert f"complete up to line {len(partial)}" in err
    assert "--resume" in err


def test_resume_after_an_abort_makes_only_the_remaining_calls(
    tmp_path: Path, key_file: Path
) -> None:
    lines = make_input(2000, bad_every=450)
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    with serve_app(FakeCitadel(fail_after=900)) as url:
        assert run_tool(url, key_file, str(src), "--output", str(out))[0] == 2
    kept = len(read_lines(tmp_path / "out.jsonl.partial"))

    fake = FakeCitadel()
    with serve_app(fake) as url:
        code, err, _ = run_tool(url, key_file, str(src), "--output", str(out), "--resume")

    assert code == 1  # the bad lines, from both runs
    assert fake.answered == 2000 - kept
    expected = [line if "bad" in line else rewrapped(line) for line in lines]
    assert read_lines(out) == expected
    rejects = read_rejects(tmp_path / "out.jsonl.rejects")
    assert [r["line"] for r in rejects] == [450, 900, 1350, 1800]
    assert f"({kept} lines kept from the partial output)" in err
    assert not (tmp_path / "out.jsonl.partial").exists()


def test_killed_process_resumes_from_its_partial_output(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    fake, url = fake_server
    # Lines past 2,000 are held, so the tool is killed midway however fast it is.
    fake.hold_from_line = 2000
    lines = make_input(4000, bad_every=500)
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "citadel", "rewrap", str(src), "--output", str(out)]
    proc = subprocess.Popen(
        [*argv, "--url", url, "--concurrency", "8"],
        env=tool_env(CITADEL_API_KEY=API_KEY),
        stderr=subprocess.PIPE,
    )
    try:
        partial = tmp_path / "out.jsonl.partial"
        wait_until(
            lambda: (partial.exists() and b"\n" in partial.read_bytes()) or proc.poll() is not None,
            timeout=60,
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    # What the kill left: complete lines, perhaps a torn one after them.
    kept = (tmp_path / "out.jsonl.partial").read_bytes().count(b"\n")
    assert kept > 0
    fake.hold_from_line = None
    fake.answered = 0

    code, _, _ = run_tool(url, key_file, str(src), "--output", str(out), "--resume")

    assert code == 1
    assert fake.answered == 4000 - kept  # only the lines the partial output did not hold
    assert read_lines(out) == [line if "bad" in line else rewrapped(line) for line in lines]
    assert [r["line"] for r in read_rejects(tmp_path / "out.jsonl.rejects")] == list(
        range(500, 4001, 500)
    )


def test_partial_output_without_resume_is_refused(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    fake, url = fake_server
    src = write_lines(tmp_path / "in.jsonl", make_input(10))
    (tmp_path / "out.jsonl.partial").write_text("left by an interrupted run\n")

    code, err, _ = run_tool(url, key_file, str(src), "--output", str(tmp_path / "out.jsonl"))

    assert code == 2 and fake.answered == 0
    assert "out.jsonl.partial exists" in err and "--resume" in err
    assert (tmp_path / "out.jsonl.partial").read_text() == "left by an interrupted run\n"


def test_resume_refuses_a_partial_output_of_another_input(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    fake, url = fake_server
    src = write_lines(tmp_path / "in.jsonl", make_input(10))
    # Same shape, other rows: only the fields beside the ciphertext can tell.
    other = [rewrapped(record(i + 100, OLD + f"p{i:06d}")) for i in range(1, 4)]
    write_lines(tmp_path / "out.jsonl.partial", other)

    code, err, _ = run_tool(
        url, key_file, str(src), "--output", str(tmp_path / "out.jsonl"), "--resume"
    )

    assert code == 2 and fake.answered == 0
    assert "does not match the input at line 1" in err


def test_resume_drops_a_line_torn_by_a_kill(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    fake, url = fake_server
    lines = make_input(10)
    src = write_lines(tmp_path / "in.jsonl", lines)
    done = "".join(rewrapped(line) + "\n" for line in lines[:4])
    (tmp_path / "out.jsonl.partial").write_text(done + rewrapped(lines[4])[:20])

    code, _, _ = run_tool(
        url, key_file, str(src), "--output", str(tmp_path / "out.jsonl"), "--resume"
    )

    assert code == 0 and fake.answered == 6
    assert read_lines(tmp_path / "out.jsonl") == [rewrapped(line) for line in lines]


def test_output_may_replace_the_input_in_place(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str], key_file: Path
) -> None:
    _, url = fake_server
    lines = make_input(100)
    src = write_lines(tmp_path / "data.jsonl", lines)

    code, _, _ = run_tool(url, key_file, str(src), "--output", str(src))

    assert code == 0
    assert read_lines(src) == [rewrapped(line) for line in lines]


# -- aborts that are not a line's fault -----------------------------------------------------


def test_unknown_api_key_aborts_with_exit_2(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    fake, url = fake_server
    src = write_lines(tmp_path / "in.jsonl", make_input(20))
    wrong = tmp_path / "wrong-key"
    wrong.write_text("not-the-key")

    code, err, _ = run_tool(url, wrong, str(src), "--output", str(tmp_path / "o"))

    assert code == 2 and fake.answered == 0
    assert "refused the API key" in err and "not-the-key" not in err
    assert read_lines(tmp_path / "o.partial") == []


# -- command line ----------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--api-key", "--api-key=", "--api"])
def test_an_api_key_on_the_command_line_is_refused_without_echo(
    option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [option + API_KEY] if option.endswith("=") else [option, API_KEY]
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert API_KEY not in err


def test_without_a_key_file_or_environment_it_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(bulk.API_KEY_ENV, raising=False)
    monkeypatch.delenv("CITADEL_API_KEY_FILE", raising=False)
    src = write_lines(tmp_path / "in.jsonl", make_input(1))
    err = io.StringIO()

    code = bulk.execute(parse(str(src), "--output", str(tmp_path / "o")), stderr=err)

    assert code == 2
    assert "set CITADEL_API_KEY or CITADEL_API_KEY_FILE, or pass --api-key-file" in err.getvalue()


def test_standard_output_needs_a_rejects_file(tmp_path: Path, key_file: Path) -> None:
    code, err, _ = run_tool("http://127.0.0.1:9", key_file, stdin=b"")
    assert code == 2
    assert "--rejects FILE is required" in err


def test_stdin_to_stdout_through_the_cli_with_the_key_from_the_environment(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    _, url = fake_server
    lines = make_input(300, bad_every=150)
    rejects = tmp_path / "rejects.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "citadel", "rewrap", "--url", url, "--rejects", str(rejects)],
        input="".join(line + "\n" for line in lines).encode(),
        env=tool_env(CITADEL_API_KEY=API_KEY),
        capture_output=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert run.stdout.decode().splitlines() == [
        line if "bad" in line else rewrapped(line) for line in lines
    ]
    assert [r["line"] for r in read_rejects(rejects)] == [150, 300]
    stderr = run.stderr.decode()
    assert "298 rewrapped, 0 passed through, 2 rejected" in stderr
    assert "\x1b[" not in stderr and "rewrap:" in stderr  # no progress bar: not a terminal
    assert API_KEY not in stderr + run.stdout.decode() + rejects.read_text()


def test_sigterm_stops_with_a_resumable_partial(
    tmp_path: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    fake, url = fake_server
    lines = make_input(10_000)
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "citadel", "rewrap", str(src), "-o", str(out), "--url", url],
        env=tool_env(CITADEL_API_KEY=API_KEY),
        stderr=subprocess.PIPE,
    )
    wait_until(lambda: fake.answered >= 1000 or proc.poll() is not None, timeout=60)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 130
    partial = read_lines(tmp_path / "out.jsonl.partial")
    assert partial == [rewrapped(line) for line in lines[: len(partial)]]
    assert b"interrupted by SIGTERM" in stderr and b"--resume" in stderr


@pytest.mark.parametrize("prefix", ["cit1:", "cit1:oldkid01", "cit1::", "ev", "x:"])
def test_a_skip_prefix_of_another_form_is_refused(
    tmp_path: Path, key_file: Path, prefix: str
) -> None:
    src = write_lines(tmp_path / "in.jsonl", make_input(1))
    code, err, _ = run_tool(
        "http://127.0.0.1:9", key_file, str(src), "-o", str(tmp_path / "o"), "--skip-prefix", prefix
    )
    assert code == 2
    assert "--skip-prefix must be cit1:<key id>: or ev:" in err


def test_messages_never_show_a_password_in_the_url(tmp_path: Path, key_file: Path) -> None:
    src = write_lines(tmp_path / "in.jsonl", make_input(3))
    code, err, _ = run_tool(
        "http://ops:CANARY-URL-PASSWORD@127.0.0.1:9", key_file, str(src), "-o", str(tmp_path / "o")
    )
    assert code == 2
    assert "could not be reached" in err
    assert "CANARY-URL-PASSWORD" not in err


def test_only_the_top_level_encrypted_data_is_replaced() -> None:
    parsed = bulk.parse_line('{"meta": {"encrypted_data": "inner"}, "encrypted_data": "outer"}')
    assert parsed.value == "outer"
    assert parsed.fields == {"meta": {"encrypted_data": "inner"}}
    assert parsed.replaced("cit1:k:new") == (
        '{"meta": {"encrypted_data": "inner"}, "encrypted_data": "cit1:k:new"}'
    )


@pytest.mark.parametrize(
    "text", ["", "[]", '"x"', "{", '{"a": 1,}', '{"a" 1}', "{} {}", '{"a": 1} x', "{'a': 1}"]
)
def test_lines_that_are_not_one_json_object_are_invalid(text: str) -> None:
    with pytest.raises(bulk.LineError) as exc:
        bulk.parse_line(text)
    assert exc.value.code == "invalid_line"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_counts_lines_of_the_total_and_counts_a_wait_down() -> None:
    clock, done = Clock(), [5]
    out = Terminal()
    progress = Progress(
        out, "citadel rewrap", lambda: done[0], lambda: 1, total=10, terminal=True, clock=clock
    )
    assert progress.status().startswith("5 of 10 lines (50.0 %)")
    progress.waiting(RateLimited(retry_after=30), 30.0)
    assert "waiting 30 s: rate limited (429, Retry-After 30 s)" in progress.status()
    clock.now += 10
    done[0] = 8
    assert "8 of 10 lines (80.0 %)" in progress.status()
    assert "waiting 20 s: rate limited" in progress.status()
    clock.now += 21
    assert "waiting" not in progress.status()
    assert out.getvalue().startswith("\rcitadel rewrap: 5 of 10 lines")  # drawn at once


def test_progress_in_a_log_says_once_what_it_waits_for() -> None:
    clock, out = Clock(), io.StringIO()
    progress = Progress(
        out, "citadel-rewrap", lambda: 3, lambda: 0, total=None, terminal=False, clock=clock
    )
    unavailable = ProviderUnavailable(retry_after=2)
    progress.waiting(unavailable, 2.0)
    progress.waiting(unavailable, 2.0)  # another lane, the same wait: not repeated
    clock.now += 11
    progress.waiting(CitadelConnectionError("Citadel could not be reached (ConnectError)."), 4.0)
    assert out.getvalue().splitlines() == [
        "citadel-rewrap: waiting 2 s: the provider is unavailable (503, Retry-After 2 s); 3 lines",
        "citadel-rewrap: waiting 4 s: Citadel could not be reached (ConnectError); 3 lines",
    ]
    progress.draw()  # less than 30 s since the start: nothing
    clock.now += 20
    progress.draw()
    assert out.getvalue().splitlines()[-1].startswith("citadel-rewrap: 3 lines, ")
    assert "\r" not in out.getvalue()


def test_the_audit_503_is_named_as_such() -> None:
    assert waiting_for(AuditUnavailable(retry_after=1)) == (
        "Citadel's audit log is unavailable (503, Retry-After 1 s)"
    )


@pytest.mark.parametrize(("data", "lines"), [(b"", 0), (b"a\n", 1), (b"a\nb", 2), (b"a\nb\n", 2)])
def test_count_lines_counts_a_last_line_without_newline_and_restores_the_position(
    data: bytes, lines: int
) -> None:
    source = io.BytesIO(b"skip\n" + data)
    source.readline()
    assert count_lines(source) == lines
    assert source.tell() == 5


def test_a_run_on_a_terminal_shows_lines_of_the_total(
    tmp_path: Path, key_file: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    _, url = fake_server
    src = write_lines(tmp_path / "in.jsonl", make_input(20))
    err = Terminal()
    code, text, _ = run_tool(url, key_file, str(src), "-o", str(tmp_path / "out.jsonl"), stderr=err)
    assert code == 0, text
    assert "\rcitadel rewrap: 20 of 20 lines (100.0 %)" in text
    assert text.endswith("0 rejected; rejects in " + str(tmp_path / "out.jsonl.rejects") + "\n")


def test_a_run_in_a_log_says_what_it_waited_for(
    tmp_path: Path, key_file: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    app, url = fake_server
    src = write_lines(tmp_path / "in.jsonl", make_input(30))
    code, text, _ = run_tool(url, key_file, str(src), "-o", str(tmp_path / "out.jsonl"))
    assert code == 0, text
    assert app.limited > 0
    assert "waiting a moment: rate limited (429, Retry-After 0 s)" in text
    assert "\r" not in text


# -- batches and contexts ------------------------------------------------------------------


def batch_sizes(fake: FakeCitadel) -> list[int]:
    """The items of each request the tool sent (1 for the single form)."""
    return [len(body["batch"]) if "batch" in body else 1 for body in fake.bodies]


def test_lines_go_in_batches_after_the_one_that_names_the_target(
    tmp_path: Path, key_file: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    fake, url = fake_server
    lines = make_input(250)
    src = write_lines(tmp_path / "in.jsonl", lines)
    code, err, _ = run_tool(
        url, key_file, str(src), "-o", str(tmp_path / "o"), "--batch-size", "50"
    )
    assert code == 0, err
    sizes = batch_sizes(fake)
    assert sizes[0] == 1 and "batch" not in fake.bodies[0]  # the probe: the single form
    # The probe, then batches of 50, in flight together (a 429-refused one is sent again whole).
    unique = {json.dumps(body): size for body, size in zip(fake.bodies, sizes, strict=True)}
    assert sorted(unique.values()) == [1, 49, 50, 50, 50, 50]
    assert fake.answered == 250
    assert read_lines(tmp_path / "o") == [rewrapped(line) for line in lines]


def test_new_context_from_binds_every_line_to_its_own_fields(
    tmp_path: Path, key_file: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    fake, url = fake_server
    lines = [record(1, f"{OLD}a"), record(2, f"{NEW}already"), record(3, f"{OLD}c")]
    src = write_lines(tmp_path / "in.jsonl", lines)
    code, err, _ = run_tool(
        url,
        key_file,
        str(src),
        "-o",
        str(tmp_path / "o"),
        "--new-context-from",
        "user_id=id,owner=user",
    )
    assert code == 0, err
    (body,) = fake.bodies  # no probe: nothing is passed through, so nothing to learn
    assert body["batch"] == [
        {"encrypted_data": f"{OLD}a", "new_context": {"user_id": "1", "owner": "u-1"}},
        {"encrypted_data": f"{NEW}already", "new_context": {"user_id": "2", "owner": "u-2"}},
        {"encrypted_data": f"{OLD}c", "new_context": {"user_id": "3", "owner": "u-3"}},
    ]
    assert "3 rewrapped, 0 passed through" in err
    assert "u-1" not in err and '"1"' not in err  # context values never in a message


def test_context_from_sends_the_context_each_line_is_bound_to(
    tmp_path: Path, key_file: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    fake, url = fake_server
    src = write_lines(tmp_path / "in.jsonl", [record(i, f"{OLD}x{i}") for i in (1, 2, 3)])
    code, err, _ = run_tool(
        url, key_file, str(src), "-o", str(tmp_path / "o"), "--context-from", "user_id=id"
    )
    assert code == 0, err
    items = [b if "batch" not in b else None for b in fake.bodies]
    assert items[0] == {"encrypted_data": f"{OLD}x1", "context": {"user_id": "1"}}
    assert fake.bodies[1]["batch"][0] == {"encrypted_data": f"{OLD}x2", "context": {"user_id": "2"}}


def test_a_line_without_a_usable_context_field_is_rejected_without_a_call(
    tmp_path: Path, key_file: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    fake, url = fake_server
    lines = [
        json.dumps({"id": 1, "encrypted_data": f"{OLD}a"}),
        json.dumps({"encrypted_data": f"{OLD}b"}),
        json.dumps({"id": True, "encrypted_data": f"{OLD}c"}),
        json.dumps({"id": {"n": 1}, "encrypted_data": f"{OLD}d"}),
    ]
    src = write_lines(tmp_path / "in.jsonl", lines)
    code, _, _ = run_tool(
        url, key_file, str(src), "-o", str(tmp_path / "o"), "--new-context-from", "user_id=id"
    )
    assert code == 1
    rejects = read_rejects(tmp_path / "o.rejects")
    assert [(r["line"], r["code"]) for r in rejects] == [
        (2, "invalid_context"),
        (3, "invalid_context"),
        (4, "invalid_context"),
    ]
    assert fake.answered == 1
    assert read_lines(tmp_path / "o")[1:] == lines[1:]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--new-context-from", "user_id", "--skip-prefix", NEW],
            "--new-context-from binds every line",
        ),
        (["--new-context-from", "user id=id"], "--new-context-from: a context key is 1 to 64"),
        (["--context-from", "a=x,a=y"], "--context-from: a context key is named twice"),
        (["--context-from", "e=encrypted_data"], "cannot come from encrypted_data"),
        (["--new-context-from", ",".join(f"k{i}" for i in range(17))], "at most 16 keys"),
        (["--batch-size", "0"], "--batch-size must be 1 to"),
    ],
)
def test_unusable_batch_and_context_options_exit_2(
    tmp_path: Path, key_file: Path, argv: list[str], message: str
) -> None:
    src = write_lines(tmp_path / "in.jsonl", make_input(1))
    code, err, _ = run_tool(
        "http://127.0.0.1:9", key_file, str(src), "-o", str(tmp_path / "o"), *argv
    )
    assert code == 2 and message in err


def test_a_batch_refused_whole_for_one_line_is_retried_line_by_line(
    tmp_path: Path, key_file: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    _, url = fake_server
    lines = make_input(30)
    lines[11] = record(12, f"{OLD}oversize12")
    src = write_lines(tmp_path / "in.jsonl", lines)
    code, err, _ = run_tool(url, key_file, str(src), "-o", str(tmp_path / "o"))
    assert code == 1
    (reject,) = read_rejects(tmp_path / "o.rejects")
    assert (reject["line"], reject["code"]) == (12, "payload_too_large")
    assert reject["request_id"].endswith("-12") and "batch_index" not in reject
    out = read_lines(tmp_path / "o")
    assert out[11] == lines[11]
    assert out[:11] + out[12:] == [rewrapped(line) for line in lines[:11] + lines[12:]]
    assert "refused whole" not in err  # one line's fault, not the batch size's


def test_batches_over_the_servers_limit_shrink_with_a_warning(
    tmp_path: Path, key_file: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    fake, url = fake_server
    fake.max_items = 10
    lines = make_input(200)
    src = write_lines(tmp_path / "in.jsonl", lines)
    code, err, _ = run_tool(
        url,
        key_file,
        str(src),
        "-o",
        str(tmp_path / "o"),
        "--batch-size",
        "40",
        "--concurrency",
        "1",
    )
    assert code == 0, err
    assert err.count("refused whole (invalid_request) though each line passes alone") == 1
    assert "going on with --batch-size 20" in err
    assert read_lines(tmp_path / "o") == [rewrapped(line) for line in lines]


@pytest.mark.parametrize(
    "text",
    [
        '{"id": 1, "encrypted_data": "cit1:k:abc"}',
        '{"encrypted_data":"cit1:k:abc","id":1}',
        '  { "encrypted_data" :  "cit1:k:abc" , "n": 1.50e3 }  ',
        '{"a": "cit1:k:abc", "encrypted_data": "cit1:k:abc"}',  # the value's text twice
        '{"encrypted_data": "cit1:k:a\\/b"}',  # an escape json.dumps would not write
        '{"encrypted\\u005fdata": "cit1:k:abc"}',  # the key written with an escape
        '{"x\\"encrypted_data": "v", "encrypted_data": "w"}',
        '{"nested": {"encrypted_data": "inner"}, "encrypted_data": "outer"}',
        '{"list": [1, 2], "encrypted_data": "ct", "user": "\u00e9"}',
        '{"encrypted_data": null, "id": 2}',
    ],
)
def test_the_fast_path_finds_what_the_walk_finds(text: str) -> None:
    from citadel_client.bulk.lines import _walk

    fast, walked = bulk.parse_line(text), _walk(text)
    assert (fast.start, fast.end, fast.value, fast.fields) == (
        walked.start,
        walked.end,
        walked.value,
        walked.fields,
    )
    assert fast.replaced("NEW") == walked.replaced("NEW")


@pytest.mark.parametrize(
    "text",
    ['{"encrypted_data": "a", "encrypted_data": "a"}', '{"id": 1, "id": 2, "encrypted_data": "a"}'],
)
def test_a_duplicated_key_is_refused_on_the_fast_path_too(text: str) -> None:
    with pytest.raises(bulk.LineError) as exc:
        bulk.parse_line(text)
    assert exc.value.code == "invalid_line"


def test_a_named_pipe_on_a_terminal_is_not_counted_ahead(
    tmp_path: Path, key_file: Path, fake_server: tuple[FakeCitadel, str]
) -> None:
    """Counting would read the pipe away: the status line then shows lines done, no total."""
    _, url = fake_server
    fifo = tmp_path / "export.fifo"
    os.mkfifo(fifo)
    lines = make_input(5)

    def feed() -> None:
        with open(fifo, "w") as f:
            f.write("".join(line + "\n" for line in lines))

    writer = threading.Thread(target=feed)
    writer.start()
    code, text, _ = run_tool(url, key_file, str(fifo), "-o", str(tmp_path / "o"), stderr=Terminal())
    writer.join(10)
    assert code == 0, text
    assert read_lines(tmp_path / "o") == [rewrapped(line) for line in lines]
    assert "\rcitadel rewrap: 5 lines, " in text and " of " not in text.split(";")[0]


def test_a_binding_run_resumes_with_only_the_remaining_lines(
    tmp_path: Path, key_file: Path
) -> None:
    lines = make_input(1200)
    src = write_lines(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    bind = ("--new-context-from", "user_id=id", "--batch-size", "50")
    with serve_app(FakeCitadel(fail_after=500)) as url:
        # One lane, so that the batches are answered in order until the break.
        first = run_tool(url, key_file, str(src), "--output", str(out), "--concurrency", "1", *bind)
        assert first[0] == 2
    kept = len(read_lines(tmp_path / "out.jsonl.partial"))
    assert 0 < kept <= 500

    fake = FakeCitadel()
    with serve_app(fake) as url:
        code, err, _ = run_tool(url, key_file, str(src), "--output", str(out), "--resume", *bind)

    assert code == 0, err
    assert fake.answered == 1200 - kept
    sent = [item for body in fake.bodies for item in body.get("batch", [body])]
    # Each remaining line bound to its own id (a batch refused with 429 was sent again).
    assert {int(item["new_context"]["user_id"]) for item in sent} == set(range(kept + 1, 1201))
    assert read_lines(out) == [rewrapped(line) for line in lines]
