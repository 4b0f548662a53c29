"""``python -m evervault_emulator --port 3999``: the emulator for a person."""

from __future__ import annotations

import argparse
import json
import os
import secrets
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


DEFAULT_STATE_DIR = Path(".citadel/evervault-emulator")


def load_identity(state_dir: Path, app_id: str | None, api_key: str | None) -> tuple[str, str]:
    """The app id and API key kept in ``state_dir`` (made once), unless given."""
    path = state_dir / "identity.json"
    if path.exists():
        kept = json.loads(path.read_text())
    else:
        kept = {
            "app_id": "app_" + secrets.token_hex(6),
            "api_key": "ev:key:1:" + secrets.token_urlsafe(24),
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(kept, f)
    return app_id or str(kept["app_id"]), api_key or str(kept["api_key"])


def write_env(state_dir: Path, emu: EvervaultEmulator) -> Path:
    """The settings Citadel needs for this emulator, as a file to source or pass to --env-file."""
    path = state_dir / "env"
    text = (
        f"EVERVAULT_APP_ID={emu.app_id}\nEVERVAULT_API_KEY={emu.api_key}\n"
        f"EVERVAULT_API_URL={emu.url}\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


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
        "so ciphertexts survive a restart (default: keys.pem in the state directory)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="where the app id, API key and private keys are kept across restarts, and the "
        "env file with Citadel's EVERVAULT_* settings is written (default: %(default)s)",
    )
    parser.add_argument(
        "--ephemeral",
        action="store_true",
        help="keep nothing: a new identity and new keys at every start",
    )
    args = parser.parse_args(argv)
    env_file = None
    if args.ephemeral:
        app_id, api_key, keys = args.app_id, args.api_key, load_keys(args.keys_file)
    else:
        args.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        app_id, api_key = load_identity(args.state_dir, args.app_id, args.api_key)
        keys = load_keys(args.keys_file or args.state_dir / "keys.pem")
    emu = EvervaultEmulator(args.host, args.port, app_id, api_key, keys=keys).start()
    print(
        f"Evervault emulator on {emu.url}  EVERVAULT_APP_ID={emu.app_id}  "
        f"EVERVAULT_API_KEY={emu.api_key}  EVERVAULT_API_URL={emu.url}",
        flush=True,
    )
    if not args.ephemeral:
        env_file = write_env(args.state_dir, emu)
        print(
            f"identity and keys kept in {args.state_dir}/ (ev: ciphertexts survive a restart); "
            f"Citadel's settings in {env_file}: `set -a; . {env_file}; set +a`",
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
