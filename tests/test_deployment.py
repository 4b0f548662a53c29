"""The container files, checked here where no Docker engine runs.

The compose files are validated against the Compose Specification's JSON
schema (tests/data/compose-spec.json, from github.com/compose-spec), and the
Dockerfile's own install and start commands are run in a clean virtual
environment from a copy of exactly what the build context would send.
scripts/check-container (`make container-check`) builds and runs the image and
both stacks for real where a Docker engine can be had.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tomllib
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from support import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILES = ["docker-compose.evervault.yml", "docker-compose.local.yml"]
EMULATOR_OVERRIDE = "docker-compose.evervault-emulator.yml"
PUBLISH = "${CITADEL_PUBLISH:-8004}:8004"


def schema_validator() -> jsonschema.Draft201909Validator:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    return jsonschema.Draft201909Validator(schema)


@pytest.mark.parametrize("name", [*COMPOSE_FILES, EMULATOR_OVERRIDE])
def test_compose_file_fits_the_compose_specification(name: str) -> None:
    document = yaml.safe_load((ROOT / name).read_text())
    errors = [e.message for e in schema_validator().iter_errors(document)]
    assert errors == []


def test_the_schema_rejects_what_compose_would() -> None:
    bad = {"services": {"citadel": {"image": "x", "ports": "8004:8004", "restart": 3}}}
    assert list(schema_validator().iter_errors(bad))


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_publishes_only_citadel_with_healthchecks_and_restarts(name: str) -> None:
    services = yaml.safe_load((ROOT / name).read_text())["services"]
    assert {s for s, spec in services.items() if "ports" in spec} == {"citadel"}
    # 8004 unless CITADEL_PUBLISH says otherwise (127.0.0.1:8004, another port).
    assert services["citadel"]["ports"] == [PUBLISH]
    for spec in services.values():
        assert spec["healthcheck"]["test"]
        assert spec["restart"] == "unless-stopped"
        assert spec["read_only"] is True
        assert spec["cap_drop"] == ["ALL"] and "cap_add" not in spec
        assert spec["security_opt"] == ["no-new-privileges:true"]
    assert services["citadel"]["environment"]["CITADEL_RATE_LIMIT_STORAGE_URI"].startswith(
        "redis://redis:"
    )
    assert services["citadel"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_evervault_compose_runs_the_evervault_provider_in_production() -> None:
    env = yaml.safe_load((ROOT / "docker-compose.evervault.yml").read_text())["services"][
        "citadel"
    ]["environment"]
    assert env["CITADEL_PROVIDER"] == "evervault"
    assert env["CITADEL_ENV"] == "production"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_redis_runs_as_its_own_user_so_it_needs_no_capability(name: str) -> None:
    # As root, the redis image's entrypoint switches to the redis user with
    # gosu, which cap_drop ALL forbids ("failed switching to "redis"").
    redis = yaml.safe_load((ROOT / name).read_text())["services"]["redis"]
    assert redis["user"] == "999:999"
    assert redis["image"] == "redis:7-bookworm"  # Debian's redis user is 999:999
    assert redis["command"][0] == "redis-server"


@pytest.mark.parametrize("name", [*COMPOSE_FILES, EMULATOR_OVERRIDE])
def test_compose_image_is_the_packaged_version(name: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    services = yaml.safe_load((ROOT / name).read_text())["services"]
    images = {spec["image"] for spec in services.values() if "image" in spec}
    assert {i for i in images if i.startswith("citadel:")} == {f"citadel:{version}"}


def test_emulator_override_points_citadel_at_the_emulator_on_the_compose_network() -> None:
    services = yaml.safe_load((ROOT / EMULATOR_OVERRIDE).read_text())["services"]
    citadel, emulator = services["citadel"], services["evervault"]
    assert citadel["environment"]["EVERVAULT_API_URL"] == "http://evervault:3999/"
    assert citadel["depends_on"]["evervault"]["condition"] == "service_healthy"
    command = emulator["command"]
    assert command[:3] == ["python", "-m", "evervault_emulator"]
    assert command[command.index("--app-id") + 1] == citadel["environment"]["EVERVAULT_APP_ID"]
    assert command[command.index("--api-key") + 1] == citadel["environment"]["EVERVAULT_API_KEY"]
    assert "ports" not in emulator
    assert emulator["read_only"] is True and emulator["cap_drop"] == ["ALL"]


def env_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"#?[A-Z][A-Z0-9_]*=", line)]


def test_env_examples_work_with_docker_env_file() -> None:
    # `docker run --env-file` keeps everything after "=" (an inline
    # "# comment", quotes) in the value; Compose strips them.
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    lines = env_lines((ROOT / ".env.example").read_text())
    lines += [line for block in blocks for line in env_lines(block)]
    assert any(line.startswith("CITADEL_API_KEYS=") for line in lines)
    for line in lines:
        value = line.split("=", 1)[1]
        assert " #" not in value and not value.startswith(("'", '"')), line


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_runs_as_non_root_exposes_8004_and_checks_health() -> None:
    text = dockerfile()
    assert re.search(r"^USER 10001:10001$", text, re.M)
    # the group exists with that gid (not the next free system gid), and no
    # home is created: /etc/skel would land in the data volume
    code = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert "groupadd --system --gid 10001 citadel" in code and "--gid 10001" in code
    assert "--create-home" not in code and "--user-group" not in code
    # BuildKit fetches a "# syntax=" frontend image from a registry
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    assert re.search(r"^EXPOSE 8004$", text, re.M)
    assert "HEALTHCHECK" in text and "/health" in text
    assert text.count("FROM ") == 2  # multi-stage


def build_context(dest: Path) -> None:
    """Copy what .dockerignore lets through (it ignores everything, then re-includes)."""
    includes = [
        line[1:].rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for pattern in includes:
        for path in ROOT.glob(pattern):
            target = dest / path.relative_to(ROOT)
            if path.is_dir():
                shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)


def test_build_context_holds_no_secrets_or_local_state(tmp_path: Path) -> None:
    build_context(tmp_path)
    names = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")]
    for forbidden in (".env", ".citadel*", "*keyring.json", "*dev-api-keys*", ".venv*", "tests*"):
        assert not fnmatch.filter(names, forbidden), forbidden


def test_image_install_and_start_commands_work_in_a_clean_venv(tmp_path: Path) -> None:
    text = dockerfile()
    build_stage, runtime_stage = text.split("\nFROM ", 2)[1:]
    runs = re.findall(r"^RUN (docker/install .+)$", build_stage, re.M)
    assert runs == ["docker/install deps /opt/venv", "docker/install app /opt/venv"]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", runtime_stage, re.M).group(1))  # type: ignore[union-attr]
    env_block = re.search(r"^ENV (.+?)\n(?=\S)", runtime_stage, re.M | re.S).group(1)  # type: ignore[union-attr]
    image_env = dict(kv.split("=", 1) for kv in shlex.split(env_block.replace("\\\n", " ")))

    context, venv, data = tmp_path / "src", tmp_path / "opt-venv", tmp_path / "data"
    context.mkdir()
    data.mkdir()
    build_context(context)
    for run in runs:
        subprocess.run(
            shlex.split(run.replace("/opt/venv", str(venv))), cwd=context, check=True, timeout=600
        )

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CITADEL_", "EVERVAULT_"))}
    env.update(image_env)
    env["PATH"] = env["PATH"].replace("/opt/venv/bin", str(venv / "bin"))
    env["CITADEL_LOCAL_KEYRING"] = str(data / "keyring.json")
    argv = [a if a != "8004" else str(port) for a in cmd]
    proc = subprocess.Popen(
        argv, cwd=data, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        url = f"http://127.0.0.1:{port}/health"

        def healthy() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else b""
            try:
                return httpx.get(url, timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(healthy, timeout=30)
        assert str(venv) in shutil.which(cmd[0], path=env["PATH"])  # type: ignore[operator]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    # uvicorn finishes in-flight requests and the lifespan, then re-raises the
    # signal so that the exit status says SIGTERM.
    output = proc.stdout.read().decode() if proc.stdout else ""
    assert "Application shutdown complete" in output
    assert "Finished server process" in output
