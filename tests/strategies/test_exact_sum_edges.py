"""ExactSum's edges, found by mutation testing (docs/development.md, "Mutation testing"): where
the window of bins sits, what it keeps and drops, the term limit, empty and float16 terms."""

from __future__ import annotations

import pytest
import torch

from strategies.merging import exact_sum
from strategies.merging.exact_sum import MAX_TERMS, ExactSum


def total(*terms: float, dtype: torch.dtype = torch.float64) -> float:
    summed = ExactSum((1,))
    for term in terms:
        summed.add(torch.tensor([term], dtype=dtype))
    return float(summed.value()[0])


def test_the_window_keeps_bits_down_to_its_lower_bins_unit_and_drops_below() -> None:
    # 1 has its leading bit in bin 0 (units 2^0); the bin below it has units 2^-32
    assert total(1.0, 2.0**-32) == 1.0 + 2.0**-32
    assert total(1.0, 2.0**-33) == 1.0
    assert total(1.0, 3 * 2.0**-33) == 1.0 + 2.0**-32  # truncated to the unit, not rounded


def test_a_leading_bit_just_below_a_bin_boundary_stays_in_its_bin() -> None:
    # 2^30 and 2^31 lead in bin 0 (bits 2^0 .. 2^31), so 0.5 (bin -1) is still in the window
    assert total(2.0**30, 0.5) == 2.0**30 + 0.5
    assert total(2.0**31, 0.5) == 2.0**31 + 0.5
    # 2^32 leads in bin 1: the window moves up and 0.5 falls below it
    assert total(2.0**32, 0.5) == 2.0**32


def test_the_term_limit_is_max_terms() -> None:
    summed = ExactSum((1,))
    summed.count = MAX_TERMS - 1
    summed.add(torch.ones(1))  # the last one allowed
    with pytest.raises(ValueError, match=f"^an exact sum takes at most {MAX_TERMS} terms$"):
        summed.add(torch.ones(1))


def test_non_finite_terms_are_refused_in_those_words() -> None:
    with pytest.raises(ValueError, match=r"^an exact sum takes finite values only$"):
        ExactSum((1,)).add(torch.tensor([float("inf")]))


def test_an_empty_term_is_counted_and_sums_to_empty() -> None:
    summed = ExactSum((0,))
    summed.add(torch.zeros(0))
    assert summed.count == 1 and summed.value().shape == (0,)


def test_float16_terms_are_sliced_in_float64() -> None:
    # sliced in float16, 0.5 / 2^-32 would overflow to inf
    halves = [torch.tensor([0.5, -0.25], dtype=torch.float16)] * 3
    summed = ExactSum((2,))
    for term in halves:
        summed.add(term)
    assert summed.value().tolist() == [1.5, -0.75]
    assert exact_sum.BIN_BITS == 32 and exact_sum.BINS == 2  # what the cases above assume


def test_the_value_is_rounded_once_from_the_bins_whatever_raised_the_window() -> None:
    # 2^-30 and 2^-22 sit in bin -1, 2^31 in bin 0. The exact sum 2^31 + 2^-22 + 2^-30 is just
    # above half of float64's ulp at 2^31 (2^-21), so it rounds up; rounding 2^31 + 2^-22 first
    # (a tie, to even: 2^31) and adding 2^-30 after would give 2^31.
    want = 2.0**31 + 2.0**-21
    assert total(2.0**-30, 2.0**31, 2.0**-22) == want  # the window raised between bin -1 terms
    assert total(2.0**31, 2.0**-22, 2.0**-30) == want
    assert total(2.0**-22, 2.0**-30, 2.0**31) == want


def test_bins_below_the_lowest_bin_are_dropped_whole() -> None:
    # LOWEST_EXPONENT -1000: bin -31 (units 2^-992) is the lowest kept, bin -32 is not
    assert exact_sum.LOWEST_BIN == -31
    assert total(2.0**-960, 2.0**-990) == 2.0**-960 + 2.0**-990  # bins -30 and -31
    assert total(2.0**-990, 2.0**-1000) == 2.0**-990  # the window's lower bin, -32, is dropped
    assert total(2.0**-1000) == 0.0  # even its top bin, -32, is below the lowest kept
    assert total(2.0**-1000, 1.0) == 1.0


# The edges below were found by the rerun after the explicit LOWEST_BIN guard (issue 29).

FINITE_ONLY = r"^an exact sum takes finite values only$"


def test_the_sum_keeps_its_device_and_an_empty_sums_value_is_on_it() -> None:
    assert ExactSum((2,), "cpu").device == torch.device("cpu")
    # the meta device needs no accelerator: a fresh sum's zeros are made on the sum's device
    value = ExactSum((2,), "meta").value(torch.float32)
    assert value.device.type == "meta" and value.shape == (2,) and value.dtype == torch.float32


def test_a_float16_term_times_a_small_factor_keeps_its_bits() -> None:
    # float16 takes the general path: the window must follow the product 2^-40, not the term 1
    summed = ExactSum((1,))
    summed.add(torch.tensor([1.0], dtype=torch.float16), factor=2.0**-40)
    assert float(summed.value()[0]) == 2.0**-40


def test_non_finite_float16_terms_are_refused_wherever_the_value_sits() -> None:
    with pytest.raises(ValueError, match=FINITE_ONLY):
        ExactSum((1,)).add(torch.tensor([float("inf")], dtype=torch.float16))
    # a term longer than one slice (CHUNK_ENTRIES entries): the infinity is in the last slice
    long = torch.ones(exact_sum.CHUNK_ENTRIES + 10, dtype=torch.float16)
    long[-1] = float("-inf")
    summed = ExactSum(long.shape)
    with pytest.raises(ValueError, match=FINITE_ONLY):
        summed.add(long)
    assert summed.count == 0


def test_a_factor_along_a_vector_scales_each_entry_on_its_own() -> None:
    # the largest product is 2^-40, though the largest entry (1) and factor (1) are far larger
    summed = ExactSum((2,))
    summed.add(
        torch.tensor([1.0, 2.0**-40]), factor=torch.tensor([2.0**-40, 1.0], dtype=torch.float64)
    )
    assert summed.value().tolist() == [2.0**-40, 2.0**-40]


def test_the_window_follows_the_float64_product_even_for_a_float32_factor() -> None:
    # 25 * float32(0.04) = 1 - 3 * 2^-27 in float64 (bin -1), though float32 rounds it to 1 (bin 0)
    factor = torch.tensor([0.04], dtype=torch.float32)
    product = 25.0 * float(factor[0])
    assert product == 1.0 - 3 * 2.0**-27
    summed = ExactSum((1, 1))
    summed.add(torch.tensor([[25.0]]), factor=factor)
    summed.add(torch.tensor([[2.0**-40]]))  # bin -2: inside the window only if its top is bin -1
    assert float(summed.value()[0, 0]) == product + 2.0**-40


def test_a_scalar_term_is_checked_before_it_is_split() -> None:
    summed = ExactSum(())
    summed.add(torch.tensor(0.0))
    assert summed.count == 1 and float(summed.value()) == 0.0
    with pytest.raises(ValueError, match=FINITE_ONLY):
        summed.add(torch.tensor(float("nan")))


def test_a_non_zero_scalar_term_is_summed() -> None:
    # a model's scalar parameter: 0-dim terms take no row slice (an IndexError before)
    summed = ExactSum(())
    summed.add(torch.tensor(0.75))
    summed.add(torch.tensor(2.5, dtype=torch.float16), factor=2.0)
    assert summed.count == 2 and float(summed.value()) == 5.75


@pytest.mark.parametrize(
    ("term", "factor"),
    [
        # the general peak path: a float16 term, and a factor that is not one per column
        (torch.tensor([1.0, float("nan")], dtype=torch.float16), None),
        (torch.tensor([[1.0, float("nan")]]), torch.ones(1, 1, dtype=torch.float64)),
    ],
    ids=["float16", "per-row-factor"],
)
def test_a_nan_on_the_general_path_is_refused_not_dropped(
    term: torch.Tensor, factor: torch.Tensor | None
) -> None:
    # max(0.0, nan) is 0.0 in Python: a NaN lost there used to be counted as a zero term
    summed = ExactSum(term.shape)
    with pytest.raises(ValueError, match=FINITE_ONLY):
        summed.add(term, factor=factor)
    assert summed.count == 0


def test_a_nan_in_a_later_slice_of_a_float16_term_is_refused() -> None:
    # it used to reach the bins as int64's minimum (about -9.2e18) in the NaN's place
    long = torch.ones(exact_sum.CHUNK_ENTRIES + 10, dtype=torch.float16)
    long[-1] = float("nan")
    summed = ExactSum(long.shape)
    with pytest.raises(ValueError, match=FINITE_ONLY):
        summed.add(long)
    assert summed.count == 0 and not summed.value().any()


def test_the_window_follows_the_largest_slice_not_the_last_of_a_bfloat16_term() -> None:
    """A bfloat16 term takes the general peak path, slice by slice: the window is set by the
    largest magnitude of any slice. Here the first row holds 2^40 and every other entry 2^-40:
    the window is bins 0 and 1 (units 1 and 2^32), so 2^40 is kept whole and 2^-40, more than
    64 bits below, is dropped; a window set from the last slice alone (bins -3 and -2) would
    count 2^40 in units of 2^-64, past int64."""
    rows = 2 * exact_sum.CHUNK_ENTRIES // 256  # two slices of 256-entry rows
    term = torch.full((rows, 256), 2.0**-40, dtype=torch.bfloat16)
    term[0, 0] = 2.0**40
    summed = ExactSum(term.shape)
    summed.add(term)
    summed.add(term)
    expected = torch.zeros(term.shape, dtype=torch.float64)
    expected[0, 0] = 2.0**41
    assert torch.equal(summed.value(), expected)
