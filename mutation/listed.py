"""Run every listed equivalent again, against the tests of today: `python -m mutation.listed [mutant …]`.

mutmut keeps a survivor's result until its function changes; a test written later that kills it is never
run against it unless the mutant is named again. A claim of equivalence then rests on the tests of its
day (four lines of read_order did: mutation/FINDINGS.md, 2026-12-05). This switches each mutant listed in
mutation/equivalent.txt on (or those named) in mutants/ and runs the SQLite tests that mutmut's statistics
(mutants/mutmut-stats.json, written by the last run) found reaching its function, quickest first, stopping
at the first failure. A mutant killed so is printed with its test, in by_hand.txt's form; exit 1 then: its
line must go from equivalent.txt, and the kill be kept in by_hand.txt (mutation/by_hand.py checks it again).
"""

import sys

from mutation import switched
from mutation.report import EQUIVALENT, lines_named


def killer(mutant: str) -> str | None:
    """The first test of today that fails with `mutant` switched on; None when all pass (or none reaches it)."""
    tests = switched.reaching(mutant)
    return switched.first_failure(switched.pytest(mutant, ["-x", *tests])) if tests else None


def main(names: list[str]) -> int:
    if not switched.STATS.exists():
        print("no mutants/mutmut-stats.json: run mutmut (it writes it) first", file=sys.stderr)
        return 2
    listed = lines_named(EQUIVALENT, names)
    if listed is None:
        return 2
    checking = list(listed)
    killed = 0
    for index, mutant in enumerate(checking, 1):
        test = killer(mutant)
        print(f"[{index}/{len(checking)}] {mutant}: {'killed by ' + test if test else 'survived'}", file=sys.stderr)
        if test:
            killed += 1
            print(f"{mutant} # {test}", flush=True)
    print(f"{killed} of {len(checking)} listed equivalents killed by today's tests", file=sys.stderr)
    return 1 if killed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
