"""The decrypted secret as the clients hand it over: a value that does not show itself."""

from __future__ import annotations

import hmac
from typing import NoReturn, Self

__all__ = ["Plaintext"]


class Plaintext:
    """A decrypted secret that does not show itself.

    ``repr``, ``str`` and formatting give ``Plaintext('**********')``, pickling
    and copying raise ``TypeError``, and ``==`` compares in constant time.
    Call :meth:`reveal` where the value is needed. Used as a context manager it
    drops its reference to the value on exit (Python strings cannot be wiped,
    but nothing of Citadel's keeps the value alive after that)::

        with client.decrypt(ciphertext) as secret:
            sign(order, secret.reveal())
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value: str | None = value

    def reveal(self) -> str:
        """The secret; raises ``ValueError`` once it was cleared."""
        if self._value is None:
            raise ValueError("plaintext was cleared")
        return self._value

    def get_secret_value(self) -> str:
        """The same as :meth:`reveal`, under the name pydantic's ``SecretStr`` uses."""
        return self.reveal()

    def clear(self) -> None:
        """Drop the reference to the value; :meth:`reveal` raises from now on."""
        self._value = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    def __repr__(self) -> str:
        return "Plaintext('**********')"

    def __str__(self) -> str:
        return repr(self)

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plaintext) or self._value is None or other._value is None:
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    __hash__ = None  # type: ignore[assignment]  # a hash would be an oracle for the value

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Plaintext cannot be pickled or copied")

    def __reduce_ex__(self, protocol: object) -> NoReturn:
        raise TypeError("a Plaintext cannot be pickled or copied")
