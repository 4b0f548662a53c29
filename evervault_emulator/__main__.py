"""``python -m evervault_emulator --port 3999``: the emulator for a person."""

from __future__ import annotations

import argparse
import threading

from evervault_emulator.server import EvervaultEmulator


def main() -> None:
    parser = argparse.ArgumentParser(description="Evervault API emulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3999)
    parser.add_argument("--app-id")
    parser.add_argument("--api-key")
    args = parser.parse_args()
    emu = EvervaultEmulator(args.host, args.port, args.app_id, args.api_key).start()
    print(
        f"Evervault emulator on {emu.url}  EVERVAULT_APP_ID={emu.app_id}  "
        f"EVERVAULT_API_KEY={emu.api_key}  EVERVAULT_API_URL={emu.url}",
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        emu.stop()


if __name__ == "__main__":
    main()
