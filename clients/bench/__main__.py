"""`python -m omnitalk.clients.bench ...`: the same as `omnitalk bench ...`."""

import sys

from omnitalk.clients.bench.cli import main

sys.exit(main())
