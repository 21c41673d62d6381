"""The mutation runs' scores, per money module: `python -m mutation.report` after `make mutate`.

Reads the results kept in the repository (mutation/state/, written by `mutation.state save`
from mutmut's own) and counts a result only while the function it mutated is unchanged in
the source as it is now (mutmut's hash of it). Reads the checked-in list of equivalent
mutants (mutation/equivalent.txt: one mutant name, then " # " and the one-line reason no
user or book could notice it). Writes mutation/RESULTS.md and exits 1 when a module has
mutants not checked or kills less than TARGET of its non-equivalent mutants, or an
equivalent listed there no longer exists or is killed on PostgreSQL (mutation/postgresql.txt,
which then counts it killed: the line must go) or by hand (mutation/by_hand.txt).
"""

import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from mutmut.mutation.file_mutation import mutate_file_contents
from mutmut.stats import status_by_exit_code
from mutmut.utils.format_utils import get_mutant_name

from mutation.state import MODULES, ROOT, kept_code, load

EQUIVALENT = ROOT / "mutation" / "equivalent.txt"
# Survivors of the SQLite run that the PostgreSQL tests kill (written by mutation/postgresql.py).
POSTGRES = ROOT / "mutation" / "postgresql.txt"
# Survivors of mutmut's run that the named SQLite test kills when run by plain pytest (mutation/by_hand.py
# checks each line again).
BY_HAND = ROOT / "mutation" / "by_hand.txt"
RESULTS = ROOT / "mutation" / "RESULTS.md"
TARGET = 0.90


def equivalents(path: Path = EQUIVALENT) -> dict[str, str]:
    listed = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" # ")
            listed[name.strip()] = reason.strip()
    return listed


def lines_named(path: Path, names: list[str]) -> dict[str, str] | None:
    """The lines of `path` (mutant → its note), or those of `names`; None, having said which, when a name
    given is not among them."""
    lines = equivalents(path)
    unknown = [name for name in names if name not in lines]
    if unknown:
        print(f"not in {path.name}: {', '.join(unknown)}", file=sys.stderr)
        return None
    return {name: note for name, note in lines.items() if not names or name in names}


def statuses(module: str) -> dict[str, str]:
    """Every mutant mutmut makes of `module` as it is now, with its kept result; "not checked" when it has
    none or the function it mutates changed after it was checked."""
    path = ROOT / module
    now = mutate_file_contents(module, path.read_text())
    kept = load(module)
    mutants = (get_mutant_name(Path(module), name) for name in now.mutant_names)
    return {mutant: status_by_exit_code[kept_code(kept, now.hash_by_function_name, mutant)] for mutant in mutants}


def main() -> int:
    listed, on_postgres = equivalents(EQUIVALENT), equivalents(POSTGRES)
    # Killed outside mutmut's own run: by the PostgreSQL tests, or by a test mutmut's run did not see fail.
    elsewhere = {**on_postgres, **equivalents(BY_HAND)}
    rows, failures, survivors = [], [], []
    seen = set()
    for module in MODULES:
        found = statuses(module)
        seen |= set(found)
        counts = Counter(found.values())
        # A kill outside mutmut's run (PostgreSQL's, a named test's) wins over a claim of equivalence.
        equivalent = sum(
            1 for name, status in found.items() if status == "survived" and name in listed and name not in elsewhere
        )
        killed_elsewhere = sum(1 for name, status in found.items() if status == "survived" and name in elsewhere)
        survived = counts["survived"] - equivalent - killed_elsewhere
        untested = counts["no tests"]
        unchecked = counts["not checked"]
        killed = counts["killed"] + counts["timeout"] + counts["caught by type check"] + killed_elsewhere
        considered = killed + survived + untested
        score = killed / considered if considered else None
        rows.append((module, len(found), unchecked, killed, survived, untested, equivalent, score))
        survivors += [
            f"{name} ({status})"
            for name, status in found.items()
            if status in ("survived", "no tests") and name not in listed and name not in elsewhere
        ]
        if score is None:
            failures.append(f"{module}: not mutated in this run")
        elif unchecked:
            failures.append(
                f"{module}: {unchecked} mutants not checked yet (a run stopped before them, or they changed)"
            )
        elif score < TARGET:
            failures.append(f"{module}: {score:.1%} of non-equivalent mutants killed (target {TARGET:.0%})")
    stale = sorted(name for name in {**listed, **elsewhere} if seen and name not in seen)
    lines = [
        "# Mutation testing: the money modules",
        "",
        f"`make mutate` (mutmut, on SQLite{'' if len(sys.argv) < 2 else ' and ' + sys.argv[1]}), report of "
        f"{datetime.now(timezone.utc):%Y-%m-%d}. Each module's results are those kept in mutation/state/ by the "
        "runs so far, each counted only while the function it mutated is unchanged (a changed function's mutants "
        "are not checked until the next run). A mutant is killed when a test fails on it; "
        '"equivalent" survivors are listed with their reason in mutation/equivalent.txt; survivors of the '
        "SQLite run, listed equivalents included, that the PostgreSQL tests (locks, races, the audit) kill are counted "
        "as killed and listed in mutation/postgresql.txt; so are the few that a plain pytest run of a named test kills "
        "though mutmut's run recorded them surviving (mutation/by_hand.txt, checked again by mutation/by_hand.py). "
        "What the survivors showed, and the tests written for them: mutation/FINDINGS.md.",
        "",
        "| module | mutants | not checked yet | killed | survived | no test ran | equivalent "
        "| killed of non-equivalent |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| `{m}` | {n} | {c} | {k} | {s} | {u} | {e} | {'not run' if score is None else f'{score:.1%}'}"
            f"{' of those checked' if c and score is not None else ''} |"
            for m, n, c, k, s, u, e, score in rows
        ),
        "",
        *(
            [
                "Some mutants are not checked yet (a run was stopped, or their function changed since): "
                "the scores of their modules are partial.",
                "",
            ]
            if any(row[2] for row in rows)
            else []
        ),
        f"Surviving, not (yet) known to be equivalent: {len(survivors)}.",
        "",
        *(f"- `{name}`" for name in survivors),
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[: 8 + len(rows)]))
    disproved = sorted(set(listed) & set(elsewhere))
    for problem in (
        failures
        + [f"{name}: listed but no such mutant" for name in stale]
        + [
            f"{name}: listed as equivalent but killed on PostgreSQL (mutation/postgresql.txt)"
            if name in on_postgres
            else f"{name}: listed as equivalent but killed by a named test (mutation/by_hand.txt)"
            for name in disproved
        ]
    ):
        print(problem, file=sys.stderr)
    return 1 if failures or stale or disproved else 0


if __name__ == "__main__":
    sys.exit(main())
