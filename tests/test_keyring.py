"""The local keyring file and the XAES-256-GCM provider on it."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from citadel.errors import InvalidCiphertext, KeyRetired
from citadel.keyring import (
    Key,
    Keyring,
    KeyringChangeRefused,
    KeyringError,
    change_keyring,
    create_keyring,
    dump_keyring,
    load_keyring,
    parse_keyring,
    rotate_keyring,
)
from citadel.metrics import Metrics
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


# -- the keyring value: pure operations ---------------------------------------------

CANARY_MATERIAL = bytes(range(32))


def ring_of(*ids: str, active: str | None = None) -> Keyring:
    keys = tuple(
        Key(id=i, material=bytes([n]) * 32, created="2026-01-01T00:00:00+00:00")
        for n, i in enumerate(ids)
    )
    return Keyring(active=active or ids[0], keys=keys)


def test_add_makes_a_key_that_decrypts_but_does_not_encrypt() -> None:
    ring = ring_of("aaaaaaaa").add(Key(id="bbbbbbbb", material=CANARY_MATERIAL))
    assert ring.active == "aaaaaaaa"
    assert ring.state_of("bbbbbbbb") == "in_force"
    assert set(ring.decrypting()) == {"aaaaaaaa", "bbbbbbbb"}


def test_add_refuses_an_id_already_in_the_keyring() -> None:
    with pytest.raises(KeyringChangeRefused, match="already"):
        ring_of("aaaaaaaa").add(Key(id="aaaaaaaa", material=CANARY_MATERIAL))


def test_generated_key_avoids_taken_ids() -> None:
    taken = frozenset(f"{n:08x}" for n in range(50))
    assert all(Key.generate(taken=taken).id not in taken for _ in range(50))


def test_activate_switches_the_encrypting_key_and_keeps_the_old_in_force() -> None:
    ring = ring_of("aaaaaaaa", "bbbbbbbb").activate("bbbbbbbb", now="T1")
    assert ring.active == "bbbbbbbb"
    assert ring.state_of("aaaaaaaa") == "in_force"
    assert ring.get("bbbbbbbb").activated_at == "T1"


def test_activate_refuses_a_retired_key() -> None:
    ring = ring_of("aaaaaaaa", "bbbbbbbb").retire("bbbbbbbb")
    with pytest.raises(KeyringChangeRefused, match="retired"):
        ring.activate("bbbbbbbb")


def test_activate_refuses_an_unknown_id() -> None:
    with pytest.raises(KeyringChangeRefused, match="no key"):
        ring_of("aaaaaaaa").activate("cccccccc")


def test_activating_the_active_key_changes_nothing() -> None:
    ring = ring_of("aaaaaaaa")
    assert ring.activate("aaaaaaaa") is ring


def test_retire_refuses_the_active_key() -> None:
    with pytest.raises(KeyringChangeRefused, match="active"):
        ring_of("aaaaaaaa", "bbbbbbbb").retire("aaaaaaaa")


def test_retire_keeps_the_key_but_stops_it_decrypting() -> None:
    ring = ring_of("aaaaaaaa", "bbbbbbbb").retire("bbbbbbbb", now="T2")
    assert ring.state_of("bbbbbbbb") == "retired"
    assert ring.get("bbbbbbbb").retired_at == "T2"
    assert ring.get("bbbbbbbb").material == b"\x01" * 32
    assert set(ring.decrypting()) == {"aaaaaaaa"}
    assert ring.retired_ids() == {"bbbbbbbb"}


def test_restore_brings_a_retired_key_back_in_force() -> None:
    ring = ring_of("aaaaaaaa", "bbbbbbbb").retire("bbbbbbbb").restore("bbbbbbbb", now="T3")
    assert ring.state_of("bbbbbbbb") == "in_force"
    assert ring.get("bbbbbbbb").retired_at is None
    assert ring.get("bbbbbbbb").restored_at == "T3"


def test_restoring_a_key_in_force_changes_nothing() -> None:
    ring = ring_of("aaaaaaaa", "bbbbbbbb")
    assert ring.restore("bbbbbbbb") is ring


def test_operations_leave_the_original_keyring_unchanged() -> None:
    ring = ring_of("aaaaaaaa", "bbbbbbbb")
    ring.retire("bbbbbbbb")
    ring.activate("bbbbbbbb")
    ring.add(Key(id="cccccccc", material=CANARY_MATERIAL))
    assert ring == ring_of("aaaaaaaa", "bbbbbbbb")


def test_keyring_repr_shows_no_key_material() -> None:
    ring = Keyring(active="aaaaaaaa", keys=(Key(id="aaaaaaaa", material=CANARY_MATERIAL),))
    assert repr(CANARY_MATERIAL) not in repr(ring)
    assert CANARY_MATERIAL.hex() not in repr(ring)


# -- the file format ------------------------------------------------------------

OLD_FORMAT = (
    b'{"format": "citadel-keyring/1", "origin": "operator", "active": "bbbbbbbb",'
    b' "keys": [{"id": "aaaaaaaa", "key": "' + base64.b64encode(b"\x00" * 32) + b'",'
    b' "created": "2026-01-01T00:00:00+00:00"},'
    b' {"id": "bbbbbbbb", "key": "' + base64.b64encode(b"\x01" * 32) + b'",'
    b' "created": "2026-02-01T00:00:00+00:00"}]}'
)


def test_a_file_from_the_previous_version_loads_with_every_key_in_force() -> None:
    ring = parse_keyring(OLD_FORMAT)
    assert ring.active == "bbbbbbbb"
    assert ring.state_of("aaaaaaaa") == "in_force"
    assert ring.decrypting() == {"aaaaaaaa": b"\x00" * 32, "bbbbbbbb": b"\x01" * 32}


def test_dumped_keyring_parses_back_equal() -> None:
    ring = ring_of("aaaaaaaa", "bbbbbbbb", "cccccccc").retire("cccccccc").activate("bbbbbbbb")
    assert parse_keyring(dump_keyring(ring)) == ring


def test_states_are_written_in_each_keys_entry() -> None:
    doc = json.loads(dump_keyring(ring_of("aaaaaaaa", "bbbbbbbb").retire("bbbbbbbb", now="T")))
    assert doc["active"] == "aaaaaaaa"
    assert [(e["id"], e["state"]) for e in doc["keys"]] == [
        ("aaaaaaaa", "in_force"),
        ("bbbbbbbb", "retired"),
    ]
    assert doc["keys"][1]["retired_at"] == "T"


def test_fields_this_version_does_not_know_survive_a_change() -> None:
    doc = json.loads(OLD_FORMAT)
    doc["rotation_policy"] = {"days": 90}
    doc["keys"][0]["hsm_label"] = "slot-3"
    ring = parse_keyring(json.dumps(doc).encode()).retire("aaaaaaaa")
    again = json.loads(dump_keyring(ring))
    assert again["rotation_policy"] == {"days": 90}
    assert again["keys"][0]["hsm_label"] == "slot-3"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda d: d["keys"][0].update(state="destroyed"), "unknown state"),
        (lambda d: d["keys"][1].update(state="retired"), "active key bbbbbbbb is marked retired"),
        (lambda d: d["keys"][0].update(id="bbbbbbbb"), "repeated key id"),
        (lambda d: d["keys"][1].update(retired_at=5), "malformed retired_at"),
    ],
    ids=["unknown-state", "active-retired", "repeated-id", "bad-date"],
)
def test_inconsistent_keyring_is_refused_naming_the_problem(change: Any, problem: str) -> None:
    doc = json.loads(OLD_FORMAT)
    change(doc)
    with pytest.raises(KeyringError, match=problem) as info:
        parse_keyring(json.dumps(doc).encode())
    assert base64.b64encode(b"\x01" * 32).decode() not in str(info.value)


def kubernetes_secret_mount(tmp_path: Path) -> tuple[Path, Path]:
    """``keyring.json -> ..data/keyring.json``, ``..data -> ..2026_01``: a Secret volume."""
    mount = tmp_path / "secret"
    real_dir = mount / "..2026_01"
    real_dir.mkdir(parents=True)
    create_keyring(real_dir / "keyring.json", origin="operator")
    (mount / "..data").symlink_to("..2026_01")
    (mount / "keyring.json").symlink_to("..data/keyring.json")
    return mount / "keyring.json", real_dir / "keyring.json"


def test_rotating_a_symlinked_keyring_keeps_the_links_and_replaces_the_target(
    tmp_path: Path,
) -> None:
    link, target = kubernetes_secret_mount(tmp_path)
    new_kid = rotate_keyring(link)
    assert link.is_symlink()
    assert (link.parent / "..data").is_symlink()
    assert load_keyring(target).active == new_kid
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(os.listdir(target.parent)) == ["keyring.json"]


def test_change_writes_nothing_when_the_keyring_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    create_keyring(path, origin="operator")
    inode = path.stat().st_ino
    change_keyring(path, lambda ring: ring.activate(ring.active))
    assert path.stat().st_ino == inode


def test_refused_change_leaves_the_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    create_keyring(path, origin="operator")
    before = path.read_bytes()
    with pytest.raises(KeyringChangeRefused):
        change_keyring(path, lambda ring: ring.retire(ring.active))
    assert path.read_bytes() == before


# -- the provider on a keyring with states ----------------------------------------


def test_retired_key_decrypts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    ct = provider_at(path).encrypt_sync("old secret")
    old = load_keyring(path).active
    rotate_keyring(path)
    change_keyring(path, lambda ring: ring.retire(old))
    with pytest.raises(KeyRetired):
        LocalProvider(load_keyring(path)).decrypt_sync(ct)


def test_successful_decrypts_are_counted_per_key_id(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    create_keyring(path, origin="auto")
    metrics = Metrics()
    provider = LocalProvider(load_keyring(path), metrics=metrics)
    ct = provider.encrypt_sync("x")
    for _ in range(3):
        provider.decrypt_sync(ct)
    with pytest.raises(InvalidCiphertext):
        provider.decrypt_sync(ct[:-2] + "AA")
    kid = provider.active_key_id
    text = metrics.render().decode()
    assert f'citadel_keyring_decrypts_total{{key_id="{kid}"}} 3.0' in text
