"""What each round fold promises beyond parity with the batch merge (issue 29: the tests that
the mutation run of ``strategies.merging.streaming`` found missing): a weight left out is 1,
low-precision replies fold as their float32 upcast, the refusals say what was wrong, a
sparse-uplink reply folds to the same bits as the dense one with any scales > 0, products are
formed in float64, DARE's masks follow its seed, and a non-LoRA key anywhere in the layout."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from strategies.merging import create_method
from strategies.merging.decomposed import prune_adapter
from strategies.merging.method import MergeMethod
from strategies.merging.robustmerge import RobustMerge
from strategies.merging.rounds import merge_round
from strategies.merging.streaming import DareFold, RobustMergeFold, RoundFold, round_fold
from tests.strategies.test_streaming import A0, A1, B0, B1, HEAD, SHAPES

METHODS = ("fedavg", "robustmerge", "ties", "dare")

Tensors = dict[str, torch.Tensor]


def delta(seed: int, shapes: Mapping[str, tuple[int, ...]] = SHAPES) -> Tensors:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) for key, shape in shapes.items()}


def folded(
    method: MergeMethod,
    replies: list[Tensors],
    weights: list[float | None],
    keys: list[str] | None = None,
) -> Tensors:
    """``method``'s fold over ``replies``; a None weight calls ``add`` without one."""
    fold = round_fold(method, keys or list(SHAPES))
    assert fold is not None
    for reply, weight in zip(replies, weights, strict=True):
        if weight is None:
            fold.add(reply)
        else:
            fold.add(reply, weight)
    return fold.finish()


def same(left: Tensors, right: Tensors) -> bool:
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


@pytest.mark.parametrize("name", METHODS)
def test_a_weight_left_out_counts_as_one(name: str) -> None:
    method = create_method(name).round_form()
    replies = [delta(1), delta(2)]
    implicit = folded(method, replies, [None, 3.0])
    explicit = folded(method, replies, [1.0, 3.0])
    assert same(implicit, explicit)
    assert not same(implicit, folded(method, replies, [2.0, 3.0]))  # the weight matters


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", METHODS)
def test_low_precision_replies_fold_as_their_float32_upcast(name: str, dtype: torch.dtype) -> None:
    """Every fold works on float32 copies of a reply's factors (DARE digests their float32
    bytes), so a half-precision reply and its exact float32 upcast give the same bits."""
    method = create_method(name, seed=3) if name == "dare" else create_method(name)
    method = method.round_form()
    low = [{k: v.to(dtype) for k, v in delta(seed).items()} for seed in (4, 5, 6)]
    up = [{k: v.float() for k, v in reply.items()} for reply in low]
    assert same(folded(method, low, [1.0, 2.0, 0.5]), folded(method, up, [1.0, 2.0, 0.5]))


def test_empty_round_and_refused_methods_say_why() -> None:
    fold = round_fold(create_method("fedavg"), list(SHAPES))
    assert fold is not None
    with pytest.raises(ValueError, match=r"^no client was folded in$"):
        fold.finish()
    for refused in (
        RobustMerge(mode="paper-equation").round_form(),  # a round form, not paper-exact
        RobustMerge(),  # paper-exact, the one-shot form
    ):
        with pytest.raises(
            ValueError, match=r"^RobustMergeFold folds RobustMerge paper-exact in its round form$"
        ):
            RobustMergeFold(refused, list(SHAPES))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^a streamed round needs one shared fuse weight$"):
        RobustMergeFold(RobustMerge(fuse_weight=(1.0, 2.0)).round_form(), list(SHAPES))  # type: ignore[arg-type]
    dare_message = r"^DareFold folds DARE's round form with one shared fuse weight$"
    for refused in (
        create_method("dare"),  # the one-shot form, one fuse weight
        create_method("dare", fuse_weight=(1.0, 2.0)).round_form(),
    ):
        with pytest.raises(ValueError, match=dare_message):
            DareFold(refused, list(SHAPES))  # type: ignore[arg-type]


def pruned_replies(method: RobustMerge, seeds: tuple[int, ...]) -> list[tuple[Tensors, Tensors]]:
    return [prune_adapter(delta(seed), method) for seed in seeds]


def test_a_sparse_reply_folds_like_the_dense_one_with_weights_and_any_positive_scales() -> None:
    """``add_pruned`` with a client's own steps 1-2 gives the bits ``add`` gives, weights and
    the non-LoRA key included; scales of exactly 1 and below 1 are valid (only <= 0 is not)."""
    method = RobustMerge(fuse_weight=1.5).round_form()
    assert isinstance(method, RobustMerge)
    weights = [0.3, 2.0, 1.0]
    dense = RobustMergeFold(method, list(SHAPES))
    sparse = RobustMergeFold(method, list(SHAPES))
    mixed = RobustMergeFold(method, list(SHAPES))  # dense and sparse replies in one round
    for index, (seed, weight) in enumerate(zip((7, 8, 9), weights, strict=True)):
        dense.add(delta(seed), weight)
        pruned, scales = prune_adapter(delta(seed), method)
        sparse.add_pruned(pruned, scales, weight)
        if index % 2:
            mixed.add_pruned(pruned, scales, weight)
        else:
            mixed.add(delta(seed), weight)
    merged = dense.finish()
    assert same(merged, sparse.finish())
    assert same(merged, mixed.finish())

    implicit = RobustMergeFold(method, list(SHAPES))
    explicit = RobustMergeFold(method, list(SHAPES))
    for (pruned, scales), weight in zip(pruned_replies(method, (7, 8)), (1.0, 4.0), strict=True):
        given = {
            name: torch.full_like(s, 0.5 if ".query." in name else 1.0)
            for name, s in scales.items()
        }
        explicit.add_pruned(pruned, given, weight)
        if weight == 1.0:
            implicit.add_pruned(pruned, given)
        else:
            implicit.add_pruned(pruned, given, weight)
    assert same(implicit.finish(), explicit.finish())


@pytest.mark.parametrize("bad", ["zero", "short"])
def test_a_sparse_reply_with_a_bad_scale_vector_is_refused_naming_the_rank(bad: str) -> None:
    method = RobustMerge().round_form()
    assert isinstance(method, RobustMerge)
    pruned, scales = prune_adapter(delta(10), method)
    name = next(iter(scales))
    rank = scales[name].shape[0]
    scales[name] = torch.ones(rank - 1) if bad == "short" else scales[name].clone().fill_(1.0)
    if bad == "zero":
        scales[name][1] = 0.0
    fold = RobustMergeFold(method, list(SHAPES))
    message = f"module {name}: the scale vector must have the rank's {rank} entries, all > 0"
    with pytest.raises(ValueError, match=f"^{message}$"):
        fold.add_pruned(pruned, scales)


def test_the_robustmerge_fold_forms_weight_times_scale_in_float64() -> None:
    """B's term is w s~ B^ with the product w s~ in float64: the fold equals a float64 reading
    of the round form, rounded once to float32, bit for bit (weights like 0.1 are not exact in
    float32, so a float32 product would move many entries by an ulp)."""
    method = RobustMerge(fuse_weight=1.5).round_form()
    assert isinstance(method, RobustMerge)
    weights = [0.1, 0.7, 0.3]
    replies = [delta(seed) for seed in (11, 12, 13)]
    merged = folded(method, replies, list(weights))
    total = sum(weights)
    for a_key, b_key in ((A0, B0), (A1, B1)):
        b_sum = torch.zeros(SHAPES[b_key], dtype=torch.float64)
        s_sum = torch.zeros(SHAPES[b_key][1], dtype=torch.float64)
        for reply, weight in zip(replies, weights, strict=True):
            pruned, scales = prune_adapter(reply, method)
            scale = scales[a_key.replace(".lora_A", "")].double()
            b_sum += pruned[b_key].double() * (scale * weight)[None, :]
            s_sum += scale
        expected = b_sum * (1.5 * len(replies) / total) / s_sum
        assert torch.equal(merged[b_key], expected.float())


def test_dare_folds_draw_the_masks_of_the_methods_own_seed() -> None:
    """With seed 7 (the default 0 hides how a seed is mixed in) the fold drops what the batch
    round merge drops."""
    method = create_method("dare", seed=7).round_form()
    base = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    trained = [delta(seed) for seed in (14, 15, 16)]
    batch = merge_round(base, trained, method, [1.0, 2.0, 3.0], server_lr=1.0).tensors
    streamed = folded(method, trained, [1.0, 2.0, 3.0])
    for key in SHAPES:
        assert torch.equal(streamed[key] != 0, batch[key] != 0)
        torch.testing.assert_close(streamed[key], batch[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", METHODS)
def test_a_non_lora_key_first_in_the_layout_changes_nothing(name: str) -> None:
    """Folds walk the layout's keys; a non-LoRA key before the factors must not end the walk."""
    method = create_method(name).round_form()
    replies = [delta(17), delta(18)]
    head_first = [HEAD, A0, B0, A1, B1]
    fold: RoundFold | None = round_fold(method, head_first)
    assert fold is not None
    for reply, weight in zip(replies, (1.0, 2.0), strict=True):
        fold.add(reply, weight)
    first = fold.finish()
    assert list(first) == head_first
    assert same({k: first[k] for k in SHAPES}, folded(method, replies, [1.0, 2.0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", METHODS)
def test_a_fold_on_the_gpu_sums_there_and_gives_the_cpu_folds_bits(name: str) -> None:
    """The device mutants of the folds (a CPU-only run cannot tell them apart) fail here: the
    sums live on the fold's device, and the result comes back as float32 on the CPU."""
    method = create_method(name).round_form()
    replies = [delta(19), delta(20), delta(21)]
    gpu = round_fold(method, list(SHAPES), "cuda")
    assert gpu is not None
    for reply, weight in zip(replies, (1.0, 2.0, 0.5), strict=True):
        gpu.add(reply, weight)
    sums = [
        s for holder in vars(gpu).values() if hasattr(holder, "sums") for s in holder.sums.values()
    ]
    assert sums and all(s.device.type == "cuda" for s in sums)
    merged = gpu.finish()
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in merged.values())
    assert same(merged, folded(method, replies, [1.0, 2.0, 0.5]))


def _held_sums(fold: RoundFold) -> int:
    """How many running sums (and TIES vote pairs) ``fold`` still holds."""
    holders = [h for h in vars(fold).values() if hasattr(h, "sums")]
    votes = getattr(fold, "votes", {})
    return sum(len(holder.sums) for holder in holders) + len(votes)


@pytest.mark.parametrize("name", METHODS)
def test_finish_releases_the_sums_and_ends_the_fold(name: str) -> None:
    """A round's fold state is several adapters of exact sums; ``finish`` frees them as it
    reads them (what follows the merge, the direction diagnostics, runs without them), and a
    finished fold refuses more clients and a second finish instead of merging from nothing."""
    method = create_method(name).round_form()
    fold = round_fold(method, list(SHAPES))
    assert fold is not None
    fold.add(delta(22), 1.0)
    fold.add(delta(23), 2.0)
    assert _held_sums(fold) > 0
    merged = fold.finish()
    assert same(merged, folded(method, [delta(22), delta(23)], [1.0, 2.0]))
    assert _held_sums(fold) == 0
    with pytest.raises(
        RuntimeError, match=r"^this fold has already finished \(its sums were released\)$"
    ):
        fold.finish()
    with pytest.raises(RuntimeError, match=r"^this fold has finished; it takes no more clients$"):
        fold.add(delta(24), 1.0)
    assert fold.count == 2
