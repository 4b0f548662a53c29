"""``python -m citadel_client.bulk``: the same as ``citadel-rewrap``."""

import sys

from citadel_client.bulk.cli import main

sys.exit(main())
