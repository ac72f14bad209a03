"""Round folds (strategies.merging.streaming): hand-checked, parity with the batch round merge,
order independence, and which methods fold."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.merging import create_method
from strategies.merging.decomposed import prune_adapter
from strategies.merging.fedavg import FedAvg
from strategies.merging.method import MergeMethod
from strategies.merging.robustmerge import RobustMerge
from strategies.merging.rounds import DeltaView, merge_round
from strategies.merging.streaming import MeanFold, RobustMergeFold, round_fold

A0 = "base_model.model.layer.0.query.lora_A.weight"
B0 = "base_model.model.layer.0.query.lora_B.weight"
A1 = "base_model.model.layer.1.value.lora_A.weight"
B1 = "base_model.model.layer.1.value.lora_B.weight"
HEAD = "base_model.model.classifier.weight"
SHAPES = {A0: (4, 12), B0: (10, 4), A1: (4, 6), B1: (8, 4), HEAD: (3, 5)}


def adapter(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(shape, generator=generator) for k, shape in SHAPES.items()}


def clients(base: dict[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    return [{k: v + 0.1 * adapter(100 + i)[k] for k, v in base.items()} for i in range(count)]


def fold_round(
    method: MergeMethod,
    base: dict[str, torch.Tensor],
    trained: list[dict[str, torch.Tensor]],
    weights: list[float] | None,
    order: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    fold = round_fold(method, list(base))
    assert fold is not None
    for index in order if order is not None else range(len(trained)):
        fold.add(DeltaView(trained[index], base), 1.0 if weights is None else weights[index])
    merged = fold.finish()
    return {k: base[k] + merged[k] for k in base}


def test_mean_fold_hand_checked() -> None:
    fold = MeanFold(["x"])
    fold.add({"x": torch.tensor([2.0, -1.0])}, 1.0)
    fold.add({"x": torch.tensor([6.0, 3.0])}, 3.0)
    assert fold.finish()["x"].tolist() == [5.0, 2.0]  # (1*2 + 3*6)/4, (-1 + 9)/4


def test_robustmerge_fold_hand_checked_without_pruning() -> None:
    """keep_ratio 1, scale_quantile 0: nothing pruned, s~ = 1, so A_m = lambda mean(A) and
    B_m = lambda mean(B) (the round form)."""
    method = RobustMerge(keep_ratio=1.0, scale_quantile=0.0, fuse_weight=2.0).round_form()
    keys = ["m.lora_A.weight", "m.lora_B.weight"]
    fold = RobustMergeFold(method, keys)
    fold.add({keys[0]: torch.tensor([[1.0, 2.0]]), keys[1]: torch.tensor([[4.0]])})
    fold.add({keys[0]: torch.tensor([[3.0, -2.0]]), keys[1]: torch.tensor([[0.0]])})
    merged = fold.finish()
    assert merged[keys[0]].tolist() == [[4.0, 0.0]]
    assert merged[keys[1]].tolist() == [[4.0]]


def test_ties_fold_hand_checked() -> None:
    """keep_ratio 1: nothing trimmed. Entry 0: votes +2 (w 1), -1 (w 1), +4 (w 2): P = 10,
    N = -1, sign +, disjoint mean lambda T / W * P / 2 = 1 * 3/4 * 10/2 = 3.75. Entry 1: 0,
    -3, 0: sign -, mean 3/4 * -3 / 1 = -2.25."""
    method = create_method("ties", keep_ratio=1.0, fuse_weight=1.0).round_form()
    keys = ["m.lora_A.weight", "m.lora_B.weight"]
    fold = round_fold(method, keys)
    assert fold is not None
    for a, w in (([2.0, 0.0], 1.0), ([-1.0, -3.0], 1.0), ([4.0, 0.0], 2.0)):
        fold.add({keys[0]: torch.tensor([a]), keys[1]: torch.zeros(1, 1)}, w)
    merged = fold.finish()
    assert merged[keys[0]].tolist() == [[3.75, -2.25]]
    assert merged[keys[1]].tolist() == [[0.0]]


def test_dare_fold_hand_checked() -> None:
    """A client's mask depends on its own tensor alone: two equal clients keep the same
    entries, so their (any-weighted) fold is lambda times one client's dropped, rescaled
    tensor, which has only 0 and 2x entries at drop rate 0.5."""
    method = create_method("dare", drop_rate=0.5, fuse_weight=3.0).round_form()
    keys = ["m.lora_A.weight", "m.lora_B.weight"]
    one = {keys[0]: torch.arange(1.0, 41.0).reshape(2, 20), keys[1]: torch.ones(3, 2)}
    fold = round_fold(method, keys)
    assert fold is not None
    fold.add(one, 1.0)
    fold.add(one, 4.0)
    merged = fold.finish()
    kept = merged[keys[0]] != 0
    assert 0 < int(kept.sum()) < 40  # some dropped, some kept
    assert torch.equal(merged[keys[0]][kept], 3.0 * 2.0 * one[keys[0]][kept])
    other = create_method("dare", drop_rate=0.5, fuse_weight=3.0, seed=1).round_form()
    refold = round_fold(other, keys)
    assert refold is not None
    refold.add(one, 1.0)
    assert not torch.equal(refold.finish()[keys[0]] != 0, kept)  # the seed picks the mask


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", ["robustmerge", "fedavg", "ties", "dare"])
def test_fold_matches_the_batch_round_merge(name: str, weighted: bool) -> None:
    base = adapter(0)
    trained = clients(base, 5)
    weights = [3.0, 1.0, 7.0, 2.0, 5.0] if weighted else None
    method = create_method(name).round_form()
    batch = merge_round(base, trained, method, weights, server_lr=1.0).tensors
    streamed = fold_round(method, base, trained, weights)
    for key in base:
        torch.testing.assert_close(streamed[key], batch[key], rtol=1e-5, atol=1e-6)


def test_robustmerge_fold_matches_a_float64_reading_of_the_round_formulas() -> None:
    base = adapter(1)
    trained = clients(base, 4)
    weights = [1.0, 2.0, 3.0, 4.0]
    method = RobustMerge(fuse_weight=1.5).round_form()
    streamed = fold_round(method, base, trained, weights)
    total = sum(weights)
    for a_key, b_key in ((A0, B0), (A1, B1)):
        a_terms, b_terms, s_terms = [], [], []
        for client, w in zip(trained, weights, strict=True):
            pruned, scales = prune_adapter({k: client[k] - base[k] for k in base}, method)
            scale = scales[a_key.replace(".lora_A", "")].double()
            a_terms.append(w * pruned[a_key].double())
            b_terms.append(w * pruned[b_key].double() * scale[None, :])
            s_terms.append(scale)
        a = 1.5 / total * sum(a_terms)
        b = 1.5 * len(trained) / total * sum(b_terms) / sum(s_terms)
        torch.testing.assert_close(streamed[a_key].double(), base[a_key].double() + a)
        torch.testing.assert_close(streamed[b_key].double(), base[b_key].double() + b)


def test_sparse_terms_fold_to_the_same_bits_as_dense_replies() -> None:
    base = adapter(2)
    trained = clients(base, 3)
    method = RobustMerge().round_form()
    dense = RobustMergeFold(method, list(base))
    sparse = RobustMergeFold(method, list(base))
    for client in trained:
        delta = {k: client[k] - base[k] for k in base}
        dense.add(delta)
        pruned, scales = prune_adapter(delta, method)
        sparse.add_pruned(pruned, scales)
    left, right = dense.finish(), sparse.finish()
    assert all(torch.equal(left[k], right[k]) for k in base)


@settings(max_examples=15, deadline=None)
@given(count=st.integers(min_value=2, max_value=9), seed=st.integers(0, 10_000))
def test_any_arrival_order_gives_the_same_global_bit_for_bit(count: int, seed: int) -> None:
    base = adapter(seed)
    trained = clients(base, count)
    weights = [float(1 + (seed + i) % 5) for i in range(count)]
    order = list(range(count))
    random.Random(seed).shuffle(order)
    methods = (RobustMerge(), FedAvg(), create_method("ties"), create_method("dare"))
    for method in (m.round_form() for m in methods):
        first = fold_round(method, base, trained, weights)
        shuffled = fold_round(method, base, trained, weights, order)
        assert all(torch.equal(first[k], shuffled[k]) for k in base)


@pytest.mark.parametrize(
    "method",
    [
        create_method("dare"),  # the one-shot form: one mask stream over the stack
        create_method("dare", fuse_weight=(1.0, 2.0)).round_form(),
        create_method("svd").round_form(),
        create_method("exact-mean").round_form(),
        RobustMerge(mode="paper-equation").round_form(),
        RobustMerge(),  # the one-shot form
        RobustMerge(fuse_weight=(1.0, 2.0)).round_form(),
    ],
)
def test_methods_that_need_every_client_have_no_fold(method: object) -> None:
    assert round_fold(method, list(SHAPES)) is None  # type: ignore[arg-type]


def test_fold_refuses_bad_weights_and_empty_rounds() -> None:
    fold = MeanFold(["x"])
    with pytest.raises(ValueError, match="no client"):
        fold.finish()
    with pytest.raises(ValueError, match="weight"):
        fold.add({"x": torch.zeros(1)}, 0.0)
