"""The embedded provider: XAES-256-GCM under a local keyring.

Ciphertext: ``cit1:<key id>:<base64url(nonce[24] || ciphertext || tag[16])>``.
The header ``cit1:<key id>:`` is the associated data, so a ciphertext cannot be
re-labelled to another key or format version without failing authentication.

Why XAES-256-GCM (C2SP) and not plain AES-256-GCM: with random 96-bit nonces
one AES-GCM key is good for about 2^32 messages, which several instances at
full speed would exhaust in days. XAES derives a fresh AES-256-GCM key per
message from the first 96 bits of a 192-bit random nonce (NIST SP 800-108 KDF
in counter mode with CMAC-AES-256), and uses the remaining 96 bits as the GCM
nonce, so nonce collisions stop being a practical concern. It is AES-256-GCM
all the same, and costs two extra AES block operations. See docs/formats.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from cryptography.exceptions import InvalidTag

from citadel.breaker import BreakerState
from citadel.config import SettingError, Settings
from citadel.context import Context, canonical
from citadel.errors import CitadelError, InvalidCiphertext, KeyRetired
from citadel.keyring import KEY_ID, Keyring, KeyringError, create_keyring, load_keyring, resolve
from citadel.providers.xaes import XAES256GCM

if TYPE_CHECKING:
    from citadel.metrics import Metrics

log = structlog.get_logger("citadel")

PREFIX = "cit1"
NONCE_BYTES = 24
TAG_BYTES = 16


# (device, inode, mtime, size, mode, owner) of the file a keyring path resolves
# to, with that resolved path: a Secret volume's ``..data`` swap changes the
# path, an atomic replace the inode, an in-place edit the mtime or size, and a
# `chmod`/`chown` that makes a refused file safe the mode or owner.
Stamp = tuple[str, int, int, int, int, int, int]


def file_stamp(path: Path) -> Stamp | None:
    """What identifies the file behind ``path`` now (see ``Stamp``); None if it cannot be read."""
    target = str(resolve(path))
    try:
        st = os.stat(target)
    except OSError:
        return None
    return (target, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode, st.st_uid)


@dataclass(frozen=True, slots=True)
class _View:
    """One keyring as the hot path needs it; replaced whole, so a request sees old or new."""

    keyring: Keyring
    ciphers: dict[str, XAES256GCM]  # every key in force, the active one included
    retired: frozenset[str]
    active_cipher: XAES256GCM
    header: str
    header_bytes: bytes

    @classmethod
    def of(cls, ring: Keyring, previous: _View | None = None) -> _View:
        before = previous.keyring.decrypting() if previous else {}
        ciphers = {
            # Keeping a key's cipher keeps its per-thread AES contexts warm.
            kid: previous.ciphers[kid] if previous and before.get(kid) == key else XAES256GCM(key)
            for kid, key in ring.decrypting().items()
        }
        header = f"{PREFIX}:{ring.active}:"
        return cls(
            keyring=ring,
            ciphers=ciphers,
            retired=ring.retired_ids(),
            active_cipher=ciphers[ring.active],
            header=header,
            header_bytes=header.encode(),
        )

    def cipher(self, kid: str) -> XAES256GCM:
        """The cipher of key ``kid``; ``KeyRetired`` or ``InvalidCiphertext`` when it has none."""
        found = self.ciphers.get(kid)
        if found is None:
            raise KeyRetired() if kid in self.retired else InvalidCiphertext()
        return found

    def unknown(self, kid: str) -> bool:
        """Whether ``kid`` is a well-formed key id this keyring has never held (a re-read may)."""
        return kid not in self.ciphers and kid not in self.retired and bool(KEY_ID.match(kid))


class _NoCount:
    def inc(self) -> None:
        return None


class LocalProvider:
    """Encrypts in-process under the keyring file, and follows that file while it runs.

    The work is a few microseconds, so it runs inline on the loop. The keyring
    in use is one immutable :class:`_View`; a reload builds a new one and swaps
    the reference, so a request sees the old keyring or the new, never a mix.

    Changes are found two ways. A watcher ``stat``s the file every
    ``poll_interval_s`` and reads it when it changed. And a decrypt naming a
    key id this instance does not know re-reads the file first: another
    instance may have activated a key this one has not seen yet. Those re-reads
    are shared and spaced at least ``reread_interval_s`` apart, so random key
    ids cannot turn every request into a disk read; a request that arrives
    while a read is in progress waits for the next one, because its ciphertext
    may be newer than that read.

    A changed file that does not load keeps the keyring in force and logs
    ``keyring_reload_failed``, once per distinct problem.
    """

    name = "local"
    prefix = f"{PREFIX}:"
    has_breaker = False

    def __init__(
        self,
        keyring: Keyring,
        *,
        path: Path | None = None,
        metrics: Metrics | None = None,
        seen: Stamp | None = None,
        poll_interval_s: float = 1.0,
        reread_interval_s: float = 1.0,
        loader: Callable[[Path], Keyring] = load_keyring,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._view = _View.of(keyring)
        self._path = path
        self._seen = seen
        self._poll_interval = poll_interval_s
        self._reread_interval = reread_interval_s
        self._loader = loader
        self._clock = clock
        self._counter = metrics.keyring_decrypts if metrics is not None else None
        self._counts: dict[str, Any] = {}
        self._reload_lock = asyncio.Lock()
        self._last_failure: tuple[Stamp | None, str] | None = None
        self._last_reread = -float("inf")
        self._next_reread: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics, *, create: bool) -> LocalProvider:
        """The provider on ``CITADEL_LOCAL_KEYRING``; ``KeyringError`` when missing or broken.

        With ``create`` in development a missing keyring is created (and
        ``keyring_created`` logged); production refuses one that was.
        """
        path = settings.local_keyring
        if create and settings.env == "development" and create_keyring(path, origin="auto"):
            log.info("keyring_created", path=str(path))
        env = settings.env

        def loader(p: Path) -> Keyring:
            # The file's mode and owner are checked at start-up and on every re-read.
            return load_keyring(p, env=env)

        seen = file_stamp(path)  # before reading: a change in between is then seen again
        keyring = loader(path)
        if settings.env == "production" and keyring.origin == "auto":
            raise SettingError(
                "CITADEL_LOCAL_KEYRING",
                "was auto-created for development; create one with `citadel keyring init`",
            )
        return cls(keyring, path=path, metrics=metrics, seen=seen, loader=loader)

    def __repr__(self) -> str:
        return f"LocalProvider(path={self._path!r}, keyring={self._view.keyring!r})"

    @property
    def active_key_id(self) -> str:
        """The id of the key new ciphertexts are made under."""
        return self._view.keyring.active

    @property
    def keyring(self) -> Keyring:
        """The keyring in force; replaced whole when the file changes, never edited in place."""
        return self._view.keyring

    async def start(self) -> None:
        """Watch the keyring file, if there is one; the keys themselves are already in memory."""
        if self._path is not None and self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    async def aclose(self) -> None:
        """Stop watching the keyring file."""
        for task in (self._watch_task, self._next_reread):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watch_task = self._next_reread = None

    def ready(self) -> bool:
        """Always True: the keyring is loaded when the provider is built."""
        return True

    def breaker_state(self) -> BreakerState:
        """Always closed: there is no upstream to guard."""
        return BreakerState.CLOSED

    async def encrypt(self, plaintext: str, context: Context | None = None) -> str:
        """Encrypt under the active key; microseconds of CPU, so it runs on the event loop."""
        return self.encrypt_sync(plaintext, context)

    async def decrypt_many(
        self, items: Sequence[tuple[str, Context | None]]
    ) -> list[str | CitadelError]:
        """Each item decrypted in turn (each is microseconds): a value or its own error.

        Key ids not in the keyring read the file once for the whole batch, not
        once per item (a re-read happens at most once a second).
        """
        # The key id of each ciphertext that has one (a malformed one fails below).
        kids = [ct.split(":", 2)[1] for ct, _context in items if ct.count(":") >= 2]
        if self._path is not None and any(self._view.unknown(kid) for kid in kids):
            await self._reread_for_unknown_key()
        view = self._view
        results: list[str | CitadelError] = []
        for ciphertext, context in items:
            try:
                kid, body = _split(ciphertext)
                results.append(self._open(kid, view.cipher(kid), body, context))
            except (InvalidCiphertext, KeyRetired) as err:
                results.append(err)
        return results

    async def decrypt(self, ciphertext: str, context: Context | None = None) -> str:
        """Decrypt under the key the header names; an unknown key id rereads the file first.

        A key added to the file since it was read (a rotation seen by another
        instance first) is found without waiting for the watcher.
        """
        kid, body = _split(ciphertext)
        if self._path is not None and self._view.unknown(kid):
            await self._reread_for_unknown_key()
        return self._open(kid, self._view.cipher(kid), body, context)

    def encrypt_sync(self, plaintext: str, context: Context | None = None) -> str:
        """:meth:`encrypt` without the coroutine, for callers that run no event loop."""
        view = self._view
        nonce = os.urandom(NONCE_BYTES)
        sealed = view.active_cipher.encrypt(
            nonce, plaintext.encode(), _associated(view.header_bytes, context)
        )
        return view.header + _b64(nonce + sealed)

    def decrypt_sync(self, ciphertext: str) -> str:
        """Decrypt with the keyring in memory, without re-reading the file (benchmarks)."""
        kid, body = _split(ciphertext)
        return self._open(kid, self._view.cipher(kid), body)

    def _open(self, kid: str, cipher: XAES256GCM, body: str, context: Context | None = None) -> str:
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        except (binascii.Error, ValueError):
            raise InvalidCiphertext() from None
        # Only the canonical encoding is accepted, so no two strings decrypt to
        # the same message (base64's spare trailing bits would allow it).
        if len(raw) < NONCE_BYTES + TAG_BYTES or _b64(raw) != body:
            raise InvalidCiphertext()
        aad = _associated(f"{PREFIX}:{kid}:".encode(), context)
        try:
            plain = cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad).decode()
        except (InvalidTag, UnicodeDecodeError):
            raise InvalidCiphertext() from None
        child = self._counts.get(kid)
        if child is None:
            # Only a successful decrypt creates a label, so labels are keyring key ids.
            counter = self._counter
            child = self._counts[kid] = counter.labels(kid) if counter else _NoCount()
        child.inc()
        return plain

    # -- following the file ------------------------------------------------------

    async def _watch(self) -> None:
        assert self._path is not None
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                if file_stamp(self._path) != self._seen:
                    await self._reload()
            except Exception:  # the watcher must outlive any surprise
                log.exception("keyring_watch_error")

    async def _reread_for_unknown_key(self) -> None:
        task = self._next_reread
        if task is None:
            task = asyncio.get_running_loop().create_task(self._reread_when_allowed())
            self._next_reread = task
        # Shielded: one request giving up must not cancel the read others wait for.
        await asyncio.shield(task)

    async def _reread_when_allowed(self) -> None:
        delay = self._last_reread + self._reread_interval - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)
        # The read starts now; requests arriving from here on wait for the next one.
        self._next_reread = None
        self._last_reread = self._clock()
        try:
            await self._reload()
        except Exception:
            log.exception("keyring_watch_error")

    async def _reload(self) -> None:
        # One read at a time, so a slow read can never install an older file
        # over a newer one.
        async with self._reload_lock:
            stamp, result = await asyncio.to_thread(self._read)
            if isinstance(result, KeyringError):
                self._seen = stamp  # retried when the file changes again
                failure = (stamp, str(result))
                if failure != self._last_failure:
                    self._last_failure = failure
                    log.error(
                        "keyring_reload_failed",
                        path=str(self._path),
                        problem=str(result),
                        keeping_active=self._view.keyring.active,
                    )
                return
            self._seen = stamp
            self._last_failure = None
            self._install(result)

    def _read(self) -> tuple[Stamp | None, Keyring | KeyringError]:
        assert self._path is not None
        stamp = file_stamp(self._path)
        try:
            return stamp, self._loader(self._path)
        except KeyringError as exc:
            return stamp, exc

    def _install(self, ring: Keyring) -> None:
        old = self._view
        if ring == old.keyring:
            return
        self._view = _View.of(ring, old)
        log.info(
            "keyring_reloaded",
            path=str(self._path),
            active=ring.active,
            previous_active=old.keyring.active,
            in_force=sorted(ring.decrypting()),
            retired=sorted(ring.retired_ids()),
        )


def _associated(header: bytes, context: Context | None) -> bytes:
    """The AEAD's associated data: the header, then (with a context) NUL and its canonical bytes.

    Without a context it is the header alone, exactly as before contexts
    existed, so every older ciphertext decrypts unchanged; the header holds no
    NUL, so no context can be confused with a longer header.
    """
    return header if not context else header + b"\x00" + canonical(context)


def _split(ciphertext: str) -> tuple[str, str]:
    """The key id and body of ``cit1:<key id>:<body>``; ``InvalidCiphertext`` otherwise."""
    prefix, sep, rest = ciphertext.partition(":")
    kid, sep2, body = rest.partition(":")
    if prefix != PREFIX or not sep or not sep2 or len(body) > 2_000_000:
        raise InvalidCiphertext()
    return kid, body


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
