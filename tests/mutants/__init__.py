"""Planted bugs the suite must catch: ``python -m tests.mutants`` (``make mutants``)."""
