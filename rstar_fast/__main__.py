"""`python -m rstar_fast`: the rstar-fast command."""

import sys

from rstar_fast.cli import main

sys.exit(main())
