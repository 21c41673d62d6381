"""Survivors of the SQLite mutation run, met by the tests only PostgreSQL can prove (locks, races).

    TEST_DATABASE_URL=postgresql://… python -m mutation.postgresql

mutmut's own run picks each mutant's tests by the coverage of a run without PostgreSQL, where
those tests are skipped. Here each mutant that survived it (and is not listed as equivalent)
is switched on in mutants/ (mutmut's MUTANT_UNDER_TEST) and the PostgreSQL side of the money
tests runs against it. Those it kills are written to mutation/postgresql.txt with the first
test that failed; mutation/report.py counts them as killed.
"""

import os
import re
import subprocess
import sys

from mutation.report import EQUIVALENT, MODULES, POSTGRES, ROOT, equivalents, statuses

# The tests only PostgreSQL runs: row locks, advisory locks, races between processes.
TESTS = [
    "tests/test_concurrency.py",
    "tests/test_books.py::test_a_storm_of_concurrent_partial_refunds_takes_back_at_most_the_pack",
    "tests/test_books.py::test_refunds_racing_the_payment_they_reverse_are_all_applied",
    "tests/test_books.py::test_a_refund_that_arrives_while_its_payment_is_being_credited_waits_for_the_credit",
    "tests/test_notices.py::test_twenty_concurrent_debits_that_cross_the_threshold_send_one_alert",
]
FAILED = re.compile(r"^FAILED (\S+)", re.M)


def killer(mutant: str) -> str | None:
    """The first PostgreSQL test that fails with `mutant` switched on; None when all pass."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:randomly", "-k", "postgresql"]
        + TESTS,
        cwd=ROOT / "mutants",
        env={**os.environ, "MUTANT_UNDER_TEST": mutant},
        capture_output=True,
        text=True,
    )
    if run.returncode == 0:
        return None
    found = FAILED.search(run.stdout)
    return found.group(1) if found else f"pytest exited {run.returncode}"


def main() -> int:
    if not os.environ.get("TEST_DATABASE_URL"):
        print("set TEST_DATABASE_URL to a PostgreSQL database the tests may use", file=sys.stderr)
        return 2
    listed = equivalents(EQUIVALENT)
    survivors = [
        name
        for module in MODULES
        for name, status in statuses(module).items()
        if status == "survived" and name not in listed
    ]
    killed = {}
    for index, mutant in enumerate(survivors, 1):
        test = killer(mutant)
        print(f"[{index}/{len(survivors)}] {mutant}: {'killed by ' + test if test else 'survived'}", file=sys.stderr)
        if test:
            killed[mutant] = test
    POSTGRES.write_text(
        "# Survivors of the SQLite run that the PostgreSQL tests kill: <mutant> # <the first test that failed>\n"
        + "".join(f"{name} # {test}\n" for name, test in killed.items())
    )
    print(f"{len(killed)} of {len(survivors)} SQLite survivors killed on PostgreSQL", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
