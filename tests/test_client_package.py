"""citadel-client as its own distribution: one definition of the errors, and an install alone.

The slow test installs ./client into a fresh virtual environment, as Sentinel
or Conductor would, checks that it brought nothing but httpx and what httpx
itself needs, and talks to a live Citadel from that environment.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import KEYS, Served, make_settings, serve_citadel

import citadel
import citadel.client
import citadel.errors
import citadel_client
import citadel_client.errors

ROOT = Path(__file__).resolve().parent.parent
# What a caller of Citadel must never have to install.
SERVER_ONLY = {
    "fastapi",
    "starlette",
    "uvicorn",
    "evervault",
    "cryptography",
    "redis",
    "coredis",
    "limits",
    "pydantic",
    "pydantic-settings",
    "structlog",
    "orjson",
    "prometheus-client",
    "citadel",
}

CLIENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, os
    from citadel_client import AsyncCitadelClient, CitadelClient, InvalidCiphertext

    # The server and its dependencies are not there, so nothing can come from them.
    for name in ("citadel", "fastapi", "uvicorn", "evervault", "cryptography", "redis",
                 "coredis", "pydantic"):
        assert importlib.util.find_spec(name) is None, name

    url, secret = os.environ["CITADEL_URL"], os.environ["CANARY_SECRET"]
    with CitadelClient(url, os.environ["SENTINEL_KEY"]) as sentinel:
        ciphertext = sentinel.encrypt(secret, user_id="user-1")
    with CitadelClient(url, os.environ["CONDUCTOR_KEY"]) as conductor:
        with conductor.decrypt(ciphertext, user_id="user-1") as plain:
            assert plain.reveal() == secret
        try:
            conductor.decrypt("cit1:00000000:AAAA")
        except InvalidCiphertext:
            pass
        else:
            raise SystemExit("a bad ciphertext did not raise InvalidCiphertext")

    async def conductor_async() -> None:
        async with AsyncCitadelClient(url, os.environ["CONDUCTOR_KEY"]) as client:
            with await client.decrypt(ciphertext) as plain:
                assert plain.reveal() == secret

    asyncio.run(conductor_async())
    print("round trip ok")
    """
)


def test_server_errors_are_the_client_errors() -> None:
    for name in citadel_client.errors.__all__:
        assert getattr(citadel.errors, name) is getattr(citadel_client.errors, name), name
    assert set(citadel.errors.__all__) == set(citadel_client.errors.__all__)


def test_server_reexports_the_client() -> None:
    assert citadel.CitadelClient is citadel.client.CitadelClient is citadel_client.CitadelClient
    assert citadel.AsyncCitadelClient is citadel_client.AsyncCitadelClient
    assert citadel.Plaintext is citadel_client.Plaintext
    assert citadel.CitadelConnectionError is citadel_client.CitadelConnectionError


def test_client_version_matches_the_server_requirement() -> None:
    requirements = [Requirement(r) for r in importlib.metadata.requires("citadel") or []]
    (pin,) = [r for r in requirements if canonicalize_name(r.name) == "citadel-client"]
    assert str(pin.specifier) == f"=={citadel_client.__version__}"
    assert importlib.metadata.version("citadel-client") == citadel_client.__version__


def test_client_package_is_typed() -> None:
    assert (ROOT / "client" / "citadel_client" / "py.typed").is_file()


def _pip_list(python: Path) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return {canonicalize_name(p["name"]): p["version"] for p in json.loads(out)}


def _requirement_closure(root: str, site_packages: str) -> set[str]:
    """``root`` and everything its metadata requires, transitively, for this interpreter."""
    dists = {
        canonicalize_name(d.metadata["Name"]): d
        for d in importlib.metadata.distributions(path=[site_packages])
    }
    seen: set[str] = set()
    todo = [canonicalize_name(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in dists[name].requires or []:
            req = Requirement(line)
            # Extras are not asked for: requirements under an extra's marker are skipped.
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return seen


@dataclass(frozen=True)
class ClientVenv:
    """A fresh virtual environment with ./client installed alone, as a caller's would be."""

    python: Path
    before: dict[str, str]  # pip list before the install
    after: dict[str, str]
    site_packages: str
    outside: Path  # a working directory outside the repository


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> ClientVenv:
    """Built once per module (a minute): every client-only test shares it."""
    tmp_path = tmp_path_factory.mktemp("client-venv")
    # A copy, so that the build leaves nothing in the work tree.
    source = tmp_path / "client-src"
    shutil.copytree(
        ROOT / "client",
        source,
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    before = _pip_list(python)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(source),
        ],
        check=True,
        timeout=600,
    )
    after = _pip_list(python)
    site_packages = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return ClientVenv(python, before, after, site_packages, tmp_path)


@pytest.mark.slow
def test_client_installs_alone_and_talks_to_a_live_citadel(
    client_venv: ClientVenv, citadel: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    python, before, after = client_venv.python, client_venv.before, client_venv.after
    site_packages, tmp_path = client_venv.site_packages, client_venv.outside
    added = set(after) - set(before)
    assert "httpx" in added
    assert added == _requirement_closure("citadel-client", site_packages)
    assert not added & SERVER_ONLY
    with capsys.disabled():  # for the record: what a caller's environment holds
        print("\nclient-only venv, pip list:")
        for name, version in sorted(after.items()):
            print(f"  {name}=={version}")

    env = {
        "PATH": os.environ.get("PATH", ""),
        "CITADEL_URL": citadel.url,
        "SENTINEL_KEY": KEYS["sentinel"],
        "CONDUCTOR_KEY": KEYS["conductor"],
        "CANARY_SECRET": "CANARY-PACKAGE-SECRET-31",
    }
    run = subprocess.run(
        [str(python), "-c", CLIENT_SCRIPT],
        env=env,
        cwd=tmp_path,  # not the repository: nothing of the server is importable from here
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "round trip ok"
    assert "CANARY-PACKAGE-SECRET-31" not in run.stdout + run.stderr
    operations = [e["operation"] for e in citadel.audit.events()]
    assert operations == ["encrypt", "decrypt", "decrypt", "decrypt"]


BULK_IMPORT_SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    import citadel_client.bulk
    from citadel_client.bulk import main

    for name in ("citadel", "pydantic", "pydantic_settings", "limits", "structlog", "fastapi",
                 "uvicorn", "cryptography"):
        assert importlib.util.find_spec(name) is None, name
        assert name not in sys.modules, name
    print("bulk importable")
    """
)


@pytest.mark.slow
def test_the_bulk_tool_runs_from_a_client_only_install(
    client_venv: ClientVenv, tmp_path: Path
) -> None:
    env = {"PATH": os.environ.get("PATH", "")}
    where = {"env": env, "cwd": client_venv.outside, "capture_output": True, "text": True}
    run = subprocess.run([str(client_venv.python), "-c", BULK_IMPORT_SCRIPT], timeout=60, **where)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "bulk importable"
    script = client_venv.python.parent / "citadel-rewrap"
    for argv in (
        [str(script), "--help"],
        [str(client_venv.python), "-m", "citadel_client.bulk", "-h"],
    ):
        run = subprocess.run(argv, timeout=60, **where)
        assert run.returncode == 0, run.stderr
        assert "--api-key-file" in run.stdout and "--resume" in run.stdout
    assert subprocess.run([str(script), "--help"], timeout=60, **where).stdout.startswith(
        "usage: citadel-rewrap "
    )

    # And a real run, against a live Citadel, from that environment alone.
    settings = make_settings(
        tmp_path, acl={"sentinel": ["encrypt"], "conductor": ["decrypt"], "alchemist": ["rewrap"]}
    )
    with serve_citadel(settings) as served:
        with citadel_client.CitadelClient(served.url, KEYS["sentinel"]) as sentinel:
            rows = [{"id": n, "encrypted_data": sentinel.encrypt(f"secret-{n}")} for n in (1, 2)]
        src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
        src.write_text("".join(json.dumps(row) + "\n" for row in rows))
        run = subprocess.run(
            [str(script), str(src), "-o", str(out), "--url", served.url],
            env={**env, "CITADEL_API_KEY": KEYS["alchemist"]},
            cwd=client_venv.outside,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        # The first answer names the active key; the second row is already under it.
        assert "citadel-rewrap: 1 rewrapped, 1 passed through, 0 rejected" in run.stderr
        kept = [json.loads(line) for line in out.read_text().splitlines()]
        assert [row["id"] for row in kept] == [1, 2]
        assert [e["operation"] for e in served.audit.events()][-1] == "rewrap"
