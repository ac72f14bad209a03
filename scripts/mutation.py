"""Mutation testing of the modules that carry a promise (docs/development.md, "Mutation testing").

    python scripts/mutation.py [--children N] [--report-only] [MUTANT_GLOB ...]

Runs ``mutmut run`` (configured in pyproject.toml's [tool.mutmut]: which files it mutates and
which tests it runs against them), then reads ``mutmut results --all true``, files each
surviving mutant that ``scripts/mutation_equivalents.txt`` lists (one mutant name per line, a
``#`` and the reason it is equivalent after it) as equivalent, and prints killed / survived /
equivalent / other (no tests, timeout, ...) per module as a Markdown table; mutants the last
run did not check are left out. Exit status 1 when a mutant survives that the
file does not explain, or when the file names a mutant that was killed (the note is stale).

``MUTANT_GLOB`` restricts the run, e.g. ``"strategies.merging.exact_sum*"``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

EQUIVALENTS = Path(__file__).with_name("mutation_equivalents.txt")
RESULT = re.compile(r"^\s*(?P<name>[\w.]+__mutmut_\d+): (?P<status>.+)$")


def read_equivalents(path: Path = EQUIVALENTS) -> dict[str, str]:
    """Mutant name -> why it is equivalent; every entry must give a reason."""
    notes: dict[str, str] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition("#")
        if not reason.strip():
            raise SystemExit(f"{path}:{number}: {name.strip()} needs a reason after '#'")
        notes[name.strip()] = reason.strip()
    return notes


def module_of(mutant: str) -> str:
    """``strategies.merging.exact_sum.x_ExactSum__add__mutmut_3`` -> its module's dotted name."""
    parts = mutant.split(".")
    module = [part for part in parts if not part.startswith(("x_", "x\u01c1"))]
    return ".".join(module[:-1]) if len(module) == len(parts) else ".".join(module)


def summarise(results: str, equivalents: dict[str, str]) -> tuple[str, list[str]]:
    """The Markdown table and the problems (unexplained survivors, stale notes)."""
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    problems = []
    for line in results.splitlines():
        match = RESULT.match(line)
        if match is None:
            continue
        name, status = match["name"], match["status"].strip()
        if status == "not checked":
            continue  # outside this run (e.g. another module's mutants)
        module = module_of(name.rsplit("__mutmut_", 1)[0])
        if status == "survived" and name in equivalents:
            status = "equivalent"
        elif status == "survived":
            problems.append(f"survived, not explained: {name} (mutmut show {name})")
        elif name in equivalents and status == "killed":
            problems.append(f"listed as equivalent but killed: {name}")
        key = status if status in ("killed", "survived", "equivalent") else "other"
        counts[module][key] += 1
    rows = ["| module | killed | survived | equivalent | other |", "|---|---|---|---|---|"]
    for module in sorted(counts):
        c = counts[module]
        rows.append(
            f"| `{module}` | {c['killed']} | {c['survived']} | {c['equivalent']} | {c['other']} |"
        )
    return "\n".join(rows), problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("globs", nargs="*", help="mutant names to run (default: all)")
    parser.add_argument("--children", type=int, default=2, help="parallel test processes")
    parser.add_argument("--report-only", action="store_true", help="summarise the last run")
    args = parser.parse_args(argv)
    if not args.report_only:
        run = ["mutmut", "run", "--max-children", str(args.children), *args.globs]
        subprocess.run(run, check=False)
    results = subprocess.run(
        ["mutmut", "results", "--all", "true"], capture_output=True, text=True, check=True
    ).stdout
    table, problems = summarise(results, read_equivalents())
    print(table)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
