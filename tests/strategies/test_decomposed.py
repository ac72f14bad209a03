"""RobustMerge split into per-client and server parts gives the one-piece merge."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.merging import MergeInputError, merge_lora
from strategies.merging.decomposed import (
    client_terms,
    finish_from_sums,
    merge_pruned,
    prune_adapter,
    scale_key,
)
from strategies.merging.lora_keys import parse_layout
from strategies.merging.robustmerge import RobustMerge
from tests.strategies.reference_spec import KINDS, make_adapters

SETTINGS = {"keep_ratio": 0.2, "scale_quantile": 0.2, "fuse_weight": 2.0}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["paper-exact", "paper-equation"])
def test_pruned_parts_merge_to_the_dense_merge_bit_for_bit(kind: str, mode: str) -> None:
    adapters = make_adapters(seed=3, count=4, rank=4, d_in=24, d_out=20, kind=kind)
    method = RobustMerge(mode=mode, **SETTINGS)
    parts = [prune_adapter(adapter, method) for adapter in adapters]
    merged = merge_pruned([p for p, _ in parts], [s for _, s in parts], method)
    expected = merge_lora(adapters, "robustmerge", mode=mode, **SETTINGS)
    assert list(merged) == list(expected)
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key


def test_prune_adapter_keeps_the_spec_count_and_scales_at_least_one() -> None:
    (adapter,) = make_adapters(seed=0, count=1, rank=4, d_in=50, d_out=30)
    method = RobustMerge(**SETTINGS)
    pruned, scales = prune_adapter(adapter, method)
    layout = parse_layout(adapter)
    for module in layout.modules:
        a = pruned[module.a_key]
        # n - k + 1 survivors with no ties (gaussian data): floor(n * 0.8) = k
        assert int((a != 0).sum()) == a.numel() - int(a.numel() * 0.8) + 1
        assert scales[module.name].shape == (a.shape[0],)
        assert bool((scales[module.name] >= 1).all())
    for key in layout.other_keys:
        assert torch.equal(pruned[key], adapter[key])


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    count=st.integers(1, 5),
    kind=st.sampled_from(KINDS),
    keep=st.sampled_from([0.05, 0.2, 0.5, 1.0]),
)
def test_summed_client_terms_finish_to_the_merge(
    seed: int, count: int, kind: str, keep: float
) -> None:
    adapters = make_adapters(seed=seed, count=count, rank=4, d_in=16, d_out=12, kind=kind)
    method = RobustMerge(keep_ratio=keep, scale_quantile=0.2, fuse_weight=2.0)
    terms = [client_terms(adapter, method) for adapter in adapters]
    sums = {key: torch.stack([t[key] for t in terms]).sum(dim=0) for key in terms[0]}
    merged = finish_from_sums(sums, count)
    expected = merge_lora(adapters, "robustmerge", keep_ratio=keep, scale_quantile=0.2)
    assert list(merged) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(
            merged[key], value, rtol=1e-5, atol=1e-5 * (1 + value.abs().max().item())
        )


def test_client_terms_hold_the_scaled_factors() -> None:
    (adapter,) = make_adapters(seed=1, count=1, rank=4, d_in=16, d_out=12, extra_keys=False)
    method = RobustMerge(**SETTINGS)
    pruned, scales = prune_adapter(adapter, method)
    terms = client_terms(adapter, method)
    for module in parse_layout(adapter).modules:
        assert torch.equal(terms[module.a_key], 2.0 * pruned[module.a_key])
        expected_b = 2.0 * pruned[module.b_key] * scales[module.name][None, :]
        torch.testing.assert_close(terms[module.b_key], expected_b, rtol=0, atol=0)
        assert torch.equal(terms[scale_key(module.name)], scales[module.name])


def test_paper_equation_has_no_client_terms() -> None:
    (adapter,) = make_adapters(seed=1, count=1, rank=4, d_in=16, d_out=12)
    with pytest.raises(ValueError, match="paper-equation"):
        client_terms(adapter, RobustMerge(mode="paper-equation"))


def test_finish_refuses_missing_or_bad_scale_sums() -> None:
    (adapter,) = make_adapters(seed=1, count=1, rank=4, d_in=16, d_out=12, extra_keys=False)
    terms = client_terms(adapter, RobustMerge(**SETTINGS))
    name = parse_layout(adapter).modules[0].name
    missing = {k: v for k, v in terms.items() if k != scale_key(name)}
    with pytest.raises(MergeInputError, match="no scale vector"):
        finish_from_sums(missing, 1)
    negative = dict(terms)
    negative[scale_key(name)] = -terms[scale_key(name)]
    with pytest.raises(MergeInputError, match="<= 0"):
        finish_from_sums(negative, 1)
    short = dict(terms)
    short[scale_key(name)] = terms[scale_key(name)][:2]
    with pytest.raises(MergeInputError, match="rank"):
        finish_from_sums(short, 1)


def test_merge_pruned_needs_one_scale_mapping_per_adapter() -> None:
    adapters = make_adapters(seed=2, count=2, rank=4, d_in=16, d_out=12)
    method = RobustMerge(**SETTINGS)
    pruned, scales = prune_adapter(adapters[0], method)
    with pytest.raises(ValueError, match="one scale mapping per adapter"):
        merge_pruned([pruned, pruned], [scales], method)


def test_paper_equation_factors_do_not_depend_on_client_order() -> None:
    adapters = make_adapters(seed=8, count=3, rank=4, d_in=24, d_out=20)
    forward = merge_lora(adapters, "robustmerge", mode="paper-equation")
    backward = merge_lora(adapters[::-1], "robustmerge", mode="paper-equation")
    for key, value in forward.items():
        torch.testing.assert_close(backward[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["paper-exact", "paper-equation"])
def test_merge_pruned_on_cuda_matches_cpu(mode: str) -> None:
    adapters = make_adapters(seed=4, count=3, rank=4, d_in=24, d_out=20)
    method = RobustMerge(mode=mode, **SETTINGS)
    parts = [prune_adapter(adapter, method) for adapter in adapters]
    pruned, scales = [p for p, _ in parts], [s for _, s in parts]
    on_cpu = merge_pruned(pruned, scales, method)
    on_gpu = merge_pruned(pruned, scales, method, device="cuda")
    for key, value in on_cpu.items():
        assert on_gpu[key].device.type == "cpu"
        torch.testing.assert_close(on_gpu[key], value, rtol=1e-5, atol=1e-6)
