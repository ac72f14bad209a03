"""Mixed LoRA ranks in whole adapters (issue 16): what a site starts from
(``ranks.site_pair``, ``ranks.adapter_at_rank``) and ``rounds.merge_round``'s mixed-rank branch,
which must equal ``rank_rounds.merge_mixed_ranks`` module by module."""

from __future__ import annotations

import pytest
import torch

from strategies.merging import create_method
from strategies.merging.method import MergeMethod
from strategies.merging.rank_rounds import merge_mixed_ranks
from strategies.merging.ranks import (
    MixedRankError,
    adapter_at_rank,
    dead_directions,
    site_pair,
    slice_to_rank,
)
from strategies.merging.rounds import merge_round

MODULES = ("base_model.model.layer.0.query", "base_model.model.layer.1.value")
GLOBAL_RANK = 16
D_OUT, D_IN = 20, 24

PRODUCT_METHODS: list[tuple[str, dict[str, object]]] = [
    ("svd", {}),
    ("exact-mean", {}),
    ("robustmerge", {"mode": "paper-equation"}),
]


def method_of(name: str, options: dict[str, object]) -> MergeMethod:
    return create_method(name, **options).round_form()


def global_adapter(seed: int, *, zero_b: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    adapter: dict[str, torch.Tensor] = {}
    for name in MODULES:
        adapter[f"{name}.lora_A.weight"] = torch.randn(GLOBAL_RANK, D_IN, generator=g)
        b = torch.randn(D_OUT, GLOBAL_RANK, generator=g) * 0.1
        adapter[f"{name}.lora_B.weight"] = torch.zeros_like(b) if zero_b else b
    return adapter


def trained_from(start: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        key: value + 0.05 * torch.randn(value.shape, generator=g) for key, value in start.items()
    }


def test_round_zero_site_starts_from_the_leading_rows_of_a() -> None:
    """PEFT's round 0 has B = 0: the truncation of a zero product is all zero (every direction
    dead), so the site starts from the global's leading rows of A, which trains."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 5, generator=g)
    b = torch.zeros(6, 8)
    pair = site_pair(b, a, 3)
    b_slice, a_slice = slice_to_rank(b, a, 3)
    assert torch.equal(pair.a, a_slice) and torch.equal(pair.b, b_slice)
    assert not bool(dead_directions(pair.b, pair.a).any())
    assert pair.relative_error == 0.0


def test_a_rank_deficient_product_fills_only_its_dead_directions() -> None:
    g = torch.Generator().manual_seed(1)
    b = torch.zeros(6, 8)
    b[:, 0] = torch.randn(6, generator=g)  # B A has rank 1
    a = torch.randn(8, 5, generator=g)
    pair = site_pair(b, a, 3)
    assert torch.allclose(pair.b @ pair.a, b @ a, atol=1e-5)  # the product is kept
    assert torch.equal(pair.a[1:], a[1:3])  # directions 1, 2 were dead: the global's rows
    assert not bool(dead_directions(pair.b, pair.a).any())


@pytest.mark.parametrize("rank", [4, 8, 16])
def test_adapter_at_rank_shapes_and_the_global_rank_is_the_global(rank: int) -> None:
    adapter = global_adapter(2)
    site = adapter_at_rank(adapter, rank)
    assert list(site.tensors) == list(adapter)
    for key, value in site.tensors.items():
        expected = (rank, D_IN) if ".lora_A." in key else (D_OUT, rank)
        assert tuple(value.shape) == expected, key
        if rank == GLOBAL_RANK:
            assert torch.equal(value, adapter[key])
    assert (site.relative_error == 0.0) == (rank == GLOBAL_RANK)
    # The truncation error is the energy-weighted one over every module.
    if rank < GLOBAL_RANK:
        dropped = total = 0.0
        for name in MODULES:
            full = adapter[f"{name}.lora_B.weight"] @ adapter[f"{name}.lora_A.weight"]
            cut = site.tensors[f"{name}.lora_B.weight"] @ site.tensors[f"{name}.lora_A.weight"]
            dropped += float((full - cut).double().square().sum())
            total += float(full.double().square().sum())
        assert site.relative_error == pytest.approx((dropped / total) ** 0.5, rel=1e-3)


@pytest.mark.parametrize(("name", "options"), PRODUCT_METHODS)
def test_merge_round_with_ranks_4_8_16_is_merge_mixed_ranks_per_module(
    name: str, options: dict[str, object]
) -> None:
    base = global_adapter(3)
    ranks = [4, 8, 16, 8]
    clients = [
        trained_from(adapter_at_rank(base, rank).tensors, seed) for seed, rank in enumerate(ranks)
    ]
    weights = [1.0, 2.0, 3.0, 1.0]
    method = method_of(name, options)
    result = merge_round(base, clients, method, weights, server_lr=0.7, device="cpu")
    for module in MODULES:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        sent = {}
        for rank in sorted(set(ranks)):
            start = adapter_at_rank(base, rank).tensors
            sent[rank] = (start[b_key], start[a_key])
        expected = merge_mixed_ranks(
            method,
            base[a_key],
            base[b_key],
            [client[a_key] for client in clients],
            [client[b_key] for client in clients],
            weights,
            server_lr=0.7,
            sent=sent,
        )
        assert torch.equal(result.tensors[a_key], expected.a)
        assert torch.equal(result.tensors[b_key], expected.b)
        assert tuple(result.tensors[a_key].shape) == (GLOBAL_RANK, D_IN)
    assert result.report.relative_error is not None
    assert result.report.update_relative_error is not None


def test_merge_round_refuses_mixed_ranks_for_factor_wise_methods_and_adapter_target() -> None:
    base = global_adapter(4)
    clients = [trained_from(adapter_at_rank(base, r).tensors, r) for r in (4, 16)]
    with pytest.raises(MixedRankError, match="fedavg cannot merge clients of different ranks"):
        merge_round(base, clients, method_of("fedavg", {}), device="cpu", server_lr=1.0)
    with pytest.raises(MixedRankError, match="merge-target 'adapter'"):
        merge_round(
            base, clients, method_of("svd", {}), target="adapter", device="cpu", server_lr=1.0
        )


def test_merge_round_names_a_client_whose_shapes_do_not_match_one_rank() -> None:
    base = global_adapter(5)
    odd = trained_from(adapter_at_rank(base, 4).tensors, 0)
    odd[f"{MODULES[1]}.lora_B.weight"] = torch.zeros(D_OUT, 8)
    with pytest.raises(ValueError, match=r"expected \(20, 4\) at this client's rank 4"):
        merge_round(base, [base, odd], method_of("svd", {}), device="cpu", server_lr=1.0)
