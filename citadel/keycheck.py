"""cryptography's full RSA key check, in a child process, so it never holds the server's GIL.

Loading an RSA private key with its check (primality of p and q, the CRT
values consistent with them) costs 30 ms of CPU for 2048 bits, 250 ms for
4096, and cryptography holds the GIL throughout: run in a worker thread it
still stops the event loop, and every other request with it. The check is
what keeps a key with a wrong CRT value from ever signing (such a signature
gives away the key's factors), so it stays; it runs here instead, in one
child process per server process, fed over a pipe.

The child is this file run by path (``python -I keycheck.py``): it imports
cryptography and nothing of Citadel, and it never writes what it reads (its
standard error goes nowhere). It is started at the first check and again
after it dies; checks wait their turn, a bounded number of them: past that,
or past the time limit, a check fails with ``ProviderUnavailable`` (503 and
``Retry-After``), never with a verdict on the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from pathlib import Path
from typing import Final

_LENGTH: Final = struct.Struct(">I")
_PASSED: Final = b"1"
_FAILED: Final = b"0"
# This very file, run by path in the child (resolved once, at import).
_WORKER: Final = str(Path(__file__).resolve())


class CheckUnavailable(Exception):
    """The checking process could not give a verdict (busy, dead or late)."""


class RsaKeyChecker:
    """Runs :func:`rsa_key_passes` on a PEM in the child process; one check at a time."""

    def __init__(self, *, timeout_s: float = 10.0, max_waiting: int = 64) -> None:
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.checks = 0  # verdicts given, for tests and metrics
        self._child: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._waiting = 0

    async def passes(self, pem: bytes) -> bool:
        """True when ``pem`` loads as a private key with cryptography's full check."""
        if self._waiting >= self.max_waiting:
            raise CheckUnavailable()
        self._waiting += 1
        try:
            async with self._lock:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        verdict = await self._ask(pem)
                except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError):
                    # A dead or wedged child: the next check starts a fresh one.
                    self._kill()
                    raise CheckUnavailable() from None
                except BaseException:
                    # Cancelled mid-question: its answer must not be read as the next one's.
                    self._kill()
                    raise
        finally:
            self._waiting -= 1
        self.checks += 1
        return verdict

    async def _ask(self, pem: bytes) -> bool:
        child = self._child
        if child is None or child.returncode is not None:
            child = self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-I",
                _WORKER,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(_LENGTH.pack(len(pem)) + pem)
        await child.stdin.drain()
        answer = await child.stdout.readexactly(1)
        if answer not in (_PASSED, _FAILED):
            raise EOFError()
        return answer == _PASSED

    async def aclose(self) -> None:
        """Stop the checking child process, if one was started."""
        async with self._lock:
            child = self._kill()
            if child is not None:
                await child.wait()

    def _kill(self) -> asyncio.subprocess.Process | None:
        child, self._child = self._child, None
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        return child


def rsa_key_passes(pem: bytes) -> bool:
    """cryptography's verdict on ``pem`` with its RSA key check (slow; the child's work)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        load_pem_private_key(pem, password=None)
    except Exception:  # any refusal is a failed check; none of its text is kept
        return False
    return True


def _serve() -> None:
    """The child: length-prefixed PEMs in on stdin, one verdict byte each out on stdout."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_LENGTH.size)
        if len(head) < _LENGTH.size:
            return
        (size,) = _LENGTH.unpack(head)
        pem = stdin.read(size)
        stdout.write(_PASSED if len(pem) == size and rsa_key_passes(pem) else _FAILED)
        stdout.flush()
        del pem


if __name__ == "__main__":
    _serve()
