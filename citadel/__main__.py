import sys

from citadel.cli import main

sys.exit(main())
