"""``python -m vmrig.microvm``: see cli.py."""

import sys

from vmrig.microvm.cli import main

sys.exit(main())
