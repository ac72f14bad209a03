"""Hypothesis runs derandomised (tests/conftest.py): a property test's failure reproduces."""

from __future__ import annotations

from hypothesis import settings

from tests.strategies import test_exact_sum


def test_the_default_profile_and_a_test_with_its_own_settings_are_derandomized() -> None:
    assert settings.default.derandomize is True
    test = test_exact_sum.test_any_order_gives_the_same_bits_and_the_float64_sum
    own = test._hypothesis_internal_use_settings  # type: ignore[attr-defined]
    assert own.max_examples == 40 and own.derandomize is True
