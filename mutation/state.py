"""The mutation run's results, kept in the repository between runs: `python -m mutation.state save|restore`.

mutmut keeps each mutant's result in mutants/app/<module>.py.meta beside a hash of the
function it mutates, and on its next run re-checks only the mutants of functions whose
hash changed or that were never checked. mutants/ itself is a scratch copy of the project
that is not kept, so without this every run on a fresh checkout starts from nothing: a
full run of the money modules takes hours here.

    save     merge mutants/'s results into mutation/state/<module>.json (after a run,
             whole or stopped: mutmut writes each result as it comes)
    restore  seed a fresh mutants/ with them (before a run); does nothing when mutants/
             already exists, whose results are at least as new

A result only counts (mutation/report.py) while its function's hash is that of the
source as it is now. mutmut does not track the tests: a result stays valid when tests are
added, not when a killing test is removed; `rm -rf mutation/state` and a full run start
afresh.
"""

import json
import sys
import tomllib
from pathlib import Path

from mutmut.utils.format_utils import mangled_name_from_mutant_name

ROOT = Path(__file__).resolve().parent.parent
STATE = ROOT / "mutation" / "state"
MUTANTS = ROOT / "mutants"
# The money modules, as mutmut is told to mutate them (one list, in pyproject.toml).
MODULES = tuple(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"])


def function_of(mutant: str) -> str:
    """The mangled function a mutant belongs to, as mutmut's hashes name it: app.keys.x_touch__mutmut_6 → x_touch."""
    return mangled_name_from_mutant_name(mutant).rpartition(".")[2]


def kept_path(module: str) -> Path:
    return STATE / f"{Path(module).stem}.json"


def load(module: str) -> dict:
    """The kept results of `module`: its function hashes and each mutant's exit code (None: not checked)."""
    path = kept_path(module)
    if not path.exists():
        return {"hash_by_function_name": {}, "exit_code_by_key": {}}
    return json.loads(path.read_text())


def kept_code(kept: dict, hashes: dict[str, str], mutant: str) -> int | None:
    """The kept exit code of `mutant` while its function's hash is still the one in `hashes`; None otherwise."""
    function = function_of(mutant)
    if kept["hash_by_function_name"].get(function) != hashes.get(function):
        return None
    return kept["exit_code_by_key"].get(mutant)


def merge(kept: dict, run: dict) -> dict:
    """The run's results over the kept ones; a kept result stays where the run left its mutant unchecked
    and the function is unchanged (a run given names re-checks only those)."""
    hashes = run["hash_by_function_name"]
    codes = {}
    for mutant, code in run["exit_code_by_key"].items():
        codes[mutant] = kept_code(kept, hashes, mutant) if code is None else code
    return {"hash_by_function_name": dict(sorted(hashes.items())), "exit_code_by_key": dict(sorted(codes.items()))}


def found_anything(kept: dict, merged: dict) -> bool:
    """Whether the run behind `merged` checked a mutant, giving a result `kept` does not hold."""
    known = kept["exit_code_by_key"]
    return any(code is not None and known.get(mutant) != code for mutant, code in merged["exit_code_by_key"].items())


def save() -> int:
    STATE.mkdir(exist_ok=True)
    for module in MODULES:
        meta = MUTANTS / f"{module}.meta"
        if not meta.exists():
            continue
        kept = load(module)
        merged = merge(kept, json.loads(meta.read_text()))
        if not found_anything(kept, merged):
            # A run given other modules' names: what is kept here stays, for whoever re-checks it.
            continue
        kept_path(module).write_text(json.dumps(merged, indent=1) + "\n")
        checked = sum(code is not None for code in merged["exit_code_by_key"].values())
        print(f"{module}: {checked} of {len(merged['exit_code_by_key'])} mutants checked, kept in {kept_path(module)}")
    return 0


def restore() -> int:
    if MUTANTS.exists():
        print("mutants/ exists: its results are at least as new as the kept ones; nothing restored")
        return 0
    for module in MODULES:
        kept = load(module)
        if not kept["exit_code_by_key"]:
            continue
        meta = MUTANTS / f"{module}.meta"
        meta.parent.mkdir(parents=True, exist_ok=True)
        # mutmut's own layout; it re-checks the mutants of functions whose hash no longer matches.
        meta.write_text(json.dumps({**kept, "durations_by_key": {}, "estimated_durations_by_key": {}}))
    return 0


if __name__ == "__main__":
    commands = {"save": save, "restore": restore}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print("usage: python -m mutation.state save|restore", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]]())
