"""The energy of a low-rank product (strategies/merging/lowrank.py): both routes against the
formed product, and the route taken at a large K (many clients' blocks) never builds K x K."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies.merging import lowrank
from strategies.merging.lowrank import (
    energy_by_grams,
    energy_by_product,
    low_rank_energy,
    truncate_product,
)


def test_hand_checked_energy() -> None:
    # [[1, 2], [0, 1]] @ [[3, 0], [1, 1]] = [[5, 2], [1, 1]]: 25 + 4 + 1 + 1 = 31.
    left = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    right = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert energy_by_grams(left, right) == pytest.approx(31.0, abs=1e-12)
    assert energy_by_product(left, right) == pytest.approx(31.0, abs=1e-12)
    assert energy_by_product(left, right, block_elements=1) == pytest.approx(31.0, abs=1e-12)


@given(
    rows=st.integers(1, 9),
    inner=st.integers(1, 12),
    cols=st.integers(1, 9),
    block=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_both_routes_equal_the_formed_product(
    rows: int, inner: int, cols: int, block: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    left = torch.randn(rows, inner, generator=generator)
    right = torch.randn(inner, cols, generator=generator)
    exact = float((left.double() @ right.double()).square().sum())
    assert energy_by_grams(left, right) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert energy_by_product(left, right, block) == pytest.approx(exact, rel=1e-9, abs=1e-9)
    assert low_rank_energy(left, right) == pytest.approx(exact, rel=1e-9, abs=1e-9)


def test_gram_route_is_clamped_at_zero() -> None:
    # A product that is exactly zero: the Gram sum can only round to >= 0 after the clamp.
    left = torch.tensor([[1.0, 1.0]]) * 1e-3
    right = torch.tensor([[1.0], [-1.0]]) * 3.0
    assert energy_by_grams(left, right) >= 0.0
    assert low_rank_energy(left, right) == 0.0


def test_many_blocks_take_the_product_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """K (d_out + d_in) > d_out d_in: the K x K Grams would outgrow one dense module, so the
    product route is taken; below that the Grams are."""
    taken: list[str] = []

    def route(name: str) -> Callable[[torch.Tensor, torch.Tensor], float]:
        return lambda left, right: taken.append(name) or 0.0

    monkeypatch.setattr(lowrank, "energy_by_grams", route("grams"))
    monkeypatch.setattr(lowrank, "energy_by_product", route("prod"))
    # d_out = 8, d_in = 8: d_out d_in = 64; K = 4 -> 64 <= 64 (grams), K = 5 -> 80 > 64.
    low_rank_energy(torch.ones(8, 4), torch.ones(4, 8))
    low_rank_energy(torch.ones(8, 5), torch.ones(5, 8))
    assert taken == ["grams", "prod"]


@pytest.fixture
def squared_shapes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shape of every tensor squared (``Tensor.square``, still computed) while a test runs:
    the blocks of the product that ``energy_by_product`` forms."""
    shapes: list[tuple[int, ...]] = []
    real_square = torch.Tensor.square

    def spy(self: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(self.shape))
        return real_square(self)

    monkeypatch.setattr(torch.Tensor, "square", spy)
    return shapes


def test_product_blocks_bound_the_rows_multiplied_at_once(
    squared_shapes: list[tuple[int, ...]],
) -> None:
    """With block_elements = 2 x d_in, the product is formed two rows at a time."""
    left = torch.arange(15.0).reshape(5, 3)
    right = torch.arange(12.0).reshape(3, 4)
    got = energy_by_product(left, right, block_elements=8)
    assert squared_shapes == [(2, 4), (2, 4), (1, 4)]
    assert got == pytest.approx(float((left.double() @ right.double()).square().sum()))


def test_truncate_product_by_hand() -> None:
    # [[3, 0], [0, 1], [0, 0]] @ [[1, 0, 0], [0, 1, 0]] = diag(3, 1, 0): the best rank-1 factors
    # keep 3 e1 e1^T, drop an energy of 1 of 10.
    left = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    right = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    pair = truncate_product(left, right, 1)
    assert pair.a.dtype == pair.b.dtype == torch.float32
    assert pair.b.shape == (3, 1) and pair.a.shape == (1, 3)
    root3 = 3.0**0.5
    torch.testing.assert_close(pair.b, torch.tensor([[root3], [0.0], [0.0]]))
    torch.testing.assert_close(pair.a, torch.tensor([[root3, 0.0, 0.0]]))
    assert pair.truncated_energy == pytest.approx(1.0)
    assert pair.total_energy == pytest.approx(10.0)
    assert pair.relative_error == pytest.approx(0.1**0.5)


def test_truncate_product_error_does_not_depend_on_scale() -> None:
    """A product with an energy below 1 reports the same relative error as at scale 1."""
    generator = torch.Generator().manual_seed(3)
    left, right = torch.randn(6, 4, generator=generator), torch.randn(4, 5, generator=generator)
    whole = truncate_product(left, right, 2)
    small = truncate_product(left * 1e-3, right * 1e-3, 2)
    assert small.total_energy < 1.0 and whole.relative_error is not None
    assert small.relative_error == pytest.approx(whole.relative_error, rel=1e-6)
    torch.testing.assert_close(small.b @ small.a, (whole.b @ whole.a) * 1e-6)


def test_a_zero_product_truncates_to_zero_with_no_error() -> None:
    pair = truncate_product(torch.zeros(4, 3), torch.zeros(3, 5), 2)
    assert pair.relative_error == 0.0 and pair.total_energy == 0.0
    assert not pair.a.any() and not pair.b.any()


@given(seed=st.integers(0, 2**16), rank=st.integers(1, 4))
def test_each_b_column_has_its_largest_entry_positive(seed: int, rank: int) -> None:
    """The sign fix that makes the factors, not only their product, independent of the order
    of the clients' blocks: the SVD leaves each singular pair's sign to the solver."""
    generator = torch.Generator().manual_seed(seed)
    left, right = torch.randn(7, 6, generator=generator), torch.randn(6, 5, generator=generator)
    pair = truncate_product(left, right, rank)
    pivots = pair.b.abs().argmax(dim=0)
    assert (pair.b[pivots, torch.arange(rank)] > 0).all()
    # the same blocks in another order: the same factors
    order = torch.randperm(6, generator=generator)
    other = truncate_product(left[:, order], right[order], rank)
    torch.testing.assert_close(other.b, pair.b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(other.a, pair.a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("cols", "block", "rows_at_once"),
    [(4, 3, 1), (1, 2, 2), (1, 1, 1)],  # fewer elements than a row: one row at a time
)
def test_product_blocks_never_take_more_rows_than_fit(
    cols: int, block: int, rows_at_once: int, squared_shapes: list[tuple[int, ...]]
) -> None:
    energy_by_product(torch.ones(4, 2), torch.ones(2, cols), block_elements=block)
    assert squared_shapes[0] == (rows_at_once, cols)
