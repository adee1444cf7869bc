"""``python -m vmrig.microvm``: see cli.py."""

import sys

from recording.nopandas import block_pandas
from vmrig.microvm.cli import main

block_pandas()  # the VMM writes its workload table, never analyses: 30 s less in a TCG L1
sys.exit(main())
