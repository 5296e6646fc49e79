"""``python -m ssl_mt.bench [options]``."""

import sys

from ssl_mt.bench.cli import main

sys.exit(main())
