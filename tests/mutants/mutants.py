"""Runs the planted bugs of ``mutants.toml``: each must make the tests that own it fail.

Every mutant is applied, one at a time, to a temporary copy of the repository's ``ssl_mt/``,
``conf/`` and ``tests/`` (and ``pyproject.toml``), whose tests then run with the copy first
on the path. A mutant whose tests still pass *survived*: the runner names it and exits 1.
An entry whose ``old`` text does not occur exactly once in its file is an error (exit 2):
the code it targets moved, and the entry must move with it.

    python -m tests.mutants                 # all of them (make mutants)
    python -m tests.mutants --list          # names only
    python -m tests.mutants -k famo -k dino # the entries whose name contains a word
    python -m tests.mutants --baseline      # first check that the owning tests pass unmutated
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
CATALOGUE = Path(__file__).with_name("mutants.toml")
COPIED = ("ssl_mt", "conf", "tests", "pyproject.toml", "setup.py")
PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider")
TIMEOUT_S = 600


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``old`` → ``new`` in ``file``, caught by ``tests``."""

    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    mutant: Mutant
    caught: bool
    seconds: float
    detail: str


def load_mutants(path: Path = CATALOGUE) -> list[Mutant]:
    """The entries of ``mutants.toml``."""
    entries = tomllib.loads(path.read_text())["mutant"]
    return [Mutant(**{**e, "tests": tuple(e["tests"])}) for e in entries]


def check_mutant(mutant: Mutant, root: Path = REPO) -> str | None:
    """Why ``mutant`` cannot be applied to the tree at ``root`` (None: it can)."""
    path = root / mutant.file
    if not path.is_file():
        return f"{mutant.file}: no such file"
    count = path.read_text().count(mutant.old)
    if count != 1:
        return f"{mutant.file}: the old text occurs {count} times, not once: {mutant.old!r}"
    if mutant.old == mutant.new:
        return "old and new are the same"
    for test in mutant.tests:
        if not (root / test.split("::")[0]).is_file():
            return f"no test file {test.split('::')[0]}"
    return None


def copy_tree(destination: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=ignore)
        elif source.is_file():
            shutil.copy2(source, destination / name)


def environment(copy: Path) -> dict[str, str]:
    """The copy first on the path, for pytest and for the apps the tests launch."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), env.get("PYTHONPATH", "")])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_isolation(copy: Path) -> None:
    """Raises unless ``import ssl_mt`` in the copy imports the copy (not the checkout)."""
    found = subprocess.run(
        [sys.executable, "-c", "import ssl_mt; print(ssl_mt.__file__)"],
        cwd=copy,
        env=environment(copy),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(copy.resolve()):
        raise RuntimeError(f"the copy imports ssl_mt from {found}, not from {copy}")


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """Exit code and output of pytest on ``tests`` in the copy."""
    try:
        result = subprocess.run(
            [sys.executable, *PYTEST, *tests],
            cwd=copy,
            env=environment(copy),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT_S} s"
    return result.returncode, result.stdout + result.stderr


def first_failure(output: str) -> str:
    """The first ``FAILED``/``ERROR`` line of pytest's summary, else the last line."""
    for line in output.splitlines():
        if re.match(r"^(FAILED|ERROR) ", line):
            return line[:200]
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def try_mutant(copy: Path, mutant: Mutant) -> Outcome:
    """Applies ``mutant`` in the copy, runs its tests, restores the file."""
    path = copy / mutant.file
    original = path.read_text()
    path.write_text(original.replace(mutant.old, mutant.new, 1))
    start = time.monotonic()
    try:
        code, output = run_tests(copy, mutant.tests)
    finally:
        path.write_text(original)
    seconds = time.monotonic() - start
    # 1: a test failed; 2: collection or import failed (the bug breaks the module), both
    # caught. 0: every test passed (survived); 5: nothing ran; -1: timed out.
    caught = code in (1, 2)
    detail = first_failure(output) if caught else f"pytest exit {code}: {first_failure(output)}"
    return Outcome(mutant, caught, seconds, detail)


def select(mutants: list[Mutant], words: list[str]) -> list[Mutant]:
    if not words:
        return mutants
    return [m for m in mutants if any(w.lower() in m.name.lower() for w in words)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.mutants", description=__doc__)
    parser.add_argument("-k", dest="words", action="append", default=[], help="name contains")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--baseline", action="store_true", help="first run the owning tests without mutants"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mutants = select(load_mutants(), args.words)
    if not mutants:
        print(f"no mutant's name contains any of {args.words}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name}  [{m.file}]  -> {' '.join(m.tests)}")
        return 0
    problems = [(m, why) for m in mutants if (why := check_mutant(m)) is not None]
    for m, why in problems:
        print(f"ERROR {m.name}: {why}", file=sys.stderr)
    if problems:
        return 2
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ssl_mt_mutants_") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        check_isolation(copy)
        if args.baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            code, output = run_tests(copy, tests)
            if code != 0:
                print(f"the owning tests fail without any mutant: {first_failure(output)}")
                return 2
            print(f"baseline: the owning tests pass ({time.monotonic() - start:.0f} s)")
        outcomes = []
        for m in mutants:
            outcome = try_mutant(copy, m)
            outcomes.append(outcome)
            status = "caught  " if outcome.caught else "SURVIVED"
            print(f"{status} {outcome.seconds:6.1f} s  {m.name}\n           {outcome.detail}")
            sys.stdout.flush()
    survived = [o.mutant.name for o in outcomes if not o.caught]
    total = time.monotonic() - start
    print(f"\n{len(outcomes) - len(survived)}/{len(outcomes)} mutants caught in {total:.0f} s")
    if survived:
        print("survived (the tests named do not catch the bug):", *survived, sep="\n  ")
        return 1
    return 0
