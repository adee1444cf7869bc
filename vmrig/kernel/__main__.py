"""``python -m vmrig.kernel``: see cli.py."""

import sys

from vmrig.kernel.cli import main

sys.exit(main())
