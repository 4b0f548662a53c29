"""The vault: what each operation means, independent of HTTP.

One provider encrypts (``CITADEL_PROVIDER``); every provider named in
``CITADEL_DECRYPT_PROVIDERS`` decrypts the ciphertexts that carry its prefix
(``cit1:`` local, ``ev:`` Evervault), so data can move from one provider to
the other by rewrapping while both keep working.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from citadel import signing
from citadel.context import RESERVED_PREFIX, Context, canonical
from citadel.errors import (
    CitadelError,
    InvalidCiphertext,
    InvalidKey,
    InvalidRequest,
    PayloadTooLarge,
    ProviderUnavailable,
)
from citadel.keycheck import CheckUnavailable, RsaKeyChecker
from citadel.providers.base import Provider

# Signing with these takes long enough (RSA: about a millisecond) that it
# runs in a worker thread instead of holding the event loop.
_SLOW_ALGORITHMS = frozenset({"rsa-pkcs1v15-sha256"})


# Every provider's ciphertext prefix, enabled here or not (the contract's "Ciphertexts").
_ALL_PREFIXES = (("ev:", "evervault"), ("cit1:", "local"))


# Not frozen: one is made per item of every /sign, and a frozen dataclass costs
# three times as much to build; nothing changes a job once made.
@dataclass(slots=True)
class SignJob:
    """One signature to make: the ciphertext of the secret (and its context), and what to sign."""

    ciphertext: str
    algorithm: str
    message: bytes
    key_encoding: str
    signature_encoding: str
    context: Context | None = None


class KeyVerdicts:
    """What ``/sign`` learnt about the secret inside a ciphertext, so that it is learnt once.

    A ciphertext always decrypts to the same secret, so a verdict on that
    secret for one algorithm and key encoding holds for the ciphertext: an RSA
    key that passed the key check (``None``), or the fixed detail of the
    ``invalid_key`` it got. A refused ciphertext sent again is refused without
    decrypting it (for Evervault, without an API call) or parsing anything.
    Entries are a keyed BLAKE2b MAC of the ciphertext under a random per-process key: nothing
    here says anything of a secret, nor even which ciphertexts were seen.
    Bounded, the least recently used forgotten first.
    """

    def __init__(self, capacity: int = 16384) -> None:
        self._salt = secrets.token_bytes(32)
        self._seen: OrderedDict[bytes, str | None] = OrderedDict()
        self._capacity = capacity

    def fingerprint(self, job: SignJob) -> bytes:
        """The key under which a verdict is remembered: ciphertext, context, algorithm, encoding.

        The context is part of it, so a request with the wrong context never
        learns a verdict reached with the right one.
        """
        bound = canonical(job.context) if job.context else b""
        # Length-prefixed, so no ciphertext and context can pass for another pair.
        data = f"{job.algorithm}\0{job.key_encoding}\0{len(job.ciphertext)}:{job.ciphertext}"
        # Keyed BLAKE2b is a MAC as HMAC-SHA256 is, at half the cost on every /sign.
        raw = data.encode("utf-8", "surrogatepass") + bound
        return hashlib.blake2b(raw, key=self._salt, digest_size=32).digest()

    def known(self, fingerprint: bytes) -> tuple[bool, str | None]:
        """Whether there is a verdict, and the refusal's detail if it was one."""
        if fingerprint not in self._seen:
            return False, None
        self._seen.move_to_end(fingerprint)
        return True, self._seen[fingerprint]

    def remember(self, fingerprint: bytes, refused: str | None) -> None:
        """Keep a verdict (None: the key checked out), dropping the oldest past capacity."""
        self._seen[fingerprint] = refused
        self._seen.move_to_end(fingerprint)
        while len(self._seen) > self._capacity:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)


class Vault:
    """Checks the size limit, then asks the provider that owns the data.

    Who may call which operation is decided before: the request path checks the
    ACL before it reads a body (see :mod:`citadel.http.pipeline`).
    """

    def __init__(
        self,
        encryptor: Provider,
        decryptors: Sequence[Provider],
        max_plaintext_bytes: int,
        *,
        key_checker: RsaKeyChecker | None = None,
    ) -> None:
        self.provider = encryptor
        self.decryptors = tuple(decryptors)
        self._routes = tuple((p.prefix, p) for p in self.decryptors)
        self._max = max_plaintext_bytes
        self.key_checker = key_checker or RsaKeyChecker()
        self.key_verdicts = KeyVerdicts()

    def owner(self, ciphertext: str) -> Provider:
        """The decrypting provider whose prefix the ciphertext carries."""
        for prefix, provider in self._routes:
            if ciphertext.startswith(prefix):
                return provider
        for prefix, name in _ALL_PREFIXES:
            if ciphertext.startswith(prefix):
                # Says which provider, never anything of the ciphertext beyond its public prefix.
                raise InvalidCiphertext(
                    f"The ciphertext is from the {name} provider, which this instance does not "
                    "decrypt (CITADEL_DECRYPT_PROVIDERS)."
                )
        raise InvalidCiphertext()

    def check_plaintext(self, plaintext: str) -> None:
        """The plaintext's own limits, before anything is done (a batch checks every item first)."""
        try:
            size = len(plaintext.encode())
        except UnicodeEncodeError:
            # A lone surrogate (JSON "\\ud800") is valid JSON but not UTF-8.
            raise InvalidRequest("The plaintext is not valid Unicode text.") from None
        if size > self._max:
            raise PayloadTooLarge(f"The plaintext is over {self._max} UTF-8 bytes.")
        if plaintext.startswith(RESERVED_PREFIX):
            raise InvalidRequest("The plaintext begins with a sequence Citadel reserves.")

    async def encrypt(self, plaintext: str, context: Context | None = None) -> str:
        """The ciphertext of ``plaintext`` by the encrypting provider, bound to ``context``."""
        self.check_plaintext(plaintext)
        return await self.provider.encrypt(plaintext, context)

    async def encrypt_checked(self, plaintext: str, context: Context | None = None) -> str:
        """:meth:`encrypt` of a plaintext that already passed :meth:`check_plaintext`.

        A batch checks every item before it encrypts any; checking again costs
        a UTF-8 encoding per item for nothing.
        """
        return await self.provider.encrypt(plaintext, context)

    async def decrypt(self, ciphertext: str, context: Context | None = None) -> str:
        """The plaintext inside ``ciphertext``, from the provider its prefix names."""
        return await self.owner(ciphertext).decrypt(ciphertext, context)

    async def decrypt_many(
        self, items: Sequence[tuple[str, Context | None]]
    ) -> list[str | CitadelError]:
        """Each item's plaintext or its own error; one provider call per provider involved."""
        results: list[str | CitadelError] = [InvalidCiphertext()] * len(items)
        groups: dict[int, tuple[Provider, list[int]]] = {}
        for index, (ciphertext, _context) in enumerate(items):
            try:
                provider = self.owner(ciphertext)
            except InvalidCiphertext as err:
                results[index] = err
                continue
            groups.setdefault(id(provider), (provider, []))[1].append(index)
        for provider, indices in groups.values():
            found = await provider.decrypt_many([items[i] for i in indices])
            for index, result in zip(indices, found, strict=True):
                results[index] = result
        return results

    async def rewrap(
        self, ciphertext: str, context: Context | None = None, target: Context | None = None
    ) -> str:
        """The same plaintext, encrypted again by the encrypting provider under its active key.

        ``context`` is the one ``ciphertext`` was made with; ``target`` the one
        the new ciphertext is bound to (the caller passes ``context`` to keep it).
        """
        plaintext = await self.owner(ciphertext).decrypt(ciphertext, context)
        return await self.provider.encrypt(plaintext, target)

    async def rewrap_many(
        self, items: Sequence[tuple[str, Context | None, Context | None]]
    ) -> list[str | CitadelError]:
        """:meth:`rewrap` for a batch: one decrypting call per provider, then local encryption."""
        plains = await self.decrypt_many([(ct, context) for ct, context, _target in items])
        results: list[str | CitadelError] = []
        for (_ct, _context, target), plain in zip(items, plains, strict=True):
            if isinstance(plain, CitadelError):
                results.append(plain)
            else:
                results.append(await self.provider.encrypt(plain, target))
        return results

    async def sign(self, job: SignJob) -> str:
        """Sign ``job.message`` with the secret inside its ciphertext; only the signature leaves.

        Nothing here holds the event loop for long, whatever the secret: a key
        refused before is refused again at once, keys are parsed without the RSA
        check, and that check runs in :class:`~citadel.keycheck.RsaKeyChecker`'s process.
        """
        fingerprint = self.key_verdicts.fingerprint(job)
        known, refused = self.key_verdicts.known(fingerprint)
        if refused is not None:
            raise InvalidKey(refused)
        secret = await self.owner(job.ciphertext).decrypt(job.ciphertext, job.context)
        return await self._sign_with(job, secret, fingerprint, known)

    async def sign_many(self, jobs: Sequence[SignJob]) -> list[str | CitadelError]:
        """:meth:`sign` for a batch: keys refused before are refused without a decrypt."""
        results: list[str | CitadelError] = [InvalidKey()] * len(jobs)
        verdicts = []
        pending = []
        for index, job in enumerate(jobs):
            fingerprint = self.key_verdicts.fingerprint(job)
            known, refused = self.key_verdicts.known(fingerprint)
            verdicts.append((fingerprint, known))
            if refused is not None:
                results[index] = InvalidKey(refused)
            else:
                pending.append(index)
        secrets_ = await self.decrypt_many([(jobs[i].ciphertext, jobs[i].context) for i in pending])
        for index, secret in zip(pending, secrets_, strict=True):
            if isinstance(secret, CitadelError):
                results[index] = secret
                continue
            # Asked again: an earlier item of this batch may have the same key,
            # whose verdict is now known (one RSA check for all its copies).
            fingerprint = verdicts[index][0]
            known, refused = self.key_verdicts.known(fingerprint)
            if refused is not None:
                results[index] = InvalidKey(refused)
                continue
            try:
                results[index] = await self._sign_with(jobs[index], secret, fingerprint, known)
            except InvalidKey as err:
                results[index] = err
        return results

    async def _sign_with(self, job: SignJob, secret: str, fingerprint: bytes, known: bool) -> str:
        verdicts = self.key_verdicts
        refused = None
        try:
            prepared = signing.prepare(
                job.algorithm,
                secret,
                key_encoding=job.key_encoding,
                signature_encoding=job.signature_encoding,
                rsa_checked=known,
            )
        except InvalidKey as err:
            refused = err.detail
        # Dropped before anything is raised: the error's traceback keeps this frame.
        del secret
        if refused is not None:
            verdicts.remember(fingerprint, refused)
            raise InvalidKey(refused)
        if prepared.unchecked_pem is not None:
            try:
                passed = await self.key_checker.passes(prepared.unchecked_pem)
            except CheckUnavailable:
                raise ProviderUnavailable(
                    "The key check is busy; retry later.", retry_after=1
                ) from None
            if not passed:
                verdicts.remember(fingerprint, signing.RSA_KEY_CHECK_FAILED)
                raise InvalidKey(signing.RSA_KEY_CHECK_FAILED)
            verdicts.remember(fingerprint, None)
        if job.algorithm in _SLOW_ALGORITHMS:
            return await asyncio.to_thread(
                signing.sign_prepared, prepared, job.message, job.signature_encoding
            )
        return signing.sign_prepared(prepared, job.message, job.signature_encoding)

    async def aclose(self) -> None:
        """Stop the RSA key checker's child process."""
        await self.key_checker.aclose()
