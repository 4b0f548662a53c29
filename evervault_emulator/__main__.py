"""``python -m evervault_emulator --port 3999``: the emulator for a person."""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from evervault_emulator.crypto import AppKeys
from evervault_emulator.server import EvervaultEmulator

CONTROL = """\
fault injection and counters, e.g.:
  curl -X POST {url}_emulator/faults -d '{{"path": "decrypt", "status": 500, "count": 3}}'
  curl -X POST {url}_emulator/faults -d '{{"path": "decrypt", "status": 429, "retry_after": 7}}'
  curl -X POST {url}_emulator/faults -d '{{"path": "decrypt", "latency_ms": 50}}'
  curl -X POST {url}_emulator/faults -d '{{"path": "cages/key", "drop": true, "count": 1}}'
  curl -X DELETE {url}_emulator/faults
  curl {url}_emulator/stats
  curl -X POST {url}_emulator/reset
  curl {url}_emulator          (app id, public keys, faults, counters)"""


def load_keys(path: Path | None) -> AppKeys:
    """The app's keys from ``path``, or new ones (written to ``path`` if given)."""
    if path is None:
        return AppKeys()
    if path.exists():
        return AppKeys.from_pem(path.read_bytes())
    keys = AppKeys()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(keys.to_pem())
    return keys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m evervault_emulator",
        description="Evervault API emulator",
        epilog=CONTROL.format(url="http://127.0.0.1:3999/"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3999, help="0 picks a free port")
    parser.add_argument("--app-id", help="default: a random app_...")
    parser.add_argument("--api-key", help="default: a random ev:key:1:...")
    parser.add_argument(
        "--keys-file",
        type=Path,
        help="PEM file with the app's two private keys: read if it exists, else created, "
        "so ciphertexts survive a restart",
    )
    args = parser.parse_args(argv)
    emu = EvervaultEmulator(
        args.host, args.port, args.app_id, args.api_key, keys=load_keys(args.keys_file)
    ).start()
    print(
        f"Evervault emulator on {emu.url}  EVERVAULT_APP_ID={emu.app_id}  "
        f"EVERVAULT_API_KEY={emu.api_key}  EVERVAULT_API_URL={emu.url}",
        flush=True,
    )
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    emu.stop()


if __name__ == "__main__":
    main()
