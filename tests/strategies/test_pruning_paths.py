"""The merge's fast paths, bit for bit against the plain torch reading they replace.

Oracles: ``stack * (|stack| >= tau)`` with tau from ``torch.kthvalue`` (the straightforward
reading of the spec's step 1), ``stack.abs().sum(-1)`` for the row masses, and
``b * c[:, None, :]`` for the column scaling of B; compared as integer bit patterns, so even the
sign of a zero counts. Both threshold paths run: NumPy's partition and ``kth_smallest`` (rows
with a heavy tie, rows longer than ``PARTITION_MAX_LENGTH``). Then the finiteness check that
moved from the inputs to the stacks and, for paper-exact RobustMerge, to the merged pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from unittest import mock

import pytest
import torch

from strategies import MergeInputError, merge_lora
from strategies.merging import pruning
from strategies.merging.pruning import (
    magnitude_threshold,
    prune_by_magnitude,
    prune_with_row_mass,
)
from strategies.merging.robustmerge import RobustMerge, _scale_columns
from strategies.merging.threshold import INTEGER_VIEW
from tests.strategies import reference_spec as ref

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def bits(values: torch.Tensor) -> torch.Tensor:
    return values.view(INTEGER_VIEW[values.dtype])


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor, context: str) -> None:
    assert actual.dtype == expected.dtype, f"{context}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{context}: shape {actual.shape} != {expected.shape}"
    assert torch.equal(bits(actual), bits(expected)), f"{context}: bit patterns differ"


def reference_prune(stack: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Spec step 1 read literally: tau = torch.kthvalue of each task's flattened |X|."""
    flat = stack.abs().reshape(stack.shape[0], -1)
    k = math.floor(flat.shape[1] * (1.0 - keep_ratio))
    if k == 0:
        return stack.clone()
    tau = torch.kthvalue(flat, k, dim=1).values
    return stack * (stack.abs() >= tau.reshape((-1,) + (1,) * (stack.dim() - 1)))


def _normal(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


def _heavy_zero_tie(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """85 % exact zeros, half of them -0.0: the tie NumPy's quickselect is slow on."""
    values = torch.randn(shape, generator=generator)
    zero = torch.rand(shape, generator=generator) < 0.85
    signed_zero = torch.where(values < 0, torch.tensor(-0.0), torch.tensor(0.0))
    return torch.where(zero, signed_zero, values)


def _coarse(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Few distinct magnitudes (ties everywhere, none heavy enough to leave the fast path)."""
    return (torch.randn(shape, generator=generator) * 64).round() / 64


def _extremes(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Ordinary values with subnormals, signed zeros and infinities mixed in."""
    values = torch.randn(shape, generator=generator)
    flat = values.view(-1)
    picks = torch.randperm(flat.numel(), generator=generator)[:40]
    flat[picks[:10]] = 1e-40
    flat[picks[10:20]] = -0.0
    flat[picks[20:25]] = float("inf")
    flat[picks[25:30]] = float("-inf")
    return values


KINDS: dict[str, Callable[[tuple[int, ...], torch.Generator], torch.Tensor]] = {
    "normal": _normal,
    "heavy zero tie": _heavy_zero_tie,
    "coarse": _coarse,
    "extremes": _extremes,
}
# (T, r, d): rows from below DIRECT_LENGTH to LoRA-sized, an odd length, T = 1.
SHAPES = ((3, 4, 33), (8, 16, 512), (2, 16, 4099), (1, 16, 4096))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("keep_ratio", [0.2, 0.5, 0.999, 1.0])
def test_prune_and_row_masses_match_the_plain_reading(
    dtype: torch.dtype, kind: str, shape: tuple[int, int, int], keep_ratio: float
) -> None:
    generator = torch.Generator().manual_seed(sum(shape) + int(keep_ratio * 1000))
    stack = KINDS[kind](shape, generator).to(dtype)
    if dtype in (torch.float16, torch.bfloat16) and kind == "extremes":
        stack = torch.nan_to_num(stack, posinf=float("inf"), neginf=float("-inf"))
    context = f"{kind} {tuple(shape)} {dtype} keep {keep_ratio}"
    expected = reference_prune(stack, keep_ratio)
    assert_same_bits(prune_by_magnitude(stack, keep_ratio), expected, context)
    pruned, total, kept = prune_with_row_mass(stack, keep_ratio)
    assert_same_bits(pruned, expected, context + " (row mass)")
    assert_same_bits(total, stack.abs().sum(dim=-1), context + " total")
    assert_same_bits(kept, expected.abs().sum(dim=-1), context + " kept")


@pytest.mark.parametrize("path", ["partition", "kth_smallest"])
def test_both_threshold_paths_are_exact(path: str) -> None:
    """Force each path on the same data: a length cap of 0 sends every row to kth_smallest."""
    generator = torch.Generator().manual_seed(7)
    stack = torch.randn(4, 16, 11_008, generator=generator)
    cap = pruning.PARTITION_MAX_LENGTH if path == "partition" else 0
    with mock.patch.object(pruning, "PARTITION_MAX_LENGTH", cap):
        pruned, _total, kept = prune_with_row_mass(stack, 0.2)
        flat = stack.abs().reshape(4, -1)
        k = math.floor(flat.shape[1] * 0.8)
        tau = magnitude_threshold(flat, k)
    assert_same_bits(tau, torch.kthvalue(flat, k, dim=1).values, path)
    assert_same_bits(pruned, reference_prune(stack, 0.2), path)
    assert_same_bits(kept, pruned.abs().sum(dim=-1), path)


def test_a_heavy_tie_is_spotted_and_a_light_one_is_not() -> None:
    generator = torch.Generator().manual_seed(3)
    heavy = _heavy_zero_tie((2, 65_536), generator).abs()
    light = torch.randn(2, 65_536, generator=generator).abs()
    assert pruning._heavy_tie(heavy.view(torch.int32).numpy())
    assert not pruning._heavy_tie(light.view(torch.int32).numpy())


def test_prune_leaves_its_input_alone() -> None:
    generator = torch.Generator().manual_seed(5)
    stack = torch.randn(8, 16, 4096, generator=generator)
    before = stack.clone()
    prune_by_magnitude(stack, 0.2)
    prune_with_row_mass(stack, 0.2)
    assert_same_bits(stack, before, "input after pruning")


@pytest.mark.parametrize("d_out", [1, 7, 16, 4099, 11_008])
@pytest.mark.parametrize("in_place", [False, True])
def test_scale_columns_is_the_broadcast_product(d_out: int, in_place: bool) -> None:
    generator = torch.Generator().manual_seed(d_out)
    b = torch.randn(5, d_out, 16, generator=generator)
    coefficients = torch.rand(5, 16, generator=generator) * 3 - 1
    expected = b * coefficients[:, None, :]
    before = b.clone()
    actual = _scale_columns(b, coefficients, in_place=in_place)
    assert_same_bits(actual, expected, f"d_out {d_out}")
    if not in_place:
        assert_same_bits(b, before, "input of the copying form")


def test_only_paper_exact_declares_that_non_finite_values_propagate() -> None:
    assert RobustMerge().propagates_non_finite()
    assert not RobustMerge(mode="paper-equation").propagates_non_finite()


def _adapters(count: int = 3) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(count)
    adapters = []
    for _ in range(count):
        adapter: dict[str, torch.Tensor] = {}
        for layer in range(2):
            a_key, b_key = ref.lora_keys(f"base_model.model.layer.{layer}.attention.query")
            adapter[a_key] = torch.randn(4, 300, generator=generator)
            adapter[b_key] = torch.randn(200, 4, generator=generator)
        adapters.append(adapter)
    return adapters


@pytest.mark.parametrize("mode", ["paper-exact", "paper-equation"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("factor", ["A", "B"])
def test_a_non_finite_entry_in_a_later_module_is_refused_and_located(
    mode: str, value: float, factor: str
) -> None:
    adapters = _adapters()
    a_key, b_key = ref.lora_keys("base_model.model.layer.1.attention.query")
    key = a_key if factor == "A" else b_key
    broken = adapters[2][key].clone()
    broken.view(-1)[17] = value
    adapters[2][key] = broken
    with pytest.raises(MergeInputError, match="non-finite") as info:
        merge_lora(adapters, "robustmerge", mode=mode)
    assert info.value.adapter == 2
    assert info.value.key == key


def test_a_float64_entry_too_large_for_float32_is_still_accepted() -> None:
    """Finite inputs are accepted as before, even when the float32 merge overflows."""
    adapters = [
        {key: value.to(torch.float64) for key, value in adapter.items()} for adapter in _adapters()
    ]
    a_key, _ = ref.lora_keys("base_model.model.layer.0.attention.query")
    adapters[1][a_key].view(-1)[3] = 1e300
    merged = merge_lora(adapters, "robustmerge")
    assert not bool(torch.isfinite(merged[a_key]).all())
