"""The mutation score of each mutated module, from the results mutmut keeps in ``mutants/`` (docs/testing.md).

    .venv/bin/python -m tests.mutation_score            # after `mutmut run`

Killed counts a mutant some test failed on; a timeout (the tests hung, or ran 30x their usual CPU time) counts as
detected too, as in Stryker's score: the mutant did not pass. Survived, no tests (no selected test reaches the
function), other (segfault, suspicious) and not yet run are listed apart; the score is (killed + timeout) / (all
run).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

def status(code: int | None) -> str:
    """mutmut's name for a mutant's recorded exit code ("killed", "survived", "timeout", "no tests", ...)."""
    from mutmut.stats import status_by_exit_code   # the mutation extra

    return status_by_exit_code[code]


def scores(root: Path = Path("mutants")) -> dict[str, Counter]:
    """Module -> count of each status."""
    out: dict[str, Counter] = {}
    for meta in sorted(root.rglob("*.py.meta")):
        module = meta.relative_to(root).as_posix().removesuffix(".py.meta").replace("/", ".")
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        out[module] = Counter(status(c) for c in codes)
    return out


def main() -> int:
    table = scores()
    if not table:
        print("no mutmut results in ./mutants: run `mutmut run` first", file=sys.stderr)
        return 1
    print("| module | mutants | killed | timeout | survived | no tests | other | not run | score |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for module, c in table.items():
        run = sum(c.values()) - c["not checked"]
        score = f"{(c['killed'] + c['timeout']) / run:.0%}" if run else "-"
        others = sum(c.values()) - sum(c[k] for k in ("killed", "timeout", "survived", "no tests", "not checked"))
        print(f"| {module} | {sum(c.values())} | {c['killed']} | {c['timeout']} | {c['survived']} | "
              f"{c['no tests']} | {others} | {c['not checked']} | {score} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
