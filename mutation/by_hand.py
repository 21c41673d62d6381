"""Check mutation/by_hand.txt again: `python -m mutation.by_hand [mutant …]`.

Each line of mutation/by_hand.txt names a mutant that mutmut's own run recorded as surviving and
the SQLite test that kills it when plain pytest runs that test from mutants/ with the mutant
switched on (mutmut's MUTANT_UNDER_TEST; `python -m mutation.generate` writes mutants/ without
a run). mutation/report.py counts those lines as killed, so this re-runs every one (or those
named) and exits 1 when a named test no longer fails: the line must then go.

Why such lines exist: a kept result stands until its function changes, not when a test that
kills it is added (a run re-checks only what it is named); and mutmut runs a mutant's tests in
a child forked from its own long-lived test process, where a few mutants that the same tests,
in the same order, kill in a fresh pytest process were recorded as surviving (mutation/FINDINGS.md,
2026-12-04, night).
"""

import sys

from mutation import switched
from mutation.report import BY_HAND, ROOT, lines_named


def kills(mutant: str, test: str) -> bool:
    """Whether `test` fails with `mutant` switched on (a usage or collection error is no kill)."""
    return switched.pytest(mutant, [test]).returncode == 1


def main(names: list[str]) -> int:
    if not (ROOT / "mutants").exists():
        print("no mutants/: run `python -m mutation.generate` first", file=sys.stderr)
        return 2
    lines = lines_named(BY_HAND, names)
    if lines is None:
        return 2
    wrong = []
    for mutant, test in lines.items():
        killed = kills(mutant, test)
        print(f"{mutant}: {'killed' if killed else 'SURVIVES'} by {test}", file=sys.stderr, flush=True)
        if not killed:
            wrong.append(mutant)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
