"""The mutation run's scores, per money module: `python -m mutation.report` after `mutmut run`.

Reads mutmut's own results (mutants/app/*.py.meta, via its status table) and the
checked-in list of equivalent mutants (mutation/equivalent.txt: one mutant name, then
" # " and the one-line reason no user or book could notice it). Writes
mutation/RESULTS.md and exits 1 when a module kills less than TARGET of its
non-equivalent mutants, or an equivalent listed there no longer exists.
"""

import json
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

from mutmut.stats import status_by_exit_code

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("app/billing.py", "app/payments.py", "app/keys.py", "app/audit.py", "app/speech.py", "app/catalog.py")
EQUIVALENT = ROOT / "mutation" / "equivalent.txt"
# Survivors of the SQLite run that the PostgreSQL tests kill (written by mutation/postgresql.py).
POSTGRES = ROOT / "mutation" / "postgresql.txt"
RESULTS = ROOT / "mutation" / "RESULTS.md"
TARGET = 0.90


def equivalents(path: Path = EQUIVALENT) -> dict[str, str]:
    listed = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" # ")
            listed[name.strip()] = reason.strip()
    return listed


def statuses(module: str) -> dict[str, str]:
    meta = ROOT / "mutants" / f"{module}.meta"
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: status_by_exit_code[code] for name, code in codes.items()}


def main() -> int:
    listed, on_postgres = equivalents(), equivalents(POSTGRES)
    rows, failures, survivors = [], [], []
    seen = set()
    for module in MODULES:
        found = statuses(module)
        seen |= set(found)
        counts = Counter(found.values())
        equivalent = sum(1 for name, status in found.items() if status == "survived" and name in listed)
        by_postgres = sum(1 for name, status in found.items() if status == "survived" and name in on_postgres)
        survived = counts["survived"] - equivalent - by_postgres
        untested = counts["no tests"]
        unchecked = counts["not checked"]
        killed = counts["killed"] + counts["timeout"] + counts["caught by type check"] + by_postgres
        considered = killed + survived + untested
        score = killed / considered if considered else None
        rows.append((module, len(found), unchecked, killed, survived, untested, equivalent, score))
        survivors += [
            f"{name} ({status})"
            for name, status in found.items()
            if status in ("survived", "no tests") and name not in listed and name not in on_postgres
        ]
        if score is None:
            failures.append(f"{module}: not mutated in this run")
        elif unchecked:
            failures.append(f"{module}: {unchecked} mutants not checked yet (the run was stopped)")
        elif score < TARGET:
            failures.append(f"{module}: {score:.1%} of non-equivalent mutants killed (target {TARGET:.0%})")
    stale = sorted(name for name in {**listed, **on_postgres} if seen and name not in seen)
    lines = [
        "# Mutation testing: the money modules",
        "",
        f"`make mutate` (mutmut, on SQLite{'' if len(sys.argv) < 2 else ' and ' + sys.argv[1]}), "
        f"{datetime.now(timezone.utc):%Y-%m-%d}. A mutant is killed when a test fails on it; "
        '"equivalent" survivors are listed with their reason in mutation/equivalent.txt; survivors of the '
        "SQLite run that the PostgreSQL-only tests kill are counted as killed and listed in mutation/postgresql.txt.",
        "",
        "| module | mutants | not checked yet | killed | survived | no test ran | equivalent "
        "| killed of non-equivalent |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| `{m}` | {n} | {c} | {k} | {s} | {u} | {e} | {'not run' if score is None else f'{score:.1%}'} |"
            for m, n, c, k, s, u, e, score in rows
        ),
        "",
        *(
            [
                "This run was stopped before every mutant was checked: the scores of modules with mutants "
                "not checked yet are partial.",
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
    for problem in failures + [f"{name}: listed as equivalent but no such mutant" for name in stale]:
        print(problem, file=sys.stderr)
    return 1 if failures or stale else 0


if __name__ == "__main__":
    sys.exit(main())
