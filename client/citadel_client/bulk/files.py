"""The output files: a ``.partial`` file renamed when done, and ``--resume`` after it."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from citadel_client.bulk.lines import LineError, parse_line, split_ending, terminated


class UsageError(Exception):
    """A problem with the command line or the files: exit 2 with this message."""


def _complete_lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        for raw in f:
            if raw.endswith(b"\n"):
                yield raw


def _truncate_to_complete_lines(path: Path) -> int:
    """Cut a line torn by a kill off the end; returns the number of complete lines."""
    count = size = 0
    for raw in _complete_lines(path):
        count += 1
        size += len(raw)
    with path.open("r+b") as f:
        f.truncate(size)
    return count


def _same_record(input_raw: bytes, output_raw: bytes) -> bool:
    """Whether an output line is the input line, rewrapped or not."""
    if terminated(input_raw) == output_raw:
        return True
    (in_body, in_end), (out_body, out_end) = split_ending(input_raw), split_ending(output_raw)
    if (in_end or b"\n") != out_end:
        return False
    try:
        before, after = parse_line(in_body.decode()), parse_line(out_body.decode())
    except (LineError, UnicodeDecodeError):
        return False
    return before.frame() == after.frame() and isinstance(after.value, str)


def resume_from(partial: Path, rejects_partial: Path, source: IO[bytes]) -> tuple[int, int]:
    """Keep an interrupted run's output; returns (lines kept, rejects among them).

    The input's first lines are read and checked against the kept ones, so the
    run goes on at the right line, and a partial file from another input is
    refused rather than spliced in.
    """
    kept = _truncate_to_complete_lines(partial)
    for number, output_raw in enumerate(_complete_lines(partial), 1):
        input_raw = source.readline()
        if not input_raw or not _same_record(input_raw, output_raw):
            raise UsageError(
                f"{partial.name} does not match the input at line {number}: "
                "resume with the input of the interrupted run, or delete it to start again"
            )
    records: list[bytes] = []
    if rejects_partial.exists():
        for raw in _complete_lines(rejects_partial):
            with contextlib.suppress(ValueError, TypeError, KeyError):
                if int(json.loads(raw)["line"]) <= kept:
                    records.append(raw)
    rejects_partial.write_bytes(b"".join(records))
    return kept, len(records)


def replace_with(partial: Path, final: Path, f: IO[bytes]) -> None:
    """Make ``partial`` the final output: flushed, synced, then renamed over ``final``."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(partial, final)


def partial_path(path: Path) -> Path:
    """Where an unfinished run writes its output (``--resume`` goes on from it)."""
    return path.with_name(path.name + ".partial")
