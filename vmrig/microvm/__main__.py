"""``python -m vmrig.microvm``: the micro-VMM's command line."""

import sys

from vmrig.microvm.vmm import main

sys.exit(main())
