"""The local keyring file and the XAES-256-GCM provider on it."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from citadel.errors import InvalidCiphertext
from citadel.keyring import KeyringError, create_keyring, load_keyring, rotate_keyring
from citadel.providers.local import XAES256GCM, LocalProvider


def provider_at(path: Path) -> LocalProvider:
    create_keyring(path, origin="auto")
    return LocalProvider(load_keyring(path))


def test_xaes_matches_the_c2sp_test_vectors() -> None:
    nonce = b"ABCDEFGHIJKLMNOPQRSTUVWX"
    one = XAES256GCM(b"\x01" * 32).encrypt(nonce, b"XAES-256-GCM", b"")
    three = XAES256GCM(b"\x03" * 32).encrypt(nonce, b"XAES-256-GCM", b"c2sp.org/XAES-256-GCM")
    assert one.hex() == "ce546ef63c9cc60765923609b33a9a1974e96e52daf2fcf7075e2271"
    assert three.hex() == "986ec1832593df5443a179437fd083bf3fdb41abd740a21f71eb769d"


def test_keyring_is_created_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "ring" / "keyring.json"
    assert create_keyring(path, origin="auto")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keyring(path).origin == "auto"


def test_existing_keyring_is_loaded_not_regenerated(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    create_keyring(path, origin="auto")
    before = path.read_bytes()
    assert not create_keyring(path, origin="auto")
    assert path.read_bytes() == before


def _create(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    create_keyring(Path(path), origin="auto")
    queue.put(load_keyring(Path(path)).decrypting())


def test_concurrent_creation_ends_with_one_key(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(path), queue)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=20) for _ in procs]
    for p in procs:
        p.join(20)
    assert all(r == results[0] for r in results)
    assert [f for f in os.listdir(tmp_path) if f != "keyring.json"] == []


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{not json",
        b"[]",
        b'{"format": "citadel-keyring/1", "active": "aaaaaaaa", "keys": []}',
        b'{"format": "citadel-keyring/1", "active": "aaaaaaaa",'
        b' "keys": [{"id": "aaaaaaaa", "key": "c2hvcnQ="}]}',
        b'{"format": "citadel-keyring/1", "active": "bbbbbbbb",'
        b' "keys": [{"id": "aaaaaaaa", "key": "' + b"A" * 43 + b'="}]}',
    ],
    ids=["empty", "not-json", "not-object", "no-keys", "short-key", "active-missing"],
)
def test_corrupt_keyring_is_refused_and_left_alone(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(content)
    with pytest.raises(KeyringError):
        load_keyring(path)
    assert not create_keyring(path, origin="auto")
    assert path.read_bytes() == content


def test_unreadable_keyring_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.mkdir()  # reading a directory fails whoever runs the test, root included
    with pytest.raises(KeyringError, match="cannot be read"):
        load_keyring(path)


def test_round_trip_survives_a_new_provider_on_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ct = provider_at(path).encrypt_sync("kept across restarts")
    assert provider_at(path).decrypt_sync(ct) == "kept across restarts"


def test_ciphertext_names_its_key_and_is_not_ev(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ct = provider_at(path).encrypt_sync("x")
    prefix, kid, _ = ct.split(":")
    assert prefix == "cit1"
    assert kid == load_keyring(path).active


def test_same_plaintext_encrypts_differently(tmp_path: Path) -> None:
    p = provider_at(tmp_path / "keyring.json")
    assert len({p.encrypt_sync("same") for _ in range(100)}) == 100


def test_every_single_character_change_is_rejected(tmp_path: Path) -> None:
    p = provider_at(tmp_path / "keyring.json")
    ct = p.encrypt_sync("tamper me")
    for i in range(len(ct)):
        replacement = "B" if ct[i] != "B" else "C"
        tampered = ct[:i] + replacement + ct[i + 1 :]
        with pytest.raises(InvalidCiphertext):
            p.decrypt_sync(tampered)


def test_header_is_bound_relabelling_to_another_key_fails(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    p = provider_at(path)
    ct = p.encrypt_sync("x")
    old_kid = load_keyring(path).active
    new_kid = rotate_keyring(path)
    rotated = LocalProvider(load_keyring(path))
    with pytest.raises(InvalidCiphertext):
        rotated.decrypt_sync(ct.replace(old_kid, new_kid))


def test_rotation_keeps_old_ciphertexts_and_encrypts_under_the_new_key(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    old = provider_at(path).encrypt_sync("before rotation")
    new_kid = rotate_keyring(path)
    rotated = LocalProvider(load_keyring(path))
    assert rotated.decrypt_sync(old) == "before rotation"
    assert rotated.encrypt_sync("after").split(":")[1] == new_kid
    assert json.loads(path.read_bytes())["active"] == new_kid


def test_ciphertext_from_another_keyring_is_rejected(tmp_path: Path) -> None:
    ct = provider_at(tmp_path / "a.json").encrypt_sync("x")
    other = provider_at(tmp_path / "b.json")
    with pytest.raises(InvalidCiphertext):
        other.decrypt_sync(ct)
