"""The development banner says what this server's own settings allow."""

from __future__ import annotations

from pathlib import Path

import pytest

from citadel.cli import _dev_banner
from citadel.config import Settings


def banner(tmp_path: Path, capsys: pytest.CaptureFixture[str], **fields: object) -> str:
    settings = Settings.from_fields(local_keyring=tmp_path / "keyring.json", **fields)
    _dev_banner(settings, "127.0.0.1", 8004)
    return capsys.readouterr().err


def test_the_banner_names_each_dev_callers_operations_from_the_acl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    acl = {"sentinel": ["encrypt"], "conductor": ["decrypt", "sign"]}
    text = banner(tmp_path, capsys, acl=acl)
    assert "sentinel may encrypt; conductor may decrypt, sign" in text


def test_the_banner_says_when_a_dev_caller_may_do_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = banner(tmp_path, capsys, acl={"sentinel": ["encrypt"]})
    assert "conductor may do nothing" in text
