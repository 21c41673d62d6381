"""Survivors of the SQLite mutation run, listed equivalents included, met by the tests PostgreSQL runs.

    TEST_DATABASE_URL=postgresql://… python -m mutation.postgresql [mutant …]

mutmut's own run picks each mutant's tests by the coverage of a run without PostgreSQL, where
the PostgreSQL tests are skipped. Here each mutant that survived it is switched on in mutants/
(mutmut's MUTANT_UNDER_TEST; `python -m mutation.generate` writes mutants/ without a run) and
the PostgreSQL side of two sets of tests runs against it: those only PostgreSQL can prove
(locks, races), and the audit's (`flask audit` and the checks of app/audit.py), since SQL that
SQLite accepts can still fail on PostgreSQL; then the PostgreSQL twin of every test mutmut's
statistics found reaching the mutant's function (mutants/mutmut-stats.json; a test that takes
no database has no twin and ran in the SQLite pass). The survivors listed as equivalent run
too: a claim made on SQLite must hold on PostgreSQL. Those killed are written to
mutation/postgresql.txt with the first test that failed; mutation/report.py counts them as
killed, and refuses an equivalent line for a mutant PostgreSQL kills.

Named mutants are checked alone and their lines in postgresql.txt replaced; the others kept.
"""

import functools
import os
import sys

from mutation import switched
from mutation.report import EQUIVALENT, MODULES, POSTGRES, ROOT, equivalents, statuses

# The tests only PostgreSQL runs: row locks, advisory locks, races between processes.
RACES = [
    "tests/test_concurrency.py",
    "tests/test_books.py::test_a_storm_of_concurrent_partial_refunds_takes_back_at_most_the_pack",
    "tests/test_books.py::test_refunds_racing_the_payment_they_reverse_are_all_applied",
    "tests/test_books.py::test_a_refund_that_arrives_while_its_payment_is_being_credited_waits_for_the_credit",
    "tests/test_notices.py::test_twenty_concurrent_debits_that_cross_the_threshold_send_one_alert",
]
# The audit on PostgreSQL: clean books pass, each planted offence is named, on the command line and the admin page.
AUDIT = [
    "tests/test_audit.py",
    "tests/test_books.py",
    "tests/test_paid_audio.py::test_the_audit_names_a_reversal_that_was_not_applied",
    "tests/test_paid_audio.py::test_the_audit_names_an_over_refund_a_stale_charge_and_frequent_breaks",
    "tests/test_admin.py::test_the_audit_page_runs_the_audits_checks",
]
# The audit's quick checks first: with -x the first failure ends a mutant's run.
TESTS = AUDIT + [test for test in RACES if test.partition("::")[0] not in AUDIT]


@functools.cache
def collected() -> frozenset[str]:
    """Every PostgreSQL test id in mutants/: a twin must be one (pytest refuses to run an id it cannot find)."""
    return switched.collected(ROOT / "mutants", ["-k", "postgresql", "tests/"])


def reaching(mutant: str) -> list[str]:
    """The PostgreSQL twins of the tests mutmut's statistics run (on SQLite) found reaching `mutant`'s
    function, quickest first: `test_x[sqlite-a]` runs as `test_x[postgresql-a]`, where that test exists."""
    twins = (test.replace("[sqlite", "[postgresql", 1) for test in switched.reaching(mutant))
    return [twin for twin in twins if twin in collected()]


def tests_for(mutant: str) -> list[str]:
    """The audit's own mutants meet its checks (no race calls into app/audit.py but to run `flask audit`,
    which the audit's tests run on every offence); every other mutant meets both sets. Then the PostgreSQL
    side of every test that reaches its function."""
    fixed = AUDIT if mutant.startswith("app.audit.") else TESTS
    return fixed + [test for test in reaching(mutant) if test.partition("::")[0] not in fixed and test not in fixed]


def killer(mutant: str) -> str | None:
    """The first PostgreSQL test that fails with `mutant` switched on; None when all pass."""
    return switched.first_failure(switched.pytest(mutant, ["-x", "-k", "postgresql", *tests_for(mutant)]))


def survivors() -> list[str]:
    """Every mutant the SQLite run left alive, listed as equivalent or not."""
    return [name for module in MODULES for name, status in statuses(module).items() if status == "survived"]


def main(names: list[str]) -> int:
    if not os.environ.get("TEST_DATABASE_URL"):
        print("set TEST_DATABASE_URL to a PostgreSQL database the tests may use", file=sys.stderr)
        return 2
    if not (ROOT / "mutants").exists():
        print("no mutants/: run `python -m mutation.generate` (or make mutate) first", file=sys.stderr)
        return 2
    checking = names or survivors()
    listed = equivalents(EQUIVALENT)
    killed = {name: test for name, test in equivalents(POSTGRES).items() if names and name not in names}
    for index, mutant in enumerate(checking, 1):
        test = killer(mutant)
        verdict = f"killed by {test}" if test else "survived"
        note = " (listed as equivalent: remove its line)" if test and mutant in listed else ""
        print(f"[{index}/{len(checking)}] {mutant}: {verdict}{note}", file=sys.stderr, flush=True)
        if test:
            killed[mutant] = test
    POSTGRES.write_text(
        "# Survivors of the SQLite run that the PostgreSQL tests kill: <mutant> # <the first test that failed>\n"
        + "".join(f"{name} # {test}\n" for name, test in sorted(killed.items()))
    )
    found = sum(name in killed for name in checking)
    print(f"{found} of {len(checking)} SQLite survivors killed on PostgreSQL", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
