"""Write mutants/ as `mutmut run` would, and run nothing: `python -m mutation.generate`.

`mutmut run` writes mutants/ (a copy of the project with every mutant of the money modules
behind mutmut's switch) and then runs the whole suite for its statistics before the first
mutant: most of an hour here. The PostgreSQL pass (mutation/postgresql.py) and `mutmut show`
need only the copy. Kept results are seeded first (`mutation.state restore`), so a later
`make mutate` re-checks only what changed.
"""

import os
import sys

from mutmut.__main__ import create_mutants
from mutmut.mutation.trampoline import set_mutant_under_test
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir

from mutation.state import ROOT, restore


def main() -> int:
    os.chdir(ROOT)
    restore()
    set_mutant_under_test("mutant_generation")
    copy_src_dir()
    copy_also_copy_files()
    stats = create_mutants(1)
    print(f"mutants/ written: {stats.mutated} files mutated, {stats.unmodified} unchanged", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
