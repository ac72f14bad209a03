"""README.md is generated from docs/parts; it must be up to date with them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_matches_its_parts() -> None:
    spec = importlib.util.spec_from_file_location(
        "build_readme", ROOT / "scripts" / "build_readme.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "README.md").read_text() == module.expected_readme(), (
        "README.md is stale: run python scripts/build_readme.py"
    )


def test_readme_test_command_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    command = "bash scripts/setup.sh && bash scripts/check.sh"
    assert command in readme
    assert command in (ROOT / ".ci" / "run").read_text()


def test_every_run_config_key_is_documented() -> None:
    """Each key of [tool.flwr.app.config] is named (in backticks) in the README."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    readme = (ROOT / "README.md").read_text()
    missing = sorted(key for key in config if f"`{key}`" not in readme)
    assert not missing, f"run-config keys not documented in README: {missing}"
