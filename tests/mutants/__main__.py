"""``python -m tests.mutants``: runs every planted bug against the tests that own it."""

from __future__ import annotations

import sys

from tests.mutants.mutants import main

sys.exit(main())
