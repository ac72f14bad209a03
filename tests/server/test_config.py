"""Run-config validation: every key checked at start-up, errors name the key and what is allowed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from server.config import ConfigError, ServerSettings, resolve_output_dir

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def project_config() -> dict[str, object]:
    with PYPROJECT.open("rb") as stream:
        return dict(tomllib.load(stream)["tool"]["flwr"]["app"]["config"])


def test_project_defaults_are_valid() -> None:
    settings = ServerSettings.from_run_config(project_config())
    assert settings.merge_method == "robustmerge"
    assert settings.merge_mode == "paper-exact"
    assert settings.keep_ratio == 0.2
    assert settings.seen_tasks == ("banking77", "stackoverflow", "sentiment", "hwu64")
    assert settings.unseen_tasks == ("clinc150", "mcid")
    assert settings.max_update_norm is None


BAD_VALUES = [
    ("num-server-rounds", 0, ">= 1"),
    ("num-server-rounds", "five", "integer"),
    ("num-server-rounds", 2.5, "integer"),
    ("seed", True, "integer"),
    ("keep-ratio", 0.0, "(0, 1]"),
    ("keep-ratio", 1.5, "(0, 1]"),
    ("scale-quantile", 1.0, "[0, 1)"),
    ("fuse-weight", "two", "number"),
    ("fuse-weight", float("nan"), "a finite number in (-inf, inf)"),
    ("server-lr", 0.0, "(0, inf)"),
    ("merge-method", "fedprox", "one of"),
    ("merge-mode", "exact", "one of"),
    ("merge-target", "weights", "one of"),
    ("merge-device", "tpu", "one of"),
    ("resume", "yes", "true or false"),
    ("fraction-train", 1.2, "[0, 1]"),
    ("seen-tasks", "", "at least one"),
    ("seen-tasks", 3, "comma-separated"),
    ("output-dir", "", "non-empty"),
    ("round-timeout", -1.0, "(0, inf)"),
    ("min-merge-replies", 0, ">= 1"),
]


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_VALUES)
def test_bad_value_names_key_and_allowed_values(key: str, value: object, allowed: str) -> None:
    config = project_config()
    config[key] = value
    with pytest.raises(ConfigError) as caught:
        ServerSettings.from_run_config(config)
    message = str(caught.value)
    assert repr(key) in message
    assert allowed in message


def test_output_dir_relative_lands_under_root(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ROBUSTMERGE_FL_OUTPUT_ROOT", str(tmp_path))
    assert resolve_output_dir("outputs") == tmp_path / "outputs"
    assert resolve_output_dir(str(tmp_path / "abs")) == tmp_path / "abs"
    monkeypatch.delenv("ROBUSTMERGE_FL_OUTPUT_ROOT")
    assert resolve_output_dir("outputs") == Path.home() / "robustmerge-fl" / "outputs"
