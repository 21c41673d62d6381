"""The mutation report counts only results that still describe the code (mutation/state.py, mutation/report.py)."""

import json

import pytest
from mutmut.mutation.file_mutation import mutate_file_contents

from mutation import listed, postgresql, report, state, switched

TINY = """
def double(n):
    return n * 2


def is_small(n):
    return n < 10
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project of one module, app/tiny.py, whose results are kept under tmp_path/state."""
    (tmp_path / "app").mkdir()
    monkeypatch.setattr(report, "ROOT", tmp_path)
    monkeypatch.setattr(state, "STATE", tmp_path / "state")
    monkeypatch.setattr(state, "MUTANTS", tmp_path / "mutants")
    monkeypatch.setattr(state, "MODULES", ("app/tiny.py",))
    return tmp_path


def run_result(source: str, code_of) -> dict:
    """mutmut's meta for app/tiny.py as `source` is: each mutant's exit code from `code_of(function)`."""
    mutated = mutate_file_contents("app/tiny.py", source)
    codes = {f"app.tiny.{name}": code_of(state.function_of(f"app.tiny.{name}")) for name in mutated.mutant_names}
    return {"hash_by_function_name": mutated.hash_by_function_name, "exit_code_by_key": codes}


def save_run(project, source: str, code_of) -> None:
    meta = project / "mutants" / "app" / "tiny.py.meta"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(run_result(source, code_of)))
    state.save()


def test_a_killed_mutant_stops_counting_once_its_function_changes(project):
    (project / "app" / "tiny.py").write_text(TINY)
    save_run(project, TINY, lambda function: 1)  # every mutant killed
    assert set(report.statuses("app/tiny.py").values()) == {"killed"}

    changed = TINY.replace("n < 10", "n <= 10")
    (project / "app" / "tiny.py").write_text(changed)
    found = report.statuses("app/tiny.py")

    assert {status for name, status in found.items() if "x_is_small" in name} == {"not checked"}
    assert {status for name, status in found.items() if "x_double" in name} == {"killed"}


def test_a_run_of_some_functions_keeps_what_earlier_runs_found_for_the_others(project):
    (project / "app" / "tiny.py").write_text(TINY)
    save_run(project, TINY, lambda function: 1 if function == "x_double" else 0)
    # A later run given only is_small's mutants: double's are left unchecked in its meta.
    save_run(project, TINY, lambda function: 1 if function == "x_is_small" else None)

    found = report.statuses("app/tiny.py")
    assert found and set(found.values()) == {"killed"}


def test_a_run_that_checked_none_of_a_modules_mutants_leaves_its_kept_results_as_they_are(project):
    (project / "app" / "tiny.py").write_text(TINY)
    save_run(project, TINY, lambda function: 1)
    kept = (project / "state" / "tiny.json").read_bytes()
    # A run given another module's names, after is_small changed: nothing of tiny's was checked.
    save_run(project, TINY.replace("n < 10", "n <= 10"), lambda function: None)
    assert (project / "state" / "tiny.json").read_bytes() == kept


def test_restore_seeds_a_fresh_mutants_directory_and_never_overwrites_one(project):
    (project / "app" / "tiny.py").write_text(TINY)
    save_run(project, TINY, lambda function: 0)
    meta = project / "mutants" / "app" / "tiny.py.meta"
    meta.write_text("newer")

    state.restore()
    assert meta.read_text() == "newer"

    (project / "mutants").rename(project / "old")
    state.restore()
    restored = json.loads(meta.read_text())
    assert set(restored["exit_code_by_key"].values()) == {0}
    assert restored["hash_by_function_name"] == run_result(TINY, lambda function: 0)["hash_by_function_name"]


def test_under_mutmut_a_mutants_tests_start_with_those_that_killed_its_function_before(tmp_path):
    """mutation/plugin.py, as mutmut loads it: earlier killers first, then quickest first; kills are appended."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_order.py").write_text(
        "def test_slow(): pass\n\ndef test_fast(): pass\n\ndef test_killer(): assert False\n"
    )
    (tmp_path / "mutmut-stats.json").write_text(
        json.dumps({"duration_by_test": {"test_order.py::test_slow": 9.0, "test_order.py::test_fast": 0.1}})
    )
    (tmp_path / "mutmut-killers.txt").write_text("app.billing.x_apply\ttest_order.py::test_killer\n")
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "mutation.plugin", "-p", "no:cacheprovider", "-v", "test_order.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root), "MUTANT_UNDER_TEST": "app.billing.x_apply__mutmut_7"},
        capture_output=True,
        text=True,
    )
    ran = [line.split(" ")[0] for line in run.stdout.splitlines() if line.startswith("test_order.py::")]
    assert ran == ["test_order.py::test_killer", "test_order.py::test_fast", "test_order.py::test_slow"]
    killers = (tmp_path / "mutmut-killers.txt").read_text().splitlines()
    assert killers == ["app.billing.x_apply\ttest_order.py::test_killer"] * 2


def test_a_listed_equivalent_that_postgresql_or_a_named_test_kills_counts_killed_and_its_line_must_go(
    project, monkeypatch, capsys
):
    (project / "app" / "tiny.py").write_text(TINY)
    save_run(project, TINY, lambda function: 0)  # every mutant survives the SQLite run
    names = sorted(report.statuses("app/tiny.py"))
    monkeypatch.setattr(report, "MODULES", ("app/tiny.py",))
    monkeypatch.setattr(report, "RESULTS", project / "RESULTS.md")
    monkeypatch.setattr(report, "EQUIVALENT", project / "equivalent.txt")
    monkeypatch.setattr(report, "POSTGRES", project / "postgresql.txt")
    monkeypatch.setattr(report, "BY_HAND", project / "by_hand.txt")
    (project / "equivalent.txt").write_text("".join(f"{name} # claimed on SQLite\n" for name in names))
    (project / "postgresql.txt").write_text(f"{names[0]} # tests/test_audit.py::test_x[postgresql]\n")
    (project / "by_hand.txt").write_text(f"{names[1]} # tests/test_tiny.py::test_x[sqlite]\n")

    assert report.main() == 1
    row = next(line for line in (project / "RESULTS.md").read_text().splitlines() if "app/tiny.py" in line)
    # mutants, not checked, killed, survived, no test ran, equivalent
    assert row.split(" | ")[1:7] == [str(len(names)), "0", "2", "0", "0", str(len(names) - 2)]
    said = capsys.readouterr().err
    assert f"{names[0]}: listed as equivalent but killed on PostgreSQL (mutation/postgresql.txt)" in said
    assert f"{names[1]}: listed as equivalent but killed by a named test (mutation/by_hand.txt)" in said
    assert "no such mutant" not in said


def test_the_postgresql_pass_runs_the_postgresql_twin_of_every_test_that_reaches_the_mutants_function(
    tmp_path, monkeypatch
):
    """A survivor's claim made on SQLite meets, on PostgreSQL, each database test that reaches its function
    (quickest first, after the fixed race and audit set); a test with no database has no twin."""
    stats = {
        "tests_by_mangled_function_name": {
            "app.tiny.x_double": [
                "tests/test_tiny.py::test_slow[sqlite]",
                "tests/test_tiny.py::test_pure",
                "tests/test_tiny.py::test_fast[sqlite-a-sqlite]",
            ]
        },
        "duration_by_test": {
            "tests/test_tiny.py::test_slow[sqlite]": 2.0,
            "tests/test_tiny.py::test_fast[sqlite-a-sqlite]": 0.1,
        },
    }
    (tmp_path / "mutmut-stats.json").write_text(json.dumps(stats))
    monkeypatch.setattr(switched, "STATS", tmp_path / "mutmut-stats.json")
    # What pytest collects on PostgreSQL: a twin it would not find is left out, not run (pytest would refuse all).
    known = {"tests/test_tiny.py::test_fast[postgresql-a-sqlite]", "tests/test_tiny.py::test_slow[postgresql]"}
    monkeypatch.setattr(postgresql, "collected", lambda: known)

    assert postgresql.tests_for("app.tiny.x_double__mutmut_3") == postgresql.TESTS + [
        "tests/test_tiny.py::test_fast[postgresql-a-sqlite]",
        "tests/test_tiny.py::test_slow[postgresql]",
    ]
    assert postgresql.tests_for("app.tiny.x_halve__mutmut_1") == postgresql.TESTS
    known.discard("tests/test_tiny.py::test_slow[postgresql]")
    assert (
        postgresql.tests_for("app.tiny.x_double__mutmut_3")[-1] == "tests/test_tiny.py::test_fast[postgresql-a-sqlite]"
    )


# mutants/ as a mutation run leaves it, in miniature: a module whose mutants the environment switches on.
SWITCHED = """
import os


def double(n):
    mutant = os.environ.get("MUTANT_UNDER_TEST")
    if mutant == "app.tiny.x_double__mutmut_1":
        return n * 3
    if mutant == "app.tiny.x_double__mutmut_2":
        return n + n
    return n * 2
"""
SWITCHED_TESTS = """
import pytest

from app.tiny import double


def test_doubles_nothing_to_nothing():
    assert double(0) == 0


@pytest.mark.parametrize("n", [2], ids=["two of them"])
def test_doubles(n):
    assert double(n) == 4
"""


def test_a_listed_equivalent_that_a_test_of_today_kills_is_named_with_that_test(project, monkeypatch, capsys):
    """mutmut never runs a survivor again for a test written after it: the listed claims are run again
    against the tests reaching their function today, and a claim a test disproves fails the pass."""
    mutants = project / "mutants"
    (mutants / "app").mkdir(parents=True)
    (mutants / "tests").mkdir()
    (mutants / "app" / "__init__.py").write_text("")
    (mutants / "app" / "tiny.py").write_text(SWITCHED)
    (mutants / "tests" / "test_tiny.py").write_text(SWITCHED_TESTS)
    reaching = ["tests/test_tiny.py::test_doubles[two of them]", "tests/test_tiny.py::test_doubles_nothing_to_nothing"]
    stats = {
        "tests_by_mangled_function_name": {"app.tiny.x_double": reaching},
        "duration_by_test": {reaching[0]: 0.2, reaching[1]: 0.1},
    }
    (mutants / "mutmut-stats.json").write_text(json.dumps(stats))
    monkeypatch.setattr(switched, "MUTANTS", mutants)
    monkeypatch.setattr(switched, "STATS", mutants / "mutmut-stats.json")
    monkeypatch.setattr(listed, "EQUIVALENT", project / "equivalent.txt")
    (project / "equivalent.txt").write_text(
        "app.tiny.x_double__mutmut_1 # a claim a later test disproves\napp.tiny.x_double__mutmut_2 # n + n is n * 2\n"
    )
    assert switched.reaching("app.tiny.x_double__mutmut_2") == reaching[::-1]  # quickest first

    assert listed.main([]) == 1
    out, err = capsys.readouterr()
    assert out == "app.tiny.x_double__mutmut_1 # tests/test_tiny.py::test_doubles[two of them]\n"  # its id whole
    assert "app.tiny.x_double__mutmut_2: survived" in err
    assert listed.main(["app.tiny.x_double__mutmut_2"]) == 0


def test_every_test_named_as_a_killer_is_one_pytest_finds():
    """A test renamed after a line of postgresql.txt or by_hand.txt named it leaves a claim that nothing checks
    any more. A name without parameters stands for all of them; a PostgreSQL id is looked for where
    TEST_DATABASE_URL makes those tests (CI), its test function always."""
    named = {
        test: mutant for path in (report.POSTGRES, report.BY_HAND) for mutant, test in report.equivalents(path).items()
    }
    files = sorted({test.partition("::")[0] for test in named})
    ids = switched.collected(report.ROOT, files)
    functions = {test_id.partition("[")[0] for test_id in ids}
    postgresql_collected = any("[postgresql" in test_id for test_id in ids)
    for test, mutant in named.items():
        whole = test in ids or any(test_id.startswith(f"{test}[") for test_id in ids)
        if "[postgresql" in test and not postgresql_collected:
            whole = test.partition("[")[0] in functions
        assert whole, f"{mutant}: its killer {test} is no test pytest finds"
