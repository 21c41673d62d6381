"""The pytest hooks `make mutate` runs the tests with (mutmut passes `-p mutation.plugin`).

Under mutmut (MUTANT_UNDER_TEST names a mutant, tests run from its mutants/ copy), a mutant's
tests run in the order most likely to kill it soonest, and each kill is remembered for the
next mutant of the same function. Outside mutmut the hooks do nothing.
"""

import json
import math
import os
from collections import Counter
from pathlib import Path

# Under mutmut (MUTANT_UNDER_TEST names a mutant, tests run from its mutants/ copy): the tests
# that killed a mutant, one "function<TAB>test" line each, appended as they fail.
KILLERS = Path("mutmut-killers.txt")


def _mutant_function() -> str | None:
    """The function whose mutant is under test (app.speech.x_serve__mutmut_59 → app.speech.x_serve)."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    return mutant.partition("__mutmut_")[0] if "__mutmut_" in mutant else None


def pytest_collection_modifyitems(items):
    """Under `make mutate`, a mutant's tests run in the order most likely to kill it soonest:
    first those that killed other mutants of the same function (most kills first), then the
    rest quickest first (mutmut's own timings).

    With `-x` the first failure ends the run, so a broken mutant is caught by a test that has
    caught its kind before, or a fast one, instead of after a minute of streaming tests; the
    order changes no verdict, and a survivor still runs every test.
    """
    function = _mutant_function()
    if function is None:
        return
    stats = Path("mutmut-stats.json")
    durations = json.loads(stats.read_text())["duration_by_test"] if stats.exists() else {}
    kills = Counter(
        test
        for line in (KILLERS.read_text().splitlines() if KILLERS.exists() else [])
        for killed, _, test in [line.partition("\t")]
        if killed == function
    )
    items.sort(key=lambda item: (-kills[item.nodeid], durations.get(item.nodeid, math.inf)))


def pytest_runtest_logreport(report):
    function = _mutant_function()
    if function is not None and report.failed:
        # One short append per kill: whole lines even with two mutants running at once.
        with KILLERS.open("a") as killers:
            killers.write(f"{function}\t{report.nodeid}\n")
