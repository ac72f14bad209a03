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


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({}, "merge-method 'robustmerge' (merge-mode 'paper-exact')"),  # the default method
        ({"merge-method": "fedavg"}, "fedavg cannot merge clients of different ranks"),
        ({"merge-method": "svd", "robust-aggregation": "krum"}, "robust-aggregation 'krum'"),
        ({"merge-method": "svd", "dp": "server-clipping"}, "dp 'server-clipping'"),
        ({"merge-method": "svd", "merge-target": "adapter"}, "merge-target 'adapter'"),
    ],
)
def test_mixed_client_ranks_are_refused_at_start_with_the_reason(
    overrides: dict[str, object], needle: str
) -> None:
    with pytest.raises(ConfigError, match=r"run config 'client-ranks' = '4,8,16' mixes") as error:
        ServerSettings.from_run_config({"client-ranks": "4,8,16", **overrides})
    assert needle in str(error.value)


def test_mixed_client_ranks_run_with_product_space_methods() -> None:
    for overrides in (
        {"merge-method": "svd"},
        {"merge-method": "exact-mean", "robust-aggregation": "none"},
        {"merge-method": "robustmerge", "merge-mode": "paper-equation"},
    ):
        settings = ServerSettings.from_run_config({"client-ranks": "4,8,16", **overrides})
        assert settings.client_ranks == (4, 8, 16) and settings.mixes_ranks
    # One rank everywhere is no mixture: every method runs.
    for ranks in ("4,4", "8", ""):
        same = ServerSettings.from_run_config({"client-ranks": ranks, "merge-method": "fedavg"})
        assert not same.mixes_ranks


def test_secure_aggregation_refuses_mixed_client_ranks() -> None:
    from server.secure_aggregation import check_secure_aggregation

    settings = ServerSettings.from_run_config({"secure-aggregation": True, "client-ranks": "4,8"})
    with pytest.raises(ConfigError, match=r"run config 'client-ranks', which is '4,8': SecAgg\+"):
        check_secure_aggregation(settings)
    check_secure_aggregation(
        ServerSettings.from_run_config({"secure-aggregation": True, "client-ranks": "8"})
    )


def test_dares_drop_rate_reaches_the_method_from_the_run_config() -> None:
    from server.app import build_merge_strategy

    config = {**project_config(), "merge-method": "dare", "dare-drop-rate": 0.9}
    strategy = build_merge_strategy(ServerSettings.from_run_config(config))
    assert strategy.settings.method.describe()["drop_rate"] == 0.9
    # the default, and another method leaves it out (robustmerge takes no drop rate)
    default = build_merge_strategy(
        ServerSettings.from_run_config({**project_config(), "merge-method": "dare"})
    )
    assert default.settings.method.describe()["drop_rate"] == 0.5
    plain = build_merge_strategy(ServerSettings.from_run_config(project_config()))
    assert "drop_rate" not in plain.settings.hyperparameters
    with pytest.raises(ConfigError, match="dare-drop-rate"):
        ServerSettings.from_run_config({**config, "dare-drop-rate": 1.0})


def test_personalisation_without_client_evaluation_is_refused_at_start_up() -> None:
    """Issue 27: the personal copy is scored in the sites' own evaluation, so a run that asks
    no site to evaluate would personalise nothing, silently."""
    asked = {**project_config(), "personalization": "local-finetune"}
    with pytest.raises(
        ConfigError, match=r"'personalization' = 'local-finetune'.*fraction-evaluate"
    ):
        ServerSettings.from_run_config({**asked, "fraction-evaluate": 0.0})
    settings = ServerSettings.from_run_config({**asked, "fraction-evaluate": 1.0})
    assert settings.personalization == "local-finetune"
    assert ServerSettings.from_run_config(project_config()).personalization == "none"
