"""pytest run from mutants/ with one mutant switched on (mutmut's MUTANT_UNDER_TEST), and the tests that reach a
mutant's function by mutmut's statistics: for the passes made outside mutmut's own run (mutation/postgresql.py,
mutation/by_hand.py, mutation/listed.py)."""

import functools
import json
import os
import re
import subprocess
import sys

from mutmut.utils.format_utils import mangled_name_from_mutant_name

from mutation.state import MUTANTS

STATS = MUTANTS / "mutmut-stats.json"
# pytest's summary line: "FAILED <test id> - <message>"; a test id may hold spaces ("[sqlite-turn off]").
FAILED = re.compile(r"^FAILED (.+?)(?: - .*)?$", re.M)


@functools.cache
def _statistics(path) -> dict:
    """mutmut's statistics (megabytes of JSON), read once for the whole pass, not once a mutant."""
    return json.loads(path.read_text())


def reaching(mutant: str) -> list[str]:
    """The tests mutmut's statistics (its last run, on SQLite) found reaching `mutant`'s function, quickest
    first; none without statistics."""
    if not STATS.exists():
        return []
    stats = _statistics(STATS)
    tests = stats["tests_by_mangled_function_name"].get(mangled_name_from_mutant_name(mutant), [])
    durations = stats["duration_by_test"]
    return sorted(tests, key=lambda test: durations.get(test, 0.0))


def first_failure(run: subprocess.CompletedProcess) -> str | None:
    """The first test a run of `pytest` names as failed; None when it passed."""
    if run.returncode == 0:
        return None
    found = FAILED.search(run.stdout)
    return found.group(1) if found else f"pytest exited {run.returncode}"


def collected(directory, arguments: list[str]) -> frozenset[str]:
    """Every test id `pytest --collect-only arguments` finds, run in `directory`: pytest refuses to run an id
    it cannot find, and a name in a list that no test answers to checks nothing."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", *arguments],
        cwd=directory,
        capture_output=True,
        text=True,
    )
    return frozenset(line for line in run.stdout.splitlines() if "::" in line)


def pytest(mutant: str, arguments: list[str]) -> subprocess.CompletedProcess:
    """pytest `arguments` (quiet, no cache, in file order) with `mutant` switched on. Exit 0: every test
    passed; 1: one failed. Any other exit (a usage or collection error, an interrupt) taught nothing about
    the mutant: RuntimeError with the end of pytest's output."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *arguments],
        cwd=MUTANTS,
        env={**os.environ, "MUTANT_UNDER_TEST": mutant},
        capture_output=True,
        text=True,
    )
    if run.returncode not in (0, 1):
        raise RuntimeError(f"pytest exited {run.returncode} for {mutant}:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    return run
