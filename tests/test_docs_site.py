"""The docs site (mkdocs.yml + docs/*.md) is complete and in step with the code.

`mkdocs build --strict` (run by scripts/check.sh) checks links and anchors; these tests check
what it cannot: that every run-config key is documented, and that the nav and the pages agree
(strict mode only warns about pages left out of the nav, not about what an entry should hold).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN_CONFIG_PAGE = DOCS / "run-config.md"
ALGORITHM_PAGE = DOCS / "algorithm.md"


def _run_config_keys() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return sorted(pyproject["tool"]["flwr"]["app"]["config"])


def _nav_files(entry: Any) -> Iterator[str]:
    """Every page path named in a (nested) mkdocs nav entry."""
    if isinstance(entry, str):
        if not re.match(r"[a-z]+://", entry):
            yield entry
    elif isinstance(entry, list):
        for item in entry:
            yield from _nav_files(item)
    elif isinstance(entry, dict):
        for value in entry.values():
            yield from _nav_files(value)


def _mkdocs_config() -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert isinstance(config, dict)
    return config


def test_run_config_has_keys() -> None:
    """Guards the test below against reading an empty table."""
    assert len(_run_config_keys()) > 40


@pytest.mark.parametrize("key", _run_config_keys())
def test_every_run_config_key_has_a_row_on_the_run_config_page(key: str) -> None:
    """Each key of [tool.flwr.app.config] starts a row of a table on docs/run-config.md."""
    rows = [line for line in RUN_CONFIG_PAGE.read_text().splitlines() if line.startswith("| ")]
    assert any(row.startswith(f"| `{key}` |") for row in rows), (
        f"run-config key `{key}` has no row `| `{key}` | default | meaning |` in "
        f"{RUN_CONFIG_PAGE.relative_to(ROOT)}"
    )


def test_run_config_page_names_no_unknown_key() -> None:
    """A row for a key that pyproject.toml no longer has is stale."""
    keys = set(_run_config_keys())
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", RUN_CONFIG_PAGE.read_text(), re.MULTILINE)
    stale = sorted(set(documented) - keys)
    assert not stale, f"docs/run-config.md documents keys pyproject.toml lacks: {stale}"


def test_every_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    config = _mkdocs_config()
    assert config.get("docs_dir", "docs") == "docs"
    nav = list(_nav_files(config["nav"]))
    assert len(nav) == len(set(nav)), f"a page is listed twice in the nav: {nav}"
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    missing_files = sorted(set(nav) - pages)
    missing_from_nav = sorted(pages - set(nav))
    assert not missing_files, f"mkdocs.yml nav names pages that do not exist: {missing_files}"
    assert not missing_from_nav, f"pages under docs/ not in mkdocs.yml nav: {missing_from_nav}"


def test_docs_use_the_material_theme_and_strict_validation() -> None:
    config = _mkdocs_config()
    assert config["theme"]["name"] == "material"
    validation = config["validation"]
    for check in ("omitted_files", "not_found", "unrecognized_links", "anchors"):
        assert validation[check] == "warn", check  # --strict makes each warning an error


@pytest.mark.parametrize(
    "heading",
    [
        "## Step 1: prune",
        "## Step 2: complementary scale",
        "## Step 3: merge A",
        "## Step 4: merge B with cross-task normalisation",
        "## Step 5: other tensors",
        "## Round forms",
    ],
)
def test_algorithm_page_keeps_the_headings_code_cites(heading: str) -> None:
    """Code comments cite "docs/algorithm.md, step N": those headings (anchors) must stay."""
    assert heading in ALGORITHM_PAGE.read_text().splitlines()


def test_combination_table_heading_exists() -> None:
    assert "## What combines with what" in (DOCS / "strategy.md").read_text().splitlines()
