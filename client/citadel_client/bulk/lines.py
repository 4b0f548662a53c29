"""One line of the export: find ``encrypted_data`` and replace only its value."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

FIELD: Final = "encrypted_data"

_WS: Final = " \t\n\r"
_CONTEXT_KEY: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_CONTEXT_PAIRS: Final = 16
_DECODER: Final = json.JSONDecoder()


class LineError(Exception):
    """A line that cannot be rewrapped, with its rejects code."""

    def __init__(self, code: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(code)
        self.code = code
        self.fields = fields


@dataclass(frozen=True)
class ParsedLine:
    """A line's text split around the JSON value of ``encrypted_data``."""

    text: str
    start: int  # where the value's JSON text starts in ``text``
    end: int
    value: object
    fields: dict[str, Any]  # the other fields, in order (for the rejects file)

    def replaced(self, ciphertext: str) -> str:
        """The same text with only the value replaced: spacing, numbers and escapes stay."""
        return self.text[: self.start] + _encode_str(ciphertext) + self.text[self.end :]

    def frame(self) -> tuple[str, str]:
        """Everything but the value: equal for an input line and its output line."""
        return self.text[: self.start], self.text[self.end :]


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


_PAIRS: Final = json.JSONDecoder(object_pairs_hook=list)
# A string's JSON text as json.dumps(..., ensure_ascii=False) writes it, without its
# per-call set-up (the C encoder where there is one): called twice a line.
_encode_str: Final = json.encoder.encode_basestring


def parse_line(text: str) -> ParsedLine:
    """Find ``encrypted_data`` in one top-level JSON object, keeping every character's place.

    A flat line (the usual export: no nested objects or arrays) is decoded by the
    C decoder and its value found by its text; anything else, or a line where
    that is ambiguous, is walked key by key (:func:`_walk`). Both refuse a
    duplicated key, which a plain ``json.loads`` would silently resolve.
    """
    return _flat(text) or _walk(text)


def _flat(text: str) -> ParsedLine | None:
    """The fast path, or None to let the walk decide (including every error)."""
    start = _skip_ws(text, 0)
    if text[start : start + 1] != "{":
        return None
    try:
        pairs = _PAIRS.decode(text)
    except ValueError:
        return None
    fields: dict[str, Any] = {}
    value: object = None
    found = False
    for key, item in pairs:
        if isinstance(item, list) or key in fields or (key == FIELD and found):
            return None  # nested, or a duplicated key: the walk says which
        if key == FIELD:
            value, found = item, True
        else:
            fields[key] = item
    if not found or not isinstance(value, str):
        return None
    encoded = _encode_str(value)
    at = text.find(encoded)
    if at < 0 or text.find(encoded, at + 1) >= 0:
        return None  # written with other escapes, or the same text twice
    before = text[:at].rstrip(_WS)
    if not before.endswith(":") or not before[:-1].rstrip(_WS).endswith(f'"{FIELD}"'):
        return None
    return ParsedLine(text, at, at + len(encoded), value, fields)


def _walk(text: str) -> ParsedLine:
    """The object walked with the standard library's own decoder, one key and one value
    at a time, so that the value's position is known and a duplicated key is refused."""
    try:
        i = _skip_ws(text, 0)
        if text[i : i + 1] != "{":
            raise LineError("invalid_line")
        i = _skip_ws(text, i + 1)
        fields: dict[str, Any] = {}
        span: tuple[int, int, object] | None = None
        seen: set[str] = set()
        if text[i : i + 1] == "}":
            i += 1
        else:
            while True:
                if text[i : i + 1] != '"':
                    raise LineError("invalid_line")
                key, i = _DECODER.raw_decode(text, i)
                i = _skip_ws(text, i)
                if text[i : i + 1] != ":":
                    raise LineError("invalid_line")
                start = _skip_ws(text, i + 1)
                value, i = _DECODER.raw_decode(text, start)
                if key in seen:
                    raise LineError("invalid_line")
                seen.add(key)
                if key == FIELD:
                    span = (start, i, value)
                else:
                    fields[key] = value
                i = _skip_ws(text, i)
                if text[i : i + 1] == ",":
                    i = _skip_ws(text, i + 1)
                    continue
                if text[i : i + 1] == "}":
                    i += 1
                    break
                raise LineError("invalid_line")
        if _skip_ws(text, i) != len(text):
            raise LineError("invalid_line")
    except ValueError:  # json.JSONDecodeError
        raise LineError("invalid_line") from None
    if span is None:
        raise LineError("missing_field", fields)
    return ParsedLine(text, span[0], span[1], span[2], fields)


def split_ending(raw: bytes) -> tuple[bytes, bytes]:
    """A line without its ending, and the ending (``\\r\\n``, ``\\n`` or none at EOF)."""
    if raw.endswith(b"\r\n"):
        return raw[:-2], b"\r\n"
    if raw.endswith(b"\n"):
        return raw[:-1], b"\n"
    return raw, b""


def terminated(raw: bytes) -> bytes:
    """Every output line ends with a newline: a resumed run counts complete lines by it."""
    return raw if raw.endswith(b"\n") else raw + b"\n"


def target_prefix(ciphertext: str) -> str | None:
    """The prefix that marks a ciphertext as made by the same provider and key."""
    if ciphertext.startswith("cit1:"):
        parts = ciphertext.split(":", 2)
        return f"cit1:{parts[1]}:" if len(parts) == 3 and parts[1] else None
    if ciphertext.startswith("ev:"):
        return "ev:"
    return None


ContextSpec = tuple[tuple[str, str], ...]  # (context key, the line's field it comes from)


def parse_context_spec(text: str, option: str) -> ContextSpec:
    """``KEY[=FIELD],...``: each KEY of the context takes the value of the line's FIELD
    (by default the field of the same name). Raises ``ValueError`` naming ``option``."""
    pairs: list[tuple[str, str]] = []
    for part in text.split(","):
        key, _, field = part.strip().partition("=")
        key, field = key.strip(), field.strip() or key.strip()
        if not _CONTEXT_KEY.fullmatch(key):
            raise ValueError(f"{option}: a context key is 1 to 64 of A-Za-z0-9_.-")
        if field == FIELD:
            raise ValueError(f"{option}: the context cannot come from {FIELD} itself")
        pairs.append((key, field))
    if len({key for key, _ in pairs}) != len(pairs):
        raise ValueError(f"{option}: a context key is named twice")
    if len(pairs) > MAX_CONTEXT_PAIRS:
        raise ValueError(f"{option}: a context has at most {MAX_CONTEXT_PAIRS} keys")
    return tuple(pairs)


def context_of(fields: dict[str, Any], spec: ContextSpec) -> dict[str, str]:
    """A line's context from its fields: strings as they are, integers as decimal text
    (a numeric row id); anything else, or a field the line lacks, is ``invalid_context``."""
    context = {}
    for key, field in spec:
        value = fields.get(field)
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            raise LineError("invalid_context", fields)
        context[key] = str(value)
    return context
