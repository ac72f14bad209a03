"""The pruning threshold and the bit-pattern pruning, bit for bit against the plain torch reading.

Oracles: ``torch.kthvalue(values, k, dim=1).values`` for ``kth_smallest`` (compared as integer
bit patterns, so even the sign of a zero counts), and ``stack * (|stack| >= tau)`` with tau from
``torch.kthvalue`` for ``prune_by_magnitude`` / ``magnitude_mask`` (the code they replaced).
Data: ordinary, heavy-tailed, tied, constant, zero, subnormal and infinite magnitudes, row
lengths from 1 to 16 x 11008, every interesting k, and inputs built so that the sample-based
bracket misses and the fallback must run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.merging import threshold
from strategies.merging.pruning import magnitude_mask, prune_by_magnitude
from strategies.merging.threshold import (
    DIRECT_LENGTH,
    INTEGER_VIEW,
    kth_smallest,
    kth_smallest_with_fallbacks,
)

# Row lengths: tiny, both sides of the direct-kthvalue cut-off, LoRA-sized.
LENGTHS = (1, 2, 3, 17, DIRECT_LENGTH, DIRECT_LENGTH + 1, 20_000, 65_536)
LORA_ROW = 16 * 11_008  # one task's 16 x 11008 (or 11008 x 16) LoRA factor, flattened


def bits(values: torch.Tensor) -> torch.Tensor:
    """The IEEE bit patterns of a float tensor, as integers of the same width."""
    return values.view(INTEGER_VIEW[values.dtype])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, context: str) -> None:
    """Equal dtype, shape and bit patterns; the message names the case and the first mismatch."""
    assert actual.dtype == expected.dtype, f"{context}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{context}: shape {actual.shape} != {expected.shape}"
    if actual.dtype == torch.bool:
        same = torch.equal(actual, expected)
    else:
        same = torch.equal(bits(actual), bits(expected))
    if not same:
        where = (
            (actual != expected) if actual.dtype == torch.bool else bits(actual) != bits(expected)
        )
        first = tuple(int(i) for i in where.nonzero()[0])
        raise AssertionError(
            f"{context}: first mismatch at {first}: got {actual[first].item()!r}, "
            f"expected {expected[first].item()!r}"
        )


PATHS = ("numpy", "torch")


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test through the CPU (NumPy) path and through the torch path that CUDA uses."""
    with mock.patch.object(threshold, "NUMPY_ON_CPU", request.param == "numpy"):
        yield str(request.param)


def reference_kth(values: torch.Tensor, k: int) -> torch.Tensor:
    return torch.kthvalue(values, k, dim=1).values


def ks_for(length: int) -> list[int]:
    """k = 1, 2, the middle, the pruning rank at keep ratio 0.2, n - 1, n (those in [1, n])."""
    candidates = {1, 2, (length + 1) // 2, math.floor(length * 0.8), length - 1, length}
    return sorted(k for k in candidates if 1 <= k <= length)


def magnitudes(kind: str, count: int, length: int, seed: int) -> torch.Tensor:
    """T x n non-negative float32 rows of one distribution family."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(count, length, generator=g).abs()
    if kind == "uniform":
        return torch.rand(count, length, generator=g)
    if kind == "log-wide":  # magnitudes spread over ~40 octaves
        return torch.exp(torch.randn(count, length, generator=g) * 6.0)
    if kind == "small-integers":  # 5 distinct values: every threshold is a heavy tie
        return torch.randint(0, 5, (count, length), generator=g).float()
    if kind == "bf16-rounded":  # the ties of bf16 adapters upcast to float32
        return torch.randn(count, length, generator=g).abs().bfloat16().float()
    if kind == "constant":
        return torch.full((count, length), 3.25)
    if kind == "zeros":
        return torch.zeros(count, length)
    if kind == "mostly-zeros":  # 90 % exact zeros: the 80 % threshold is 0
        values = torch.rand(count, length, generator=g)
        return values * (torch.rand(count, length, generator=g) < 0.1)
    if kind == "sorted":
        return torch.linspace(0.0, 1.0, length).repeat(count, 1)
    if kind == "column-periodic":  # a flattened d_out x 16 factor with very different columns
        scales = torch.logspace(-6, 2, 16)
        rows = torch.randn(count, length, generator=g).abs()
        return rows * scales.repeat(length // 16 + 1)[:length]
    if kind == "subnormal":
        return torch.rand(count, length, generator=g) * 1e-40
    if kind == "with-inf":
        values = torch.randn(count, length, generator=g).abs()
        values[torch.rand(count, length, generator=g) < 0.05] = math.inf
        return values
    raise ValueError(kind)


KINDS = (
    "normal",
    "uniform",
    "log-wide",
    "small-integers",
    "bf16-rounded",
    "constant",
    "zeros",
    "mostly-zeros",
    "sorted",
    "column-periodic",
    "subnormal",
    "with-inf",
)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_kthvalue(kind: str, length: int, path: str) -> None:
    for count, seed in ((1, 0), (3, 1)):
        values = magnitudes(kind, count, length, seed)
        for k in ks_for(length):
            actual = kth_smallest(values, k)
            assert_same_bits(actual, reference_kth(values, k), f"{kind} T={count} n={length} k={k}")


@pytest.mark.parametrize("seed", range(8))
def test_matches_kthvalue_on_lora_sized_rows(seed: int, path: str) -> None:
    """Eight clients' 16 x 11008 factors, the shape the LLaMA-7B MLP produces."""
    values = magnitudes(("normal", "log-wide")[seed % 2], 8, LORA_ROW, seed)
    k = math.floor(LORA_ROW * 0.8)
    actual, fallbacks = kth_smallest_with_fallbacks(values, k)
    assert_same_bits(actual, reference_kth(values, k), f"seed {seed}")
    assert fallbacks <= 1, "ordinary data should almost never miss the bracket"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype: torch.dtype) -> None:
    values = magnitudes("normal", 3, 20_000, 5).to(dtype)
    for k in ks_for(20_000):
        assert_same_bits(kth_smallest(values, k), reference_kth(values, k), f"{dtype} k={k}")


def test_non_contiguous_rows() -> None:
    """A transposed view (rows with stride T) gives the same answer as its contiguous copy."""
    values = magnitudes("normal", 20_000, 4, 2).t()
    assert not values.is_contiguous()
    k = 16_000
    assert_same_bits(kth_smallest(values, k), reference_kth(values.contiguous(), k), "transposed")


def test_nan_sorts_last_like_kthvalue() -> None:
    values = magnitudes("normal", 2, 20_000, 3)
    values[:, ::3] = math.nan
    for k in (10, 13_000, 13_400, 19_999):
        actual = kth_smallest(values, k)
        expected = reference_kth(values, k)
        assert torch.equal(actual.isnan(), expected.isnan()), f"k={k}"
        assert torch.equal(actual.nan_to_num(), expected.nan_to_num()), f"k={k}"


def sampled_positions(length: int) -> torch.Tensor:
    size = min(threshold.SAMPLE_SIZE, length)
    return threshold._sample_positions(length, size, torch.device("cpu"))


def misleading_rows(count: int, length: int, k: int, offset: int) -> torch.Tensor:
    """Rows whose sample is dense where the data is empty, so the bracket must miss.

    Every sampled entry gets a value in [2, 3), evenly spaced in sample order; the other
    entries are drawn from [1, 2) and [3, 4), with ``k - c + offset`` of them below 2 (c: the
    sample rank of the target). The pivot (the sample's c-th smallest) then sits about
    ``offset`` ranks from the answer, while its neighbours in the sample, where the bounds go,
    are only one rank apart each: every bound lands short of the answer.
    """
    positions = sampled_positions(length)
    size = positions.numel()
    others = torch.ones(length, dtype=torch.bool)
    others[positions] = False
    centre = round(k * (size + 1) / (length + 1))
    below = k - centre + offset
    g = torch.Generator().manual_seed(7)
    values = torch.empty(count, length)
    for row in range(count):
        low = 1.0 + torch.rand(below, generator=g)
        high = 3.0 + torch.rand(int(others.sum()) - below, generator=g)
        mixed = torch.cat([low, high])
        values[row, others] = mixed[torch.randperm(mixed.numel(), generator=g)]
        values[row, positions] = 2.0 + torch.arange(size, dtype=torch.float32) / size
    return values


@pytest.mark.parametrize("offset", [-500, 500])
def test_fallback_runs_when_the_sample_misleads(offset: int, path: str) -> None:
    length, k = 30_000, 24_000
    values = misleading_rows(4, length, k, offset)
    actual, fallbacks = kth_smallest_with_fallbacks(values, k)
    assert fallbacks == 4, f"expected every row to fall back, got {fallbacks}"
    assert_same_bits(actual, reference_kth(values, k), f"misleading sample, {path}")


def test_fallback_only_for_the_rows_that_miss(path: str) -> None:
    length, k = 30_000, 24_000
    values = magnitudes("uniform", 3, length, 8) + 1.0
    values[1] = misleading_rows(1, length, k, 500)[0]
    actual, fallbacks = kth_smallest_with_fallbacks(values, k)
    assert fallbacks == 1
    assert_same_bits(actual, reference_kth(values, k), f"one misleading row, {path}")


def test_answer_beyond_the_sample(path: str) -> None:
    """All sampled entries are 0 and the rest positive: the answer lies beyond every sampled
    value. The NumPy path then bounds that side by the row's end (no fallback needed); the
    torch path's bracket collapses onto 0 and falls back. Both stay exact."""
    length = 30_000
    values = magnitudes("uniform", 4, length, 9) + 1.0
    values[:, sampled_positions(length)] = 0.0
    for k in (24_000, 15_000):
        actual, fallbacks = kth_smallest_with_fallbacks(values, k)
        assert fallbacks == (0 if path == "numpy" else 4)
        assert_same_bits(actual, reference_kth(values, k), f"beyond the sample, {path} k={k}")


def test_rows_that_tie_with_the_pivot(path: str) -> None:
    """Constant and all-zero rows (and a 90 %-zero row) are answered without a fallback."""
    values = torch.cat([torch.zeros(1, 50_000), torch.full((1, 50_000), 0.5)])
    values = torch.cat([values, magnitudes("mostly-zeros", 1, 50_000, 4)])
    values = torch.cat([values, magnitudes("normal", 1, 50_000, 4)])
    for k in ks_for(50_000):
        actual, fallbacks = kth_smallest_with_fallbacks(values, k)
        assert fallbacks == 0
        assert_same_bits(actual, reference_kth(values, k), f"ties with the pivot, {path} k={k}")


@pytest.mark.parametrize("kind", ["normal", "bf16-rounded"])
def test_k_at_and_next_to_sampled_entries(kind: str, path: str) -> None:
    """The bracket's bounds (pivot, far bound, lo, hi) are sampled entries: make the answer a
    sampled entry or its neighbour in rank, for every sampled entry near the target rank."""
    length, centre_k = 20_000, 16_000
    values = magnitudes(kind, 2, length, 12)
    ordered = values[0].sort().values
    sampled = values[0, sampled_positions(length)].sort().values
    ranks = torch.searchsorted(ordered, sampled, right=True)  # rank of each sampled entry
    near = ranks[(ranks - centre_k).abs() < 1_000].tolist()
    assert len(near) > 20
    for rank in near:
        for k in (rank - 1, rank, rank + 1):
            expected = reference_kth(values, k)
            assert_same_bits(kth_smallest(values, k), expected, f"{kind} {path} k={k}")


def test_narrowest_bracket_stays_exact(path: str) -> None:
    """With no margin the bracket misses often; whatever happens must stay exact."""
    fallbacks = 0
    with mock.patch.object(threshold, "BRACKET_WIDTH", 0.0):
        for seed in range(6):
            values = magnitudes(("normal", "small-integers")[seed % 2], 4, 12_000, seed)
            for k in range(8_000, 12_000, 331):
                actual, missed = kth_smallest_with_fallbacks(values, k)
                assert_same_bits(actual, reference_kth(values, k), f"seed {seed} k={k}")
                fallbacks += missed
    assert fallbacks > 0, "a zero-width bracket should have missed at least once"


@pytest.mark.parametrize("length", [1, 2])
def test_tiny_rows(length: int) -> None:
    values = torch.tensor([[0.0, 1.0], [2.0, 2.0], [5.0, 0.5]])[:, :length]
    for k in range(1, length + 1):
        assert_same_bits(kth_smallest(values, k), reference_kth(values, k), f"n={length} k={k}")


def test_rejects_bad_arguments() -> None:
    values = torch.rand(2, 10)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        kth_smallest(values, 0)
    with pytest.raises(ValueError, match=r"k must be in \[1, 10\]"):
        kth_smallest(values, 11)
    with pytest.raises(ValueError, match="T x n"):
        kth_smallest(torch.rand(10), 1)


def test_integer_rows_use_kthvalue() -> None:
    values = torch.randint(0, 7, (3, 20_000), generator=torch.Generator().manual_seed(3))
    for k in (1, 16_000, 20_000):
        assert torch.equal(kth_smallest(values, k), reference_kth(values, k))


@st.composite
def rows_and_k(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    count = draw(st.integers(1, 3))
    length = draw(st.integers(1, 40))
    entry = st.floats(0.0, 1e6, width=32, allow_subnormal=True) | st.sampled_from(
        [0.0, 1.0, 2.0, math.inf]
    )
    row = st.lists(entry, min_size=length, max_size=length)
    rows = draw(st.lists(row, min_size=count, max_size=count))
    return torch.tensor(rows, dtype=torch.float32), draw(st.integers(1, length))


@settings(max_examples=400, deadline=None)
@given(
    case=rows_and_k(),
    width=st.sampled_from([0.0, 0.5, 3.0]),
    size=st.integers(1, 12),
    use_numpy=st.booleans(),
)
def test_property_every_path_on_small_rows(
    case: tuple[torch.Tensor, int], width: float, size: int, use_numpy: bool
) -> None:
    """Shrink the cut-off and the sample so tiny rows run every branch of both paths (pivot
    ties, collapsed bracket, a side with no bound, fallback); the answer must always be
    torch.kthvalue's, bit for bit."""
    values, k = case
    settings_patch: dict[str, float | int | bool] = {
        "DIRECT_LENGTH": 0,
        "SAMPLE_SIZE": size,
        "BRACKET_WIDTH": width,
        "NUMPY_ON_CPU": use_numpy,
    }
    with mock.patch.multiple(threshold, **settings_patch):
        actual = kth_smallest(values, k)
    assert_same_bits(actual, reference_kth(values, k), f"k={k} values={values.tolist()}")


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(KINDS),
    length=st.integers(DIRECT_LENGTH + 1, 40_000),
    fraction=st.floats(0.0, 1.0),
)
def test_property_full_size_rows(seed: int, kind: str, length: int, fraction: float) -> None:
    values = magnitudes(kind, 2, length, seed)
    k = min(max(1, math.floor(length * fraction)), length)
    assert_same_bits(kth_smallest(values, k), reference_kth(values, k), f"{kind} n={length} k={k}")


# --- pruning on bit patterns (pruning.py) against the float reading it replaced ---------------


def reference_mask(stack: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    size = math.prod(stack.shape[1:])
    k = math.floor(size * (1.0 - keep_ratio))
    if k == 0:
        return torch.ones_like(stack, dtype=torch.bool)
    magnitude = stack.abs()
    tau = torch.kthvalue(magnitude.reshape(stack.shape[0], -1), k, dim=1).values
    return magnitude >= tau.reshape((-1,) + (1,) * (stack.dim() - 1))


def signed_stack(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    count, length = shape[0], math.prod(shape[1:])
    g = torch.Generator().manual_seed(seed + 1)
    signs = torch.where(torch.rand(count, length, generator=g) < 0.5, -1.0, 1.0)
    return (magnitudes(kind, count, length, seed) * signs).reshape(shape)


PRUNE_SHAPES = [(2, 5), (3, 16, 40), (4, 300, 16), (2, 16, 4096), (8, 4096, 16)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", PRUNE_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["normal", "small-integers", "mostly-zeros", "zeros", "with-inf"])
def test_pruning_matches_float_reading(
    kind: str, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    stack = signed_stack(kind, shape, 11).to(dtype)
    stack.view(-1)[0] = -0.0  # a negative zero must stay -0.0, as x * mask leaves it
    for keep_ratio in (0.2, 0.5, 1.0, 1e-9):
        expected_mask = reference_mask(stack, keep_ratio)
        context = f"{kind} {shape} {dtype} keep {keep_ratio}"
        assert_same_bits(magnitude_mask(stack, keep_ratio), expected_mask, context)
        assert_same_bits(prune_by_magnitude(stack, keep_ratio), stack * expected_mask, context)


def test_pruning_integer_stacks_as_before() -> None:
    """Not a merge input (merges run in float32), but the old code accepted it: keep it."""
    stack = torch.randint(-9, 10, (3, 40, 500), generator=torch.Generator().manual_seed(4))
    expected = reference_mask(stack, 0.2)
    assert torch.equal(magnitude_mask(stack, 0.2), expected)
    pruned = prune_by_magnitude(stack, 0.2)
    assert pruned.dtype == stack.dtype
    assert torch.equal(pruned, stack * expected)


def test_pruning_keeps_autograd_as_before() -> None:
    """A stack that requires grad still gets a differentiable product (gradient = the mask)."""
    stack = signed_stack("normal", (2, 16, 64), 5).requires_grad_()
    pruned = prune_by_magnitude(stack, 0.2)
    expected = reference_mask(stack.detach(), 0.2)
    assert_same_bits(pruned.detach(), stack.detach() * expected, "with grad")
    pruned.sum().backward()
    assert stack.grad is not None
    assert torch.equal(stack.grad, expected.float())


def test_pruned_negative_entries_become_negative_zero() -> None:
    stack = torch.tensor([[[-1.0, 4.0, -3.0, 0.5, -0.25, 2.0]]])
    pruned = prune_by_magnitude(stack, 0.5)  # n = 6, k = 3: tau = 1, keep |x| >= 1
    assert pruned.tolist() == [[[-1.0, 4.0, -3.0, 0.0, 0.0, 2.0]]]
    assert torch.signbit(pruned[0, 0]).tolist() == [True, False, True, False, True, False]
    assert_same_bits(pruned, stack * (stack.abs() >= 1.0), "signs")


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats(-1e4, 1e4, width=32), min_size=6, max_size=6), min_size=1, max_size=4
    ),
    keep_ratio=st.floats(1e-6, 1.0),
)
def test_property_pruning_bits(rows: list[list[float]], keep_ratio: float) -> None:
    stack = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 2, 3)
    expected = reference_mask(stack, keep_ratio)
    assert_same_bits(magnitude_mask(stack, keep_ratio), expected, f"{rows} {keep_ratio}")
    assert_same_bits(prune_by_magnitude(stack, keep_ratio), stack * expected, f"{rows}")


# --- CUDA --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["normal", "small-integers", "zeros", "with-inf", "log-wide"])
def test_cuda_matches_cpu(kind: str) -> None:
    for count, length in ((8, 65_536), (8, LORA_ROW), (3, 100), (2, 20_000)):
        values = magnitudes(kind, count, length, 21)
        for k in ks_for(length):
            on_gpu = kth_smallest(values.cuda(), k).cpu()
            assert_same_bits(on_gpu, reference_kth(values, k), f"cuda {kind} n={length} k={k}")
    stack = signed_stack(kind, (8, 4096, 16), 22)
    assert_same_bits(
        prune_by_magnitude(stack.cuda(), 0.2).cpu(), prune_by_magnitude(stack, 0.2), "cuda prune"
    )
    misled = magnitudes("uniform", 4, 30_000, 7) + 1.0
    misled[:, sampled_positions(30_000)] = 0.0
    actual, fallbacks = kth_smallest_with_fallbacks(misled.cuda(), 24_000)
    assert fallbacks == 4
    assert_same_bits(actual.cpu(), reference_kth(misled, 24_000), "cuda fallback")
