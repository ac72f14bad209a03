"""The library's defaults are the run-config schema's (issue 24, item 2): a library user who
builds ``FedRobustMerge()`` gets the federation an app user gets from pyproject.toml."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from server.app import build_merge_strategy
from server.config import ServerSettings
from strategies.fed_robustmerge import FedRobustMerge
from strategies.merging.dare import Dare
from strategies.merging.robustmerge import RobustMerge
from strategies.merging.rounds import merge_round
from strategies.robust import RobustSettings
from tests.server.test_config import project_config
from workload.config import SCHEMA, schema_default

# FedRobustMerge's parameters that are run-config keys, and those keys.
STRATEGY_KEYS = {
    "fraction_train": "fraction-train",
    "fraction_evaluate": "fraction-evaluate",
    "min_train_nodes": "min-train-nodes",
    "min_evaluate_nodes": "min-evaluate-nodes",
    "merge_method": "merge-method",
    "mode": "merge-mode",
    "keep_ratio": "keep-ratio",
    "scale_quantile": "scale-quantile",
    "fuse_weight": "fuse-weight",
    "merge_target": "merge-target",
    "server_lr": "server-lr",
    "weight_by_examples": "weight-by-examples",
    "min_merge_replies": "min-merge-replies",
    "seed": "seed",
    "uplink": "uplink",
    "personalization": "personalization",
    "buffer_replies": "buffer-replies",
}
# Parameters with no run-config key of their own (Flower's record keys and hooks, the library's
# own limits) or whose key is read into another form (merge-device "auto" -> None, max-update-
# norm 0 -> None, the robust-* keys -> RobustSettings, dare-drop-rate -> merge_options; the app
# puts spill_dir under output-dir).
NOT_SCHEMA_KEYS = {
    "self",
    "min_available_nodes",
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
    "merge_options",
    "device",
    "max_update_norm",
    "max_num_examples",
    "diagnostics_modules",
    "robust",
    "spill_dir",
}
ROBUST_KEYS = {
    "aggregation": "robust-aggregation",
    "norm_factor": "robust-norm-factor",
    "clip": "robust-clip",
    "history": "robust-history",
    "krum_malicious": "robust-krum-malicious",
    "krum_select": "robust-krum-select",
    "trim_fraction": "robust-trim-fraction",
    "pool": "robust-pool",
}


def _same(value: object, key: str) -> bool:
    expected = SCHEMA[key].default
    return value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("parameter", "key"), STRATEGY_KEYS.items())
def test_fed_robustmerge_defaults_are_the_schemas(parameter: str, key: str) -> None:
    default = inspect.signature(FedRobustMerge.__init__).parameters[parameter].default
    assert _same(default, key), f"{parameter}={default!r}, schema {key}={SCHEMA[key].default!r}"


def test_every_strategy_parameter_is_accounted_for() -> None:
    """A new parameter must either take the schema's default or say why it has none."""
    parameters = set(inspect.signature(FedRobustMerge.__init__).parameters)
    assert parameters == set(STRATEGY_KEYS) | NOT_SCHEMA_KEYS


def test_the_keys_read_into_another_form_mean_the_library_defaults() -> None:
    parameters = inspect.signature(FedRobustMerge.__init__).parameters
    assert parameters["max_update_norm"].default is None
    assert SCHEMA["max-update-norm"].default == 0.0  # "0 = no bound"
    assert parameters["robust"].default is None  # None: RobustSettings(), checked below
    assert parameters["device"].default is None
    assert SCHEMA["merge-device"].default == "auto"  # "auto" is read as None


@pytest.mark.parametrize(("field", "key"), ROBUST_KEYS.items())
def test_robust_settings_defaults_are_the_schemas(field: str, key: str) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(RobustSettings)}
    assert _same(defaults[field], key)
    # chosen_by_auto is no run-config key: ``resolve`` sets it, saying why "auto" chose a defence
    assert set(defaults) == set(ROBUST_KEYS) | {"chosen_by_auto"}
    assert defaults["chosen_by_auto"] is None


def test_the_merge_methods_defaults_are_the_schemas() -> None:
    robustmerge = inspect.signature(RobustMerge.__init__).parameters
    for parameter, key in {
        "keep_ratio": "keep-ratio",
        "scale_quantile": "scale-quantile",
        "fuse_weight": "fuse-weight",
        "mode": "merge-mode",
    }.items():
        assert _same(robustmerge[parameter].default, key), parameter
    assert _same(inspect.signature(Dare.__init__).parameters["drop_rate"].default, "dare-drop-rate")


def test_merge_round_has_no_server_step_of_its_own() -> None:
    """The pure round takes the server step from its caller: no default to drift."""
    assert inspect.signature(merge_round).parameters["server_lr"].default is inspect._empty


def app_output_spill() -> object:
    return ServerSettings.from_run_config(project_config()).output_dir / "spill"


def test_the_library_and_the_app_build_the_same_federation() -> None:
    library = FedRobustMerge(device="cpu")
    app = build_merge_strategy(
        ServerSettings.from_run_config({**project_config(), "merge-device": "cpu"})
    )
    ours, theirs = dataclasses.asdict(library.settings), dataclasses.asdict(app.settings)
    # where a buffered round spills: the system temp folder, the app's under its output-dir
    assert ours.pop("spill_dir") is None
    assert theirs.pop("spill_dir") == app_output_spill()
    assert ours.pop("method").describe() == theirs.pop("method").describe()
    assert ours == theirs
    assert library.settings.server_lr == 4.0  # the drift issue 24 found: it was 1.0 here
    for attribute in ("fraction_train", "fraction_evaluate", "min_train_nodes"):
        assert getattr(library, attribute) == getattr(app, attribute), attribute


def test_schema_default_refuses_the_wrong_kind() -> None:
    assert schema_default("server-lr", float) == SCHEMA["server-lr"].default
    with pytest.raises(TypeError, match="server-lr"):
        schema_default("server-lr", int)
