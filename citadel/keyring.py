"""The local provider's keyring: several keys, one active, each in force or retired.

Two layers, MultiFernet style:

- :class:`Keyring`, an immutable value with small pure operations
  (:meth:`~Keyring.add`, :meth:`~Keyring.activate`, :meth:`~Keyring.retire`,
  :meth:`~Keyring.restore`) that each return a new keyring or raise
  :class:`KeyringChangeRefused`;
- the file format (:func:`parse_keyring`, :func:`dump_keyring`,
  :func:`load_keyring`, :func:`save_keyring`), the only code that knows JSON.

Format (JSON, mode 0600)::

    {"format": "citadel-keyring/1", "origin": "auto" | "operator",
     "active": "<key id>",
     "keys": [{"id": "<8 hex>", "key": "<base64 of 32 bytes>", "created": "<ISO 8601>",
               "state": "in_force" | "retired", "activated_at": "...",
               "retired_at": "...", "restored_at": "..."}]}

A key's state lives in its entry; an entry without ``state`` (files written
before states existed) is in force, so such a file loads unchanged. The
active key is the one ``active`` names and is always in force. Fields this
version does not know are kept through every change, so a newer Citadel's
additions survive an older CLI.

``origin`` records whether Citadel created the file itself in development
(``auto``) or an operator made it with ``citadel keyring init``; production
refuses ``auto``. The file is loaded, never regenerated: a corrupt or
unreadable keyring stops start-up instead of being replaced, because replacing
it would make every stored ciphertext undecryptable.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Any

from citadel.config import SettingError, read_secret_file
from citadel.fileio import create_once, replace_atomically

FORMAT = "citadel-keyring/1"
KEY_ID = re.compile(r"^[0-9a-f]{8}$")
_EMPTY: Mapping[str, Any] = MappingProxyType({})
# Fields this module writes itself; anything else in an entry or the document is kept as is.
_DATES = ("created", "activated_at", "retired_at", "restored_at")
_KEY_FIELDS = frozenset({"id", "key", "state", *_DATES})
_DOC_FIELDS = frozenset({"format", "origin", "active", "keys"})


class KeyringError(Exception):
    """The keyring cannot be used; the message names the problem, never key material."""


class KeyringChangeRefused(KeyringError):
    """An operation that the keyring's rules forbid (an unknown id, retiring the active key)."""


class KeyState(StrEnum):
    """A keyring key's state: active (encrypts), in force (decrypts), or retired (refused)."""

    IN_FORCE = "in_force"
    RETIRED = "retired"


def now_iso() -> str:
    """The current UTC time as the keyring file writes it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True)
class Key:
    """One keyring key: its id, its 256-bit secret, its state and when it changed."""

    id: str
    material: bytes = field(repr=False)
    state: KeyState = KeyState.IN_FORCE
    created: str | None = None
    activated_at: str | None = None
    retired_at: str | None = None
    restored_at: str | None = None
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False, compare=False)

    @classmethod
    def generate(cls, *, taken: frozenset[str] = frozenset(), now: str | None = None) -> Key:
        """A fresh 256-bit key whose id is not in ``taken``."""
        key_id = secrets.token_hex(4)
        while key_id in taken:
            key_id = secrets.token_hex(4)
        return cls(id=key_id, material=secrets.token_bytes(32), created=now or now_iso())

    @property
    def retired(self) -> bool:
        """Whether ciphertexts under this key are refused (key_retired)."""
        return self.state is KeyState.RETIRED


@dataclass(frozen=True, slots=True)
class Keyring:
    """The keys of one keyring file, in order, with exactly one active."""

    active: str
    keys: tuple[Key, ...]
    origin: str = "operator"
    extra: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise KeyringError("keyring has a repeated key id")
        if self.active not in ids:
            raise KeyringError("the active key id is not among the keyring's keys")
        if self.get(self.active).retired:
            raise KeyringError(f"the active key {self.active} is marked retired")

    def __repr__(self) -> str:
        states = {k.id: self.state_of(k.id) for k in self.keys}
        return f"Keyring(active={self.active!r}, keys={states!r}, origin={self.origin!r})"

    @property
    def ids(self) -> frozenset[str]:
        """The ids of every key, in file order."""
        return frozenset(k.id for k in self.keys)

    def get(self, key_id: str) -> Key:
        """The key with this id, or None."""
        for key in self.keys:
            if key.id == key_id:
                return key
        raise KeyringChangeRefused(f"no key {key_id!r} in the keyring")

    def state_of(self, key_id: str) -> str:
        """``active``, ``in_force`` or ``retired``: the three states of the contract."""
        return "active" if key_id == self.active else self.get(key_id).state.value

    def decrypting(self) -> dict[str, bytes]:
        """Key id to material for every key in force, the active one included."""
        return {k.id: k.material for k in self.keys if not k.retired}

    def retired_ids(self) -> frozenset[str]:
        """The ids of the retired keys."""
        return frozenset(k.id for k in self.keys if k.retired)

    def _with(self, key: Key, **changes: Any) -> Keyring:
        keys = tuple(replace(key, **changes) if k.id == key.id else k for k in self.keys)
        return replace(self, keys=keys)

    def add(self, key: Key) -> Keyring:
        """Add ``key`` in force, not active: the fleet learns it before anyone encrypts with it."""
        if key.id in self.ids:
            raise KeyringChangeRefused(f"key {key.id} is already in the keyring")
        return replace(self, keys=(*self.keys, replace(key, state=KeyState.IN_FORCE)))

    def activate(self, key_id: str, *, now: str | None = None) -> Keyring:
        """Make ``key_id`` the key that encrypts; the previous one stays in force."""
        key = self.get(key_id)
        if key.retired:
            raise KeyringChangeRefused(f"key {key_id} is retired; restore it before activating it")
        if key_id == self.active:
            return self
        ring = self._with(key, activated_at=now or now_iso())
        return replace(ring, active=key_id)

    def retire(self, key_id: str, *, now: str | None = None) -> Keyring:
        """Keep ``key_id`` in the file but decrypt nothing with it."""
        key = self.get(key_id)
        if key_id == self.active:
            raise KeyringChangeRefused(
                f"key {key_id} is the active key; activate another key before retiring it"
            )
        if key.retired:
            return self
        return self._with(key, state=KeyState.RETIRED, retired_at=now or now_iso())

    def restore(self, key_id: str, *, now: str | None = None) -> Keyring:
        """Bring a retired key back in force."""
        key = self.get(key_id)
        if not key.retired:
            return self
        restored = now or now_iso()
        return self._with(key, state=KeyState.IN_FORCE, retired_at=None, restored_at=restored)


# -- the file format ------------------------------------------------------------


def parse_keyring(raw: bytes, source: str = "keyring") -> Keyring:
    """Parse and check a keyring document; ``source`` names it in error messages."""
    try:
        doc = json.loads(raw)
    except ValueError:
        raise KeyringError(f"{source} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyringError(f"{source} is not a {FORMAT} file")
    entries = doc.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeyringError(f"{source} holds no keys")
    keys = [_parse_entry(entry, source) for entry in entries]
    active = doc.get("active")
    if not isinstance(active, str) or active not in {k.id for k in keys}:
        raise KeyringError(f"{source}: the active key id is not among its keys")
    origin = doc.get("origin")
    extra = {k: v for k, v in doc.items() if k not in _DOC_FIELDS}
    try:
        return Keyring(
            active=active,
            keys=tuple(keys),
            origin=str(origin or "operator"),
            extra=MappingProxyType(extra),
        )
    except KeyringError as exc:
        raise KeyringError(f"{source}: {exc}") from None


def _parse_entry(entry: Any, source: str) -> Key:
    key_id = entry.get("id") if isinstance(entry, dict) else None
    if not isinstance(key_id, str) or not KEY_ID.match(key_id):
        raise KeyringError(f"{source} has a missing or malformed key id")
    assert isinstance(entry, dict)
    try:
        material = base64.b64decode(entry.get("key", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        material = b""
    if len(material) != 32:
        raise KeyringError(f"{source}: key {key_id} is not 32 bytes of base64")
    try:
        state = KeyState(entry.get("state", KeyState.IN_FORCE.value))
    except ValueError:
        raise KeyringError(f"{source}: key {key_id} has an unknown state") from None
    dates = {}
    for name in _DATES:
        value = entry.get(name)
        if value is not None and not isinstance(value, str):
            raise KeyringError(f"{source}: key {key_id} has a malformed {name}")
        dates[name] = value
    extra = {k: v for k, v in entry.items() if k not in _KEY_FIELDS}
    return Key(id=key_id, material=material, state=state, extra=MappingProxyType(extra), **dates)


def dump_keyring(ring: Keyring) -> bytes:
    """The JSON document for ``ring``; :func:`parse_keyring` reads it back equal."""
    entries = []
    for key in ring.keys:
        entry: dict[str, Any] = {"id": key.id, "key": base64.b64encode(key.material).decode()}
        entry["state"] = key.state.value
        for name in _DATES:
            value = getattr(key, name)
            if value is not None:
                entry[name] = value
        entry.update(key.extra)
        entries.append(entry)
    doc: dict[str, Any] = {"format": FORMAT, "origin": ring.origin, "active": ring.active}
    doc["keys"] = entries
    doc.update(ring.extra)
    return json.dumps(doc, indent=2).encode() + b"\n"


def resolve(path: Path) -> Path:
    """The file a keyring path names, through every symlink.

    A Kubernetes Secret mount is ``keyring.json -> ..data/keyring.json`` with
    ``..data -> ..<timestamp>``; changes must replace that last file and keep
    the links, and a watcher must look at it to see a swap of ``..data``.
    """
    return Path(os.path.realpath(path))


def load_keyring(path: Path, *, env: str | None = None) -> Keyring:
    """Read, parse and check the keyring at ``path`` (symlinks followed).

    With ``env`` (the server's ``CITADEL_ENV``) the file's mode and owner are
    checked too (:func:`citadel.config.read_secret_file`): production refuses
    a keyring that other users could read or replace, development warns.
    """
    try:
        if env is None:
            raw = path.read_bytes()
        else:
            raw = read_secret_file(path, "CITADEL_LOCAL_KEYRING", env)
    except SettingError as exc:
        raise KeyringError(f"keyring {path} {exc.problem}") from None
    except FileNotFoundError:
        raise KeyringError(
            f"keyring {path} does not exist (create one with `citadel keyring init`)"
        ) from None
    except OSError as exc:
        raise KeyringError(f"keyring {path} cannot be read ({exc.strerror})") from None
    return parse_keyring(raw, f"keyring {path}")


def save_keyring(path: Path, ring: Keyring) -> None:
    """Replace the file ``path`` resolves to with ``ring``, atomically; symlinks stay."""
    replace_atomically(resolve(path), dump_keyring(ring))


def _fresh_document(origin: str) -> bytes:
    key = Key.generate()
    return dump_keyring(Keyring(active=key.id, keys=(key,), origin=origin))


def create_keyring(path: Path, *, origin: str) -> bool:
    """Create a keyring with one fresh key unless one exists; True when created here."""
    return create_once(resolve(path), lambda: _fresh_document(origin))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # An advisory lock on the directory holding the real file serialises two
    # operators' read-modify-write cycles, so neither's change is lost. The
    # directory, not a lock file: a Secret volume's directory may not be
    # ours to litter, and a directory fd can be flock'd read-only.
    fd = os.open(resolve(path).parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def change_keyring(path: Path, change: Callable[[Keyring], Keyring]) -> tuple[Keyring, Keyring]:
    """Apply ``change(ring) -> ring`` to the file under a lock; returns (before, after).

    The file is written only when the keyring changed.
    """
    with _locked(path):
        before = load_keyring(path)
        after = change(before)
        if after != before:
            save_keyring(path, after)
    return before, after


def rotate_keyring(path: Path) -> str:
    """Add a fresh key and make it active; older keys stay in force. Returns its id."""

    def rotate(ring: Keyring) -> Keyring:
        key = Key.generate(taken=ring.ids)
        return ring.add(key).activate(key.id)

    _, after = change_keyring(path, rotate)
    return after.active
