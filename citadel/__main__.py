"""``python -m citadel``: the same command as ``citadel``."""

import sys

from citadel.cli import main

sys.exit(main())
