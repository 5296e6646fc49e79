"""Fixtures of the reliability tests; the helpers are in ``reliability_helpers.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # reliability_helpers and reliability_probes (also subprocesses)
    sys.path.insert(0, str(HERE))


@pytest.fixture
def reaper():
    """A list to put launched processes in; those still running at teardown are killed."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(30)
