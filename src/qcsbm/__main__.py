"""Entry point for `python -m qcsbm` (and `torchrun -m qcsbm`)."""

import sys

from qcsbm.cli import main

sys.exit(main())
