"""The energy of a low-rank product (strategies/merging/lowrank.py): both routes against the
formed product, and the route taken at a large K (many clients' blocks) never builds K x K."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from strategies.merging import lowrank
from strategies.merging.lowrank import energy_by_grams, energy_by_product, low_rank_energy


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


def test_product_blocks_bound_the_rows_multiplied_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """With block_elements = 2 x d_in, the product is formed two rows at a time."""
    shapes: list[tuple[int, ...]] = []
    real_square = torch.Tensor.square

    def spy(self: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(self.shape))
        return real_square(self)

    monkeypatch.setattr(torch.Tensor, "square", spy)
    left = torch.arange(15.0).reshape(5, 3)
    right = torch.arange(12.0).reshape(3, 4)
    got = energy_by_product(left, right, block_elements=8)
    assert shapes == [(2, 4), (2, 4), (1, 4)]
    assert got == pytest.approx(float((left.double() @ right.double()).square().sum()))
