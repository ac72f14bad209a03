"""README.md is the short front page: the two commands, one results table, links to docs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_BYTES = 12 * 1024


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = README.read_text()
    command = "bash scripts/setup.sh && bash scripts/check.sh"
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text()


def test_readme_shows_the_run_command() -> None:
    assert "bash scripts/setup.sh && bash scripts/run_simulation.sh" in README.read_text()


def test_readme_stays_short() -> None:
    """The details live on the docs pages; the README stays a front page."""
    size = len(README.read_bytes())
    assert size <= MAX_BYTES, f"README.md is {size} bytes (> {MAX_BYTES}): move text to docs/"


def test_readme_links_resolve() -> None:
    """Every relative link of the README names a file of the repository (anchors aside)."""
    targets = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    relative = [t.split("#", 1)[0] for t in targets if not re.match(r"[a-z]+:", t)]
    assert relative, "README.md links to no docs page"
    missing = sorted(t for t in relative if t and not (ROOT / t).exists())
    assert not missing, f"README.md links to missing files: {missing}"
