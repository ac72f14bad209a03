"""LoRA model, its exchanged tensors and the config-only initial adapter."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import get_peft_model_state_dict

from tests.workload.tiny_model import save_tiny_bert
from workload.model import (
    LoraSettings,
    build_lora_model,
    get_lora_state,
    initial_adapter,
    peft_config,
    resolve_model_path,
    set_lora_state,
)

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LoraSettings:
    return LoraSettings(model=str(tiny_model_dir), r=4, alpha=8)


def test_settings_from_the_project_run_config() -> None:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert LoraSettings.from_run_config(config) == LoraSettings()
    assert LoraSettings.from_run_config({}) == LoraSettings()


def test_settings_read_every_key() -> None:
    config = {
        "model": " /models/x ",
        "lora-r": 16,
        "lora-alpha": 32,
        "lora-dropout": 0.1,
        "target-modules": "query, key,value",
    }
    assert LoraSettings.from_run_config(config) == LoraSettings(
        model="/models/x", r=16, alpha=32, dropout=0.1, target_modules=("query", "key", "value")
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lora-r", 0, r"'lora-r' must be an integer in \[1, 1024\]; got 0"),
        ("lora-r", 8.0, r"'lora-r' must be an integer in \[1, 1024\]; got 8.0 \(float\)"),
        ("lora-r", True, r"'lora-r' must be an integer"),
        ("lora-alpha", "16", r"'lora-alpha' must be an integer >= 1"),
        ("lora-dropout", 1.0, r"'lora-dropout' must be a finite number in \[0, 1\)"),
        ("lora-dropout", -0.1, r"'lora-dropout'"),
        ("lora-dropout", math.nan, r"'lora-dropout'"),
        ("target-modules", "", r"'target-modules' must be a comma-separated list"),
        ("target-modules", "query,,value", r"'target-modules' must be a comma-separated list"),
        ("target-modules", "query,query", r"'target-modules' lists \['query'\] more than once"),
        ("model", 3, r"'model' must be a string"),
    ],
)
def test_settings_reject_bad_values(key: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraSettings.from_run_config({key: value})


def test_resolve_model_path(tmp_path: Path) -> None:
    embedded = Path(resolve_model_path(""))
    assert (embedded / "config.json").is_file()
    assert resolve_model_path(str(tmp_path)) == str(tmp_path.resolve())
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"


def test_peft_config(tiny: LoraSettings) -> None:
    config = peft_config(tiny)
    assert config.r == 4
    assert config.lora_alpha == 8
    assert sorted(config.target_modules or ()) == ["query", "value"]
    assert config.base_model_name_or_path == resolve_model_path(tiny.model)


def test_only_lora_is_trainable_and_state_uses_peft_keys(tiny: LoraSettings) -> None:
    model = build_lora_model(tiny)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable)
    state = get_lora_state(model)
    assert list(state) == list(get_peft_model_state_dict(model))
    assert len(state) == len(trainable) == 2 * 2 * 2  # layers x (query, value) x (A, B)
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in state
    for key, tensor in state.items():
        assert tensor.dtype == torch.float32, key
        assert tensor.device.type == "cpu", key
        assert tensor.is_contiguous(), key


def test_get_lora_state_returns_copies(tiny: LoraSettings) -> None:
    model = build_lora_model(tiny)
    state = get_lora_state(model)
    key = next(iter(state))
    state[key].add_(1.0)
    assert not torch.equal(get_lora_state(model)[key], state[key])


def test_set_lora_state_round_trip(tiny: LoraSettings) -> None:
    source, target = build_lora_model(tiny, seed=1), build_lora_model(tiny, seed=2)
    state = {key: tensor + 0.5 for key, tensor in get_lora_state(source).items()}
    set_lora_state(target, state)
    loaded = get_lora_state(target)
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_set_lora_state_accepts_fp16(tiny: LoraSettings) -> None:
    model = build_lora_model(tiny)
    state = {key: tensor.half() for key, tensor in initial_adapter(tiny, seed=0).items()}
    set_lora_state(model, state)
    assert all(t.dtype == torch.float32 for t in get_lora_state(model).values())


def test_set_lora_state_is_strict(tiny: LoraSettings) -> None:
    model = build_lora_model(tiny)
    state = get_lora_state(model)
    before = {key: tensor.clone() for key, tensor in state.items()}
    key = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"

    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(ValueError, match=rf"lacks 1 of the model's 8 tensors, first '{key}'"):
        set_lora_state(model, missing)

    extra = {**state, "base_model.model.pooler.dense.weight": torch.zeros(32, 32)}
    with pytest.raises(ValueError, match=r"'base_model\.model\.pooler\.dense\.weight'"):
        set_lora_state(model, extra)

    wrong_shape = {**state, key: torch.zeros(32, 8)}
    with pytest.raises(ValueError, match=rf"'{key}': expected shape \(32, 4\), got \(32, 8\)"):
        set_lora_state(model, wrong_shape)

    not_finite = {**{k: v + 1 for k, v in state.items()}, key: torch.full((32, 4), math.inf)}
    with pytest.raises(ValueError, match=rf"'{key}': holds NaN or infinite"):
        set_lora_state(model, not_finite)

    integer = {**state, key: torch.zeros(32, 4, dtype=torch.int64)}
    with pytest.raises(ValueError, match=rf"'{key}': expected a float tensor"):
        set_lora_state(model, integer)

    after = get_lora_state(model)  # Nothing was loaded by the failed calls.
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_target_modules_that_match_nothing(tmp_path: Path, tiny: LoraSettings) -> None:
    settings = LoraSettings(model=tiny.model, target_modules=("q_proj",))
    with pytest.raises(ValueError, match="target-modules"):
        build_lora_model(settings)


def test_initial_adapter_matches_the_built_model(tiny: LoraSettings) -> None:
    adapter = initial_adapter(tiny, seed=0)
    state = get_lora_state(build_lora_model(tiny))
    assert list(adapter) == list(state)
    assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in state.items()}


def test_initial_adapter_matches_the_default_minilm() -> None:
    settings = LoraSettings()
    adapter = initial_adapter(settings, seed=0)
    state = get_lora_state(build_lora_model(settings))
    assert len(adapter) == 6 * 2 * 2  # layers x (query, value) x (A, B)
    assert {k: v.shape for k, v in adapter.items()} == {k: v.shape for k, v in state.items()}
    assert list(adapter) == list(state)


def test_initial_adapter_needs_only_the_config(tmp_path: Path, tiny: LoraSettings) -> None:
    config_only = save_tiny_bert(tmp_path / "config-only", weights=False)
    assert not list(config_only.glob("*.safetensors"))
    adapter = initial_adapter(LoraSettings(model=str(config_only), r=4, alpha=8), seed=0)
    assert all(torch.equal(adapter[k], v) for k, v in initial_adapter(tiny, seed=0).items())


def test_initial_adapter_is_peft_default_init_and_seeded(tiny: LoraSettings) -> None:
    adapter = initial_adapter(tiny, seed=7)
    again = initial_adapter(tiny, seed=7)
    other = initial_adapter(tiny, seed=8)
    assert all(torch.equal(adapter[k], again[k]) for k in adapter)
    a_keys = [k for k in adapter if k.endswith(".lora_A.weight")]
    b_keys = [k for k in adapter if k.endswith(".lora_B.weight")]
    assert len(a_keys) == len(b_keys) == 4
    for key in b_keys:
        assert not adapter[key].any(), key
    for key in a_keys:
        a = adapter[key]
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(d_in), ...)
        assert a.abs().max() <= bound, key
        assert a.abs().max() > 0.5 * bound, key
        assert not torch.equal(a, other[key]), key
        assert a.dtype == torch.float32
    # Distinct modules get distinct draws.
    assert not torch.equal(adapter[a_keys[0]], adapter[a_keys[1]])


def test_initial_adapter_leaves_the_global_rng_alone(tiny: LoraSettings) -> None:
    state = torch.random.get_rng_state()
    initial_adapter(tiny, seed=3)
    build_lora_model(tiny, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_site_rank_node_config_then_client_ranks_then_lora_r() -> None:
    from workload.model import site_rank

    run = {"lora-r": 8, "lora-alpha": 16, "client-ranks": "4,8,16"}
    assert [site_rank(run, {"partition-id": i}) for i in range(5)] == [4, 8, 16, 4, 8]
    assert site_rank(run, {"partition-id": 0, "lora-r": 2}) == 2  # node config wins
    assert site_rank(run, {}) == 8  # no partition id (deployment): lora-r
    assert site_rank({"lora-r": 8, "client-ranks": ""}, {"partition-id": 3}) == 8
    with pytest.raises(ValueError, match=r"node config key 'lora-r' must be an integer in"):
        site_rank(run, {"lora-r": 0})


def test_every_rank_keeps_the_run_config_scaling() -> None:
    run = {"lora-r": 8, "lora-alpha": 16, "client-ranks": "4,8,16,3"}
    assert LoraSettings.for_global(run).r == 16
    assert LoraSettings.for_global(run).alpha == 32
    for partition, rank in enumerate([4, 8, 16, 3]):
        site = LoraSettings.for_site(run, {"partition-id": partition})
        assert site.r == rank
        assert site.alpha / site.r == 2.0
    assert LoraSettings.for_site(run, {"partition-id": 3}).alpha == 6
    assert LoraSettings.for_global({"lora-r": 8, "lora-alpha": 16}).r == 8
    assert LoraSettings(r=8, alpha=4).with_rank(3).alpha == 1.5
