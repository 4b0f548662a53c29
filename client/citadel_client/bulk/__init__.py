"""``citadel-rewrap``: rewrap every ciphertext of a JSON-lines export through a running Citadel.

Part of the client distribution (``pip install ./client`` runs it, with httpx only);
the server's ``citadel rewrap`` is the same command (:func:`add_parser`).

Each input line is a JSON object with an ``encrypted_data`` string and any
other fields (a row id, say). The same lines come out in the same order, each
with ``encrypted_data`` replaced by ``POST /rewrap``'s answer and every other
byte of the line kept as it was. The operator's runbook is docs/bulk-rewrap.md;
what the code relies on (the modules: ``lines`` one line, ``run`` the calls in
order, ``files`` the partial output and ``--resume``, ``cli`` the command line):

* Batches: lines that need a call travel ``--batch-size`` to a request
  (``{"batch": [...]}``); a batch refused whole for one line's data (413, 422)
  is sent again line by line, so only that line is rejected.
* Bounded memory and concurrency: the input is read in small pieces and at
  most ``(--concurrency + 1) * --batch-size`` lines are held (read, in flight
  or finished but waiting for an earlier line), with at most ``--concurrency``
  requests in flight.
* Contexts: ``--context-from`` and ``--new-context-from`` take each line's
  encryption context (and the new one to bind it to) from its own fields.
* Lines already under the active key are passed through without a call. The
  target prefix comes from ``--skip-prefix`` or from the first answer; until
  that answer has arrived, calls are made one at a time, so a rerun over
  already rewrapped data makes one call, not a window of them. With
  ``--new-context-from`` no line is passed through: each needs its binding.
* A line that fails for good (not JSON, no ``encrypted_data``, an invalid or
  retired ciphertext) is copied unchanged, recorded in the rejects file and
  makes the exit status 1. Anything that is not the line's fault (connection
  failure, 503 or 429 past the client's deadline, a refused API key) aborts
  the run with status 2.
* With ``--output FILE`` the lines go to ``FILE.partial`` in input order, and
  only a finished run renames it to ``FILE``. After an abort or a kill,
  ``--resume`` keeps the partial file's complete lines (checked against the
  input) and goes on after them, so only what is left is sent to Citadel.

Nothing secret is ever printed: the API key is read from a file or the
environment, and no plaintext ever reaches this process.
"""

from citadel_client.bulk.cli import API_KEY_ENV, add_parser, build_parser, execute, main
from citadel_client.bulk.files import UsageError, resume_from
from citadel_client.bulk.lines import FIELD, LineError, ParsedLine, parse_line, target_prefix
from citadel_client.bulk.run import (
    DEFAULT_URL,
    EXIT_ABORTED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REJECTS,
    Counts,
    Outcome,
    Rewrapper,
    Sink,
)

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_URL",
    "EXIT_ABORTED",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_REJECTS",
    "FIELD",
    "Counts",
    "LineError",
    "Outcome",
    "ParsedLine",
    "Rewrapper",
    "Sink",
    "UsageError",
    "add_parser",
    "build_parser",
    "execute",
    "main",
    "parse_line",
    "resume_from",
    "target_prefix",
]
