"""The planted-bug list stays applicable: each entry's text is in its file exactly once.

Catches a refactor that moves the code a mutant targets (the mutant would silently test
nothing); ``make mutants`` runs the mutants themselves.
"""

from __future__ import annotations

import pytest

from tests.mutants.mutants import check_mutant, load_mutants

MUTANTS = load_mutants()


def test_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_each_mutant_applies_exactly_once(mutant):
    assert check_mutant(mutant) is None
