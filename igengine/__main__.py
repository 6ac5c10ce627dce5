"""`python -m igengine ...` is the `igengine` command (also what torchrun launches)."""

import sys

from igengine.cli import main

sys.exit(main())
