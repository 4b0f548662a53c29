"""Every ```python block of README.md and client/README.md runs, as written, with the client alone.

A caller installs ``citadel-client`` and nothing else (the README says so), so each
block is run in a fresh virtual environment holding ``./client`` alone (blocks that
use ccxt: ``./client[ccxt]``), from a directory outside the repository, against a
live Citadel on loopback. The blocks take Citadel's address and the callers' keys
from the environment, as a service would: ``CITADEL_URL``, ``CITADEL_API_KEY``
(Sentinel's), ``SENTINEL_KEY`` and ``CONDUCTOR_KEY``.

Building a virtual environment takes a minute, so it is built once per session
(``readme_venv``), and tests/conftest.py marks these tests slow (they start processes).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import KEYS, Served, make_settings, serve_citadel

ROOT = Path(__file__).resolve().parent.parent
READMES = (ROOT / "README.md", ROOT / "client" / "README.md")
# A fence may be indented (a block inside a list item); its closing fence is indented alike.
_BLOCK = re.compile(r"^(?P<indent>[ ]*)```python\n(?P<code>.*?)^(?P=indent)```[ ]*$", re.M | re.S)
CANARY_SECRET = "CANARY-README-SECRET-5501"


@dataclass(frozen=True)
class Block:
    """One ```python block: where it is, and its code with the fence's indent removed."""

    readme: Path
    line: int
    code: str

    @property
    def name(self) -> str:
        return f"{self.readme.relative_to(ROOT)}:{self.line}"

    @property
    def uses_ccxt(self) -> bool:
        return (
            re.search(r"^\s*(from|import)\s+(ccxt|citadel_client\.ccxt)\b", self.code, re.M)
            is not None
        )


def python_blocks(readme: Path) -> list[Block]:
    """The ```python blocks of ``readme``, in order, with the line each fence opens on."""
    text = readme.read_text(encoding="utf-8")
    return [
        Block(readme, text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group("code")))
        for m in _BLOCK.finditer(text)
    ]


BLOCKS = [block for readme in READMES for block in python_blocks(readme)]


@dataclass
class Venvs:
    """Client-only virtual environments, built on first use: plain, and with the ccxt extra."""

    root: Path
    built: dict[str, Path]

    def python(self, extra: str = "") -> Path:
        if extra not in self.built:
            self.built[extra] = _build_venv(self.root, extra)
        return self.built[extra]


def _build_venv(root: Path, extra: str) -> Path:
    where = root / (f"venv-{extra}" if extra else "venv")
    source = root / "client-src"
    if not source.exists():
        # A copy, so that the build leaves nothing in the work tree.
        shutil.copytree(
            ROOT / "client",
            source,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"),
        )
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    python = where / "bin" / "python"
    target = f"{source}[{extra}]" if extra else str(source)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", target],
        check=True,
        timeout=600,
    )
    return python


@pytest.fixture(scope="session")
def readme_venv(tmp_path_factory: pytest.TempPathFactory) -> Venvs:
    """Built once per session (about a minute each): every README block shares them."""
    return Venvs(tmp_path_factory.mktemp("readme-venvs"), {})


@pytest.fixture(scope="module")
def readme_citadel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settings = make_settings(
        tmp_path_factory.mktemp("readme-citadel"),
        acl={"sentinel": ["encrypt"], "conductor": ["decrypt", "sign"], "alchemist": ["rewrap"]},
        rate_limit_per_caller="100000/minute",
        rate_limit_per_user="100000/minute",
    )
    with serve_citadel(settings) as served:
        yield served


def block_env(served: Served) -> dict[str, str]:
    """What a service's environment holds: Citadel's address and its own key, nothing else."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "CITADEL_URL": served.url,
        "CITADEL_API_KEY": KEYS["sentinel"],
        "SENTINEL_KEY": KEYS["sentinel"],
        "CONDUCTOR_KEY": KEYS["conductor"],
        "EXCHANGE_SECRET": CANARY_SECRET,
    }


def test_both_readmes_have_python_blocks() -> None:
    """A fence the pattern missed would make the parametrized test below pass vacuously."""
    for readme in READMES:
        fences = readme.read_text(encoding="utf-8").count("```python")
        assert fences > 0, readme
        assert len(python_blocks(readme)) == fences, readme


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_readme_block_runs_with_the_client_alone(
    block: Block, readme_venv: Venvs, readme_citadel: Served, tmp_path: Path
) -> None:
    python = readme_venv.python("ccxt" if block.uses_ccxt else "")
    script = tmp_path / "block.py"
    script.write_text(block.code, encoding="utf-8")
    before = len(readme_citadel.audit.events())
    run = subprocess.run(
        [str(python), "-I", str(script)],  # -I: nothing from the working directory or PYTHON*
        env=block_env(readme_citadel),
        cwd=tmp_path,  # outside the repository: nothing of the server is importable
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, f"{block.name} failed:\n{run.stderr}"
    assert run.stderr == "", run.stderr
    assert CANARY_SECRET not in run.stdout + run.stderr
    for event in readme_citadel.audit.events()[before:]:
        # Only a batch's item may fail, where a block shows a per-item error on purpose.
        assert event["success"] or "batch_index" in event, (block.name, event)
