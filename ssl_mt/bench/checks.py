"""Rows of checks under one time budget, and their table: what ``gpu_check`` runs them with.

A :class:`Check` is a name, a time budget and a function that gets the seconds it may take
and returns its figures (one line), or raises :class:`CheckFailed` (or anything else) with
the reason. :func:`run_checks` runs every check, whatever the ones before did, each within
its budget and all of them within the total; :func:`format_checks` prints the table.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# A check given less than this is not started: it could not finish.
MIN_TIMEOUT_S = 5.0
REASON_CHARS = 200


class CheckFailed(Exception):
    """A check failed; the message is the one-line reason shown in the table, ``log`` the
    output of the command that failed, if any."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        super().__init__(message)
        self.log = log


@dataclass(frozen=True)
class Check:
    """One row to run.

    Attributes:
        name: The row's name in the table.
        what: What it runs, in a few words.
        budget_s: The most seconds it may take; 0: it runs no command (it reads what the
            others wrote) and runs whatever is left of the total.
        run: Called with the seconds it may take (its budget, or less when the total
            budget is nearly spent); returns the figures, raises with the reason.
    """

    name: str
    what: str
    budget_s: float
    run: Callable[[float], str]


@dataclass
class CheckResult:
    """One row of the table: ``reason`` is set when the check failed."""

    name: str
    what: str
    ok: bool
    seconds: float
    budget_s: float
    figures: str = ""
    reason: str = ""
    log: Path | None = None


def one_line(error: BaseException) -> str:
    """The error as one line: its type unless it is a :class:`CheckFailed`, then its message
    (the last line of a multi-line one), cut to :data:`REASON_CHARS` characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    if not isinstance(error, CheckFailed):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 1] + "…"


def run_checks(
    checks: Sequence[Check],
    total_s: float,
    clock: Callable[[], float] = time.monotonic,
    progress: Callable[[str], None] | None = None,
) -> list[CheckResult]:
    """Runs every check in order, each within ``min(its budget, what is left of total_s)``.

    A failing check (any exception but ``KeyboardInterrupt``) is recorded and the next one
    runs; a check with a budget left less than :data:`MIN_TIMEOUT_S` seconds fails without
    running.
    """
    deadline = clock() + total_s
    results = []
    for check in checks:
        timeout = min(check.budget_s, deadline - clock())
        start = clock()
        result = CheckResult(check.name, check.what, True, 0.0, check.budget_s)
        if progress is not None:
            progress(f"[{check.name}] {check.what} (budget {check.budget_s:.0f} s)")
        try:
            if check.budget_s > 0 and timeout < MIN_TIMEOUT_S:
                raise CheckFailed(f"not run: the total budget of {total_s:.0f} s is spent")
            result.figures = check.run(timeout)
        except Exception as error:  # a failing row must not stop the others
            result.ok = False
            result.reason = one_line(error)
            result.log = getattr(error, "log", None)
        result.seconds = clock() - start
        if progress is not None:
            status = "ok" if result.ok else f"FAILED: {result.reason}"
            progress(f"[{check.name}] {status} ({result.seconds:.0f} s)")
        results.append(result)
    return results


def exit_code(results: Sequence[CheckResult]) -> int:
    """0 when every check passed, else 1."""
    return 0 if all(r.ok for r in results) else 1


def format_checks(results: Sequence[CheckResult], title: str = "") -> str:
    """The results as a text table: row, what, status, time / budget, figures (or reason)."""
    header = ("row", "what", "status", "time", "figures / reason")
    lines = [
        (
            r.name,
            r.what,
            "ok" if r.ok else "FAILED",
            f"{r.seconds:.0f}/{r.budget_s:.0f} s" if r.budget_s > 0 else f"{r.seconds:.0f} s",
            r.figures if r.ok else r.reason,
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header) - 1)]

    def render(row: Sequence[str]) -> str:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        return "  ".join([*cells, row[-1]]).rstrip()

    rule = "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1])
    failed = sum(not r.ok for r in results)
    verdict = f"{len(results) - failed}/{len(results)} rows ok" + (
        f", {failed} FAILED" if failed else ""
    )
    table = [render(header), rule, *(render(row) for row in lines), "", verdict]
    return "\n".join(([title, ""] if title else []) + table)


def log_tails(results: Sequence[CheckResult], lines: int = 20) -> str:
    """The last ``lines`` lines of each failed check's command output."""
    parts = []
    for r in results:
        if r.ok or r.log is None or not r.log.is_file():
            continue
        tail = r.log.read_text(errors="replace").splitlines()[-lines:]
        parts.append("\n".join([f"--- {r.name}: last lines of {r.log}", *tail]))
    return "\n\n".join(parts)


def last_error_line(text: str) -> str:
    """The line of a command's output that says why it failed: the last one naming an
    error, else the last non-empty one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.lower().startswith("error") or "Error" in line or "Exception" in line:
            return line
    return lines[-1] if lines else "no output"


def run_command(
    argv: Sequence[str],
    timeout_s: float,
    log: Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Runs ``argv`` with its output (stdout and stderr) in ``log``, killed with all its
    processes (data workers, compile workers) after ``timeout_s`` seconds.

    Raises:
        CheckFailed: It timed out or exited non-zero (with its output's error line).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # its own process group: killed as a whole
        )
        try:
            rc = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            raise CheckFailed(f"timed out after {timeout_s:.0f} s", log) from None
        except BaseException:
            _kill_group(process)
            raise
    if rc != 0:
        reason = last_error_line(log.read_text(errors="replace"))
        raise CheckFailed(f"exit {rc}: {reason}", log)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
