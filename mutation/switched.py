"""pytest run from mutants/ with one mutant switched on (mutmut's MUTANT_UNDER_TEST): the passes made outside
mutmut's own run (mutation/postgresql.py, mutation/by_hand.py) both ask it."""

import os
import subprocess
import sys

from mutation.state import MUTANTS


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
