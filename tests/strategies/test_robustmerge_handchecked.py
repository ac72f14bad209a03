"""RobustMerge on cases small enough to check by hand (docs/robustmerge-spec.md, steps 1-5).

Every expected number is worked out in the comments; each case is checked against the engine
and against the float64 oracle in ``reference_spec`` (so the oracle is hand-checked too).
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from strategies import merge_lora
from strategies.merging.pruning import complementary_scale, magnitude_mask
from tests.strategies import reference_spec as ref

A_KEY, B_KEY = ref.lora_keys("base_model.model.layer.0.attention.query")
HEAD = "base_model.model.classifier.modules_to_save.default.weight"

# Task 1. A_1 (r=2 x d_in=4), keep_ratio 0.25: n = 8, k = floor(8 * 0.75) = 6.
#   |A_1| sorted: 0 1 1 1 2 2 4 6 -> tau = 6th smallest = 2; a tie at tau (two 2s) keeps both,
#   so 4 entries survive (n - k + 1 = 3 without the tie).
#   A^_1 = [[6, -2, 0, 0], [2, -4, 0, 0]]
#   s_1[0] = (6+2+1+0) / (6+2) = 9/8;  s_1[1] = (2+4+1+1) / (2+4) = 8/6 = 4/3
A1 = [[6.0, -2.0, 1.0, 0.0], [2.0, -4.0, 1.0, 1.0]]
A1_PRUNED = [[6.0, -2.0, 0.0, 0.0], [2.0, -4.0, 0.0, 0.0]]
# Task 2. Row 0 is all zero (the spec's 0/0: s = 1).
#   |A_2| sorted: 0 0 0 0 1 2 3 5 -> tau = 6th smallest = 2 -> keep 5, 3, 2.
#   A^_2 = [[0, 0, 0, 0], [0, -5, 3, 2]]
#   s_2[0] = 0/0 := 1;  s_2[1] = (1+5+3+2) / (5+3+2) = 11/10
A2 = [[0.0, 0.0, 0.0, 0.0], [1.0, -5.0, 3.0, 2.0]]
A2_PRUNED = [[0.0, 0.0, 0.0, 0.0], [0.0, -5.0, 3.0, 2.0]]
# B_t (d_out=3 x r=2), keep_ratio 0.25: n = 6, k = floor(6 * 0.75) = floor(4.5) = 4.
#   |B_1| sorted: 1 2 3 4 5 6 -> tau = 4 -> keep 4, -5, 6 (n - k + 1 = 3, no ties).
#   |B_2| sorted: 0 1 2 2 2 7 -> tau = 2 -> keep the three 2s and 7 (a tie: 4 survive).
B1 = [[1.0, -2.0], [3.0, 4.0], [-5.0, 6.0]]
B1_PRUNED = [[0.0, 0.0], [0.0, 4.0], [-5.0, 6.0]]
B2 = [[2.0, 2.0], [-2.0, 1.0], [7.0, 0.0]]
B2_PRUNED = [[2.0, 2.0], [-2.0, 0.0], [7.0, 0.0]]
# A non-LoRA tensor: plain mean over tasks, no lambda.
HEAD1, HEAD2 = [1.0, 2.0], [3.0, 8.0]


def _adapters() -> list[dict[str, torch.Tensor]]:
    return [
        {A_KEY: torch.tensor(a), B_KEY: torch.tensor(b), HEAD: torch.tensor(h)}
        for a, b, h in ((A1, B1, HEAD1), (A2, B2, HEAD2))
    ]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected.to(torch.float64),
        rtol=1e-6,
        atol=1e-6,
        msg=lambda m: f"{what}: {m}",
    )


def _oracle(adapters: list[dict[str, torch.Tensor]], **hp: object) -> dict[str, torch.Tensor]:
    return ref.merge_adapters_exact(adapters, **hp)  # type: ignore[arg-type]


# --- step 1: pruning ------------------------------------------------------------------------


def test_pruning_keeps_ties_at_threshold() -> None:
    stack = torch.tensor([A1, A2])
    mask = magnitude_mask(stack, 0.25)
    expected = torch.tensor([A1_PRUNED, A2_PRUNED]) != 0
    # Task 1's two entries of magnitude 2 sit exactly at tau: both are kept (4 survive, not 3).
    assert int(mask[0].sum()) == 4
    assert torch.equal(mask, expected)
    for t, a in enumerate((A1, A2)):
        pruned, oracle_mask = ref.prune(torch.tensor(a), 0.25)
        assert torch.equal(oracle_mask, expected[t])
        assert torch.equal(pruned, torch.tensor((A1_PRUNED, A2_PRUNED)[t], dtype=torch.float64))
    b_mask = magnitude_mask(torch.tensor([B1, B2]), 0.25)
    assert torch.equal(b_mask, torch.tensor([B1_PRUNED, B2_PRUNED]) != 0)
    # B_2: three entries tie at tau = 2 and all are kept; 4 of 6 survive.
    assert int(b_mask[1].sum()) == 4


def test_pruning_tie_below_kth_position() -> None:
    # |x| sorted: 1 2 3 3 3 3 5 6; keep_ratio 0.5 -> k = 4 -> tau = 3 (positions 3..6 tie).
    # Every |x| >= 3 survives: 6 entries instead of n - k + 1 = 5. Signs do not matter.
    x = torch.tensor([[3.0, -1.0, 6.0, -3.0], [2.0, 3.0, -5.0, -3.0]])
    expected = x.abs() >= 3
    assert torch.equal(magnitude_mask(x[None], 0.5)[0], expected)
    assert torch.equal(ref.prune(x, 0.5)[1], expected)
    assert int(expected.sum()) == 6


def test_pruning_keeps_n_minus_k_plus_one_without_ties() -> None:
    # A 16 x 4096 A (n = 65,536) with distinct magnitudes: k = floor(65536 * 0.8) = 52,428,
    # tau is the 52,428th smallest and every entry from it up survives: 65536 - 52428 + 1 =
    # 13,109 entries (20.003 %), the spec's worked number.
    generator = torch.Generator().manual_seed(0)
    magnitudes = (torch.randperm(16 * 4096, generator=generator) + 1).to(torch.float32)
    signs = torch.where(torch.rand(16 * 4096, generator=generator) < 0.5, -1.0, 1.0)
    a = (magnitudes * signs).reshape(16, 4096)
    mask = magnitude_mask(a[None], 0.2)[0]
    assert int(mask.sum()) == 13_109
    # The survivors are exactly the magnitudes 52,428 .. 65,536.
    assert torch.equal(mask, a.abs() >= 52_428)
    assert torch.equal(ref.prune(a, 0.2)[1], mask)
    # Through the public API (T = 1): the merged A is non-zero exactly there.
    b = torch.ones(8, 16)
    merged = merge_lora([{A_KEY: a, B_KEY: b}], keep_ratio=0.2)
    assert torch.equal(merged[A_KEY] != 0, mask)
    torch.testing.assert_close(merged[A_KEY], 2.0 * a * mask)


def test_extreme_keep_ratios() -> None:
    # keep_ratio = 1: k = floor(n * 0) = 0 -> keep everything (the release would ask for the
    # 0th smallest). A tiny keep_ratio: k = floor(8 * (1 - 1e-9)) = 7 -> tau = 7th smallest,
    # so the 2 largest magnitudes survive (n - k + 1 = 2).
    x = torch.tensor([[1.0, -8.0, 3.0, 4.0], [-5.0, 0.5, 7.0, 2.0]])
    assert bool(magnitude_mask(x[None], 1.0).all())
    assert torch.equal(ref.prune(x, 1.0)[1], torch.ones(2, 4, dtype=torch.bool))
    tiny = magnitude_mask(x[None], 1e-9)[0]
    assert torch.equal(tiny, x.abs() >= 7)
    assert torch.equal(ref.prune(x, 1e-9)[1], tiny)


# --- step 2: complementary scale and its floor ------------------------------------------------


@pytest.mark.parametrize(
    ("rank", "scale_quantile", "position"),
    [
        (16, 0.2, 12),  # floor(16 * 0.8) = floor(12.8) = 12
        (8, 0.2, 6),  # floor(8 * 0.8) = floor(6.4) = 6
        (128, 0.2, 102),  # floor(128 * 0.8) = floor(102.4) = 102
        (16, 0.0, 15),  # a = 0: floor(16) = 16 is past the end -> r - 1 = 15 (all = max)
        (16, 0.5, 8),  # floor(8.0) = 8
        (16, 0.99, 0),  # floor(0.16) = 0: the floor is the minimum, nothing changes
        (1, 0.2, 0),  # r = 1: floor(0.8) = 0
    ],
)
def test_scale_floor_position(rank: int, scale_quantile: float, position: int) -> None:
    # Row i of A is d ones of which i + 1 are kept, so s[i] = d / (i + 1): all distinct,
    # descending in i. Ascending, the scales are d/d, d/(d-1), ..., d/1, so the element at
    # 0-based position p is d / (d - p), and every s below it is raised to it: the p + 1
    # smallest become equal, the r - p - 1 largest stay distinct (r = 16, a = 0.2: 13 and 3).
    d = rank
    a = torch.ones(1, rank, d)
    kept = torch.tensor([[1.0 if j <= i else 0.0 for j in range(d)] for i in range(rank)])
    raw = [Fraction(d, i + 1) for i in range(rank)]
    q = sorted(raw)[position]
    assert q == Fraction(d, d - position)
    expected = torch.tensor([float(max(s, q)) for s in raw], dtype=torch.float64)
    engine = complementary_scale(a, kept[None], scale_quantile)[0]
    _close(engine, expected, "engine s~")
    _close(torch.tensor(ref.complementary_scale(a[0], kept, scale_quantile)), expected, "oracle")
    assert int((engine == engine.min()).sum()) == position + 1
    assert len(set(engine.tolist())) == rank - position


def test_scale_of_rows_and_zero_row() -> None:
    # From the module's data: s_1 = [9/8, 4/3]; s_2 = [0/0 := 1, 11/10]; unfloored here.
    stack = torch.tensor([A1, A2])
    pruned = torch.tensor([A1_PRUNED, A2_PRUNED])
    expected = torch.tensor([[9 / 8, 4 / 3], [1.0, 11 / 10]], dtype=torch.float64)
    _close(complementary_scale(stack, pruned, None), expected, "engine s")
    oracle = [ref.complementary_scale(stack[t], pruned[t], None) for t in range(2)]
    _close(torch.tensor(oracle), expected, "oracle s")


def test_fully_pruned_nonzero_row_gets_scale_one() -> None:
    # Row 1 has mass (0.1 + 0.2 = 0.3) but every entry is pruned: kept = 0. The release would
    # divide 0.3 / 0 = inf (then inf / inf = NaN in B); the spec defines s = 1 for a row whose
    # kept entries sum to zero, and both the engine and the oracle do so.
    a = torch.tensor([[5.0, -6.0], [0.1, 0.2]])
    # n = 4, keep_ratio 0.25: k = floor(4 * 0.75) = 3, |a| sorted 0.1 0.2 5 6 -> tau = 5:
    # keeps 5 and -6 only.
    pruned = a * magnitude_mask(a[None], 0.25)[0]
    assert torch.equal(pruned, torch.tensor([[5.0, -6.0], [0.0, 0.0]]))
    # s[0] = 11 / 11 = 1, s[1] = 0.3 / 0 := 1.
    assert complementary_scale(a[None], pruned[None], None).tolist() == [[1.0, 1.0]]
    assert ref.complementary_scale(a, pruned, None) == [1.0, 1.0]
    merged = merge_lora([{A_KEY: a, B_KEY: torch.ones(2, 2)}] * 2, keep_ratio=0.25)
    assert all(bool(torch.isfinite(v).all()) for v in merged.values())


# --- steps 3-5 through the public API ---------------------------------------------------------


def test_merge_with_floor_default_quantile() -> None:
    # scale_quantile 0.2, r = 2: floor position min(floor(2 * 0.8), 1) = 1 = the larger s, so
    #   s~_1 = [4/3, 4/3],  s~_2 = [11/10, 11/10].
    # lambda_t = 2 * T * (1/2) = 2 for both tasks.
    # A_m = 2 (A^_1 + A^_2) = 2 [[6, -2, 0, 0], [2, -9, 3, 2]] = [[12, -4, 0, 0], [4, -18, 6, 4]]
    # B_m[:, i] = 2 (s~_1 B^_1[:, i] + s~_2 B^_2[:, i]) / (s~_1 + s~_2); with s~_1 + s~_2 =
    # 40/30 + 33/30 = 73/30 the task shares are 40/73 and 33/73:
    #   col 0: 2/73 (40 [0, 0, -5] + 33 [2, -2, 7]) = 2/73 [66, -66, 31] = [132, -132, 62] / 73
    #   col 1: 2/73 (40 [0, 4, 6] + 33 [2, 0, 0]) = 2/73 [66, 160, 240] = [132, 320, 480] / 73
    # Head: mean([1, 2], [3, 8]) = [2, 5] (no lambda).
    merged = merge_lora(_adapters(), keep_ratio=0.25, scale_quantile=0.2, fuse_weight=2.0)
    expected_a = torch.tensor([[12.0, -4, 0, 0], [4, -18, 6, 4]])
    expected_b = torch.tensor([[132.0, 132], [-132, 320], [62, 480]]) / 73
    expected_head = torch.tensor([2.0, 5.0])
    assert list(merged) == [A_KEY, B_KEY, HEAD]
    _close(merged[A_KEY], expected_a, "A_m")
    _close(merged[B_KEY], expected_b, "B_m")
    _close(merged[HEAD], expected_head, "head")
    oracle = _oracle(_adapters(), keep_ratio=0.25, scale_quantile=0.2, fuse_weight=2.0)
    _close(oracle[A_KEY], expected_a, "oracle A_m")
    _close(oracle[B_KEY], expected_b, "oracle B_m")
    _close(oracle[HEAD], expected_head, "oracle head")


def test_merge_without_effective_floor() -> None:
    # scale_quantile 0.6: position floor(2 * 0.4) = 0 = the smaller s, so s~ = s:
    #   s~_1 = [9/8, 4/3],  s~_2 = [1, 11/10].
    # col 0: shares (9/8) / (17/8) = 9/17 and 1 / (17/8) = 8/17:
    #   2/17 (9 [0, 0, -5] + 8 [2, -2, 7]) = 2/17 [16, -16, 11] = [32, -32, 22] / 17
    # col 1: as before (same s~ for rank direction 1): [132, 320, 480] / 73
    merged = merge_lora(_adapters(), keep_ratio=0.25, scale_quantile=0.6)
    expected_b = torch.stack(
        [torch.tensor([32.0, -32, 22]) / 17, torch.tensor([132.0, 320, 480]) / 73], dim=1
    )
    _close(merged[B_KEY], expected_b, "B_m")
    _close(merged[A_KEY], torch.tensor([[12.0, -4, 0, 0], [4, -18, 6, 4]]), "A_m")
    _close(_oracle(_adapters(), keep_ratio=0.25, scale_quantile=0.6)[B_KEY], expected_b, "oracle")


def test_keep_ratio_one_keeps_everything() -> None:
    # Nothing pruned: every s = (sum |A|) / (sum |A|) = 1 (and 0/0 := 1), the floor is 1.
    # A_m = 2 (A_1 + A_2) = 2 [[6, -2, 1, 0], [3, -9, 4, 3]]
    # B_m = 2 (1 B_1 + 1 B_2) / (1 + 1) = B_1 + B_2 = [[3, 0], [1, 5], [2, 6]]
    merged = merge_lora(_adapters(), keep_ratio=1.0)
    expected_a = torch.tensor([[12.0, -4, 2, 0], [6, -18, 8, 6]])
    expected_b = torch.tensor([[3.0, 0], [1, 5], [2, 6]])
    _close(merged[A_KEY], expected_a, "A_m")
    _close(merged[B_KEY], expected_b, "B_m")
    _close(_oracle(_adapters(), keep_ratio=1.0)[B_KEY], expected_b, "oracle B_m")


def test_per_adapter_fuse_weights() -> None:
    # fuse_weight (1, 3), equal weights: lambda = (1 * 2 * 1/2, 3 * 2 * 1/2) = (1, 3).
    # A_m = 1 A^_1 + 3 A^_2 = [[6, -2, 0, 0], [2, -4 - 15, 9, 6]] = [[6, -2, 0, 0], [2, -19, 9, 6]]
    # scale_quantile 0.6 (no floor): s~_1 = [9/8, 4/3], s~_2 = [1, 11/10].
    # col 0: (9/8 * 1 * [0, 0, -5] + 1 * 3 * [2, -2, 7]) / (17/8)
    #      = 8/17 [6, -6, 21 - 45/8] = 8/17 [6, -6, 123/8] = [48, -48, 123] / 17
    # col 1: (4/3 * 1 * [0, 4, 6] + 11/10 * 3 * [2, 0, 0]) / (73/30)
    #      = 30/73 [33/5, 16/3, 8] = [198, 160, 240] / 73
    # Head: the plain mean [2, 5]; fuse weights do not touch non-LoRA tensors.
    merged = merge_lora(_adapters(), keep_ratio=0.25, scale_quantile=0.6, fuse_weight=(1.0, 3.0))
    expected_a = torch.tensor([[6.0, -2, 0, 0], [2, -19, 9, 6]])
    expected_b = torch.stack(
        [torch.tensor([48.0, -48, 123]) / 17, torch.tensor([198.0, 160, 240]) / 73], dim=1
    )
    _close(merged[A_KEY], expected_a, "A_m")
    _close(merged[B_KEY], expected_b, "B_m")
    _close(merged[HEAD], torch.tensor([2.0, 5.0]), "head")
    oracle = _oracle(_adapters(), keep_ratio=0.25, scale_quantile=0.6, fuse_weight=(1.0, 3.0))
    _close(oracle[A_KEY], expected_a, "oracle A_m")
    _close(oracle[B_KEY], expected_b, "oracle B_m")


def test_weights_reshape_lambda() -> None:
    # weights (1, 3), fuse 2: p = (1/4, 3/4), lambda_t = 2 * T * p_t = (1, 3): the same LoRA
    # factors as fuse_weight (1, 3) above. The head is now the weighted mean:
    # 1/4 [1, 2] + 3/4 [3, 8] = [10/4, 26/4] = [2.5, 6.5].
    weighted = merge_lora(_adapters(), weights=[1.0, 3.0], keep_ratio=0.25, scale_quantile=0.6)
    fused = merge_lora(_adapters(), keep_ratio=0.25, scale_quantile=0.6, fuse_weight=(1.0, 3.0))
    _close(weighted[A_KEY], fused[A_KEY], "A_m")
    _close(weighted[B_KEY], fused[B_KEY], "B_m")
    _close(weighted[HEAD], torch.tensor([2.5, 6.5]), "head")
    oracle = _oracle(_adapters(), keep_ratio=0.25, scale_quantile=0.6, weights=[1.0, 3.0])
    _close(oracle[B_KEY], fused[B_KEY], "oracle B_m")
    _close(oracle[HEAD], torch.tensor([2.5, 6.5]), "oracle head")


def test_weights_and_fuse_weights_combine() -> None:
    # fuse (1, 3), weights (3, 1): p = (3/4, 1/4), lambda = (1 * 2 * 3/4, 3 * 2 * 1/4) = (1.5, 1.5)
    # -> the same as one shared lambda of 1.5: A_m = 1.5 (A^_1 + A^_2).
    merged = merge_lora(
        _adapters(), weights=[3.0, 1.0], keep_ratio=0.25, scale_quantile=0.6, fuse_weight=(1, 3)
    )
    shared = merge_lora(_adapters(), keep_ratio=0.25, scale_quantile=0.6, fuse_weight=1.5)
    _close(merged[A_KEY], 1.5 * torch.tensor([[6.0, -2, 0, 0], [2, -9, 3, 2]]), "A_m")
    _close(merged[B_KEY], shared[B_KEY], "B_m")
    # Weights are relative: (3, 1) and (0.3, 0.1) give the same merge.
    scaled = merge_lora(
        _adapters(), weights=[0.3, 0.1], keep_ratio=0.25, scale_quantile=0.6, fuse_weight=(1, 3)
    )
    for key in merged:
        _close(scaled[key], merged[key], key)


def test_pairing_is_by_module_name_not_key_order() -> None:
    # The release pairs A with B by dictionary order; here B comes first and a second module is
    # interleaved. The result must equal the merge of the tidy dicts.
    other_a, other_b = ref.lora_keys("base_model.model.layer.1.attention.value")
    tidy = _adapters()
    for adapter, scale in zip(tidy, (1.0, -2.0), strict=True):
        adapter[other_a] = torch.tensor(A1) * scale
        adapter[other_b] = torch.tensor(B2) * scale
    shuffled = [
        {key: adapter[key] for key in (other_b, B_KEY, HEAD, A_KEY, other_a)} for adapter in tidy
    ]
    want = merge_lora(tidy, keep_ratio=0.25)
    got = merge_lora(shuffled, keep_ratio=0.25)
    assert list(got) == list(shuffled[0])
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_module_with_zero_scale_sum_has_no_nan() -> None:
    # All-zero A and B for both tasks: every s = 0/0 := 1, B_m = 2 (1 * 0 + 1 * 0) / 2 = 0.
    zeros = [{A_KEY: torch.zeros(2, 4), B_KEY: torch.zeros(3, 2)} for _ in range(2)]
    merged = merge_lora(zeros)
    assert torch.equal(merged[A_KEY], torch.zeros(2, 4))
    assert torch.equal(merged[B_KEY], torch.zeros(3, 2))
