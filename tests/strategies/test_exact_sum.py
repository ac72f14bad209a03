"""ExactSum: bit-exact, order-independent sums (hand-checked, hypothesis, float64 parity)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.merging import exact_sum
from strategies.merging.exact_sum import ExactSum


def summed(terms: list[torch.Tensor], order: list[int] | None = None) -> torch.Tensor:
    total = ExactSum(terms[0].shape)
    for index in order if order is not None else range(len(terms)):
        total.add(terms[index])
    return total.value(torch.float32)


def test_a_cancelling_large_pair_keeps_the_small_term_that_float32_loses() -> None:
    big = torch.tensor([2.0**24], dtype=torch.float32)
    one = torch.tensor([1.0], dtype=torch.float32)
    naive = (big + one) - big  # float32 rounds 2^24 + 1 to 2^24
    assert float(naive) == 0.0
    assert float(summed([big, one, -big])) == 1.0
    assert float(summed([one, big, -big])) == 1.0


def test_hand_checked_small_sum_with_mixed_magnitudes() -> None:
    terms = [torch.tensor([0.5, -3.0]), torch.tensor([0.25, 1e-3]), torch.tensor([1024.0, 0.0])]
    assert summed(terms).tolist() == pytest.approx([1024.75, -2.999], abs=0, rel=1e-7)
    assert summed(terms).tolist()[0] == 1024.75  # exactly representable, so exact


def test_a_larger_term_arriving_late_gives_the_same_bits_as_arriving_first() -> None:
    small = torch.full((3,), 3.0e-7) * torch.tensor([1.0, -2.0, 3.0])
    large = torch.full((3,), 7.0e9)
    assert torch.equal(summed([small, small, large]), summed([large, small, small]))


def test_zeros_and_counts() -> None:
    total = ExactSum((2,))
    total.add(torch.zeros(2))
    total.add(torch.zeros(2))
    assert total.count == 2
    assert torch.equal(total.value(), torch.zeros(2, dtype=torch.float64))


def test_bad_terms_are_refused_with_the_reason() -> None:
    total = ExactSum((2,))
    with pytest.raises(ValueError, match="shape"):
        total.add(torch.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        total.add(torch.tensor([1.0, math.inf]))
    with pytest.raises(ValueError, match="finite"):
        total.add(torch.tensor([math.nan, 0.0]))


magnitudes = st.floats(min_value=-30, max_value=30)


@settings(max_examples=40, deadline=None)
@given(
    exponents=st.lists(magnitudes, min_size=2, max_size=12),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_any_order_gives_the_same_bits_and_the_float64_sum(
    exponents: list[float], seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    terms = [
        (torch.randn(17, generator=generator) * 2.0**exponent).to(torch.float32)
        for exponent in exponents
    ]
    first = summed(terms)
    order = list(range(len(terms)))
    random.Random(seed).shuffle(order)
    assert torch.equal(summed(terms, order), first)
    reference = [math.fsum(float(term[i]) for term in terms) for i in range(terms[0].shape[0])]
    expected = torch.tensor(reference, dtype=torch.float64).to(torch.float32)
    # Exact up to the window (>= 32 bits under the largest term) and one float32 rounding.
    largest = max(float(term.abs().max()) for term in terms)
    slack = largest * 2.0**-30 * len(terms)
    assert torch.allclose(first.double(), expected.double(), rtol=2**-23, atol=slack)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(min_value=1, max_value=9),
    columns=st.integers(min_value=1, max_value=5),
    chunk=st.integers(min_value=1, max_value=12),
    kind=st.sampled_from(["number", "per column", "per row"]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_a_factor_and_any_slicing_give_the_bits_of_the_premultiplied_float64_term(
    rows: int, columns: int, chunk: int, kind: str, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    terms = [
        (torch.randn(rows, columns, generator=generator) * 2.0 ** (8 * index - 8)).float()
        for index in range(3)
    ]
    shapes = {"per column": (columns,), "per row": (rows, 1)}
    factors: list[float | torch.Tensor] = [
        torch.rand(shapes[kind], generator=generator, dtype=torch.float64) * 3 + 0.1
        if kind in shapes
        else float(torch.rand(1, generator=generator)) * 3 + 0.1
        for _ in terms
    ]
    reference = ExactSum((rows, columns))
    for term, factor in zip(terms, factors, strict=True):
        reference.add(term.to(torch.float64) * factor)
    original = exact_sum.CHUNK_ENTRIES
    exact_sum.CHUNK_ENTRIES = chunk  # slices of a few rows: the bins are filled slice by slice
    try:
        sliced = ExactSum((rows, columns))
        for term, factor in zip(terms, factors, strict=True):
            sliced.add(term, factor)
    finally:
        exact_sum.CHUNK_ENTRIES = original
    assert torch.equal(sliced.value(), reference.value())


def test_a_factor_that_overflows_the_term_is_refused() -> None:
    with pytest.raises(ValueError, match="finite values only"):
        ExactSum((2,)).add(torch.tensor([1.0, 3.0e38]), 1.0e300)
    with pytest.raises(ValueError, match="finite values only"):
        ExactSum((1, 2)).add(torch.tensor([[1.0, 3.0e38]]), torch.tensor([1.0, 1.0e300]))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(min_value=1, max_value=6),
    columns=st.integers(min_value=1, max_value=5),
    kind=st.sampled_from(["none", "number", "per column"]),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_the_peak_read_from_the_term_is_the_peak_of_the_float64_product(
    rows: int, columns: int, kind: str, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    term = (torch.randn(rows, columns, generator=generator) * 2.0 ** (seed % 60 - 30)).float()
    factor: float | torch.Tensor | None = None
    if kind == "number":
        factor = -float(torch.rand(1, generator=generator)) * 2.0 ** (seed % 7)
    elif kind == "per column":
        factor = torch.rand(columns, generator=generator, dtype=torch.float64) * 5 - 2.5
    product = term.to(torch.float64) * (1.0 if factor is None else factor)
    assert exact_sum._product_peak(term, factor) == float(product.abs().max())


def test_tiny_terms_on_the_general_path_keep_their_bits() -> None:
    # a per-row factor takes the general path (the product formed, then its peak): the window
    # must sit at the terms' own bin, not at 2^0's, or 1e-12 falls below it
    terms = [torch.full((3, 1), 1e-12), torch.full((3, 1), 3e-12)]
    summed = ExactSum((3, 1))
    for term in terms:
        summed.add(term, torch.ones(3, 1, dtype=torch.float64))
    want = terms[0].double() + terms[1].double()
    assert torch.equal(summed.value(), want)
