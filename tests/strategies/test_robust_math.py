"""The robust stages' pure math (strategies.robust): hand-checked cases, Flower cross-checks and
hypothesis invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies.robust import (
    NormBound,
    RobustSettings,
    clamp_to_range,
    clip_scale,
    lower_median,
    multikrum_select,
    norm_bound,
    pairwise_squared_distances,
    trim_count,
    trimmed_range,
)

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
norms = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


# --- norm screen, by hand


def test_lower_median_takes_the_smaller_middle_value() -> None:
    assert lower_median([3.0]) == 3.0
    assert lower_median([1.0, 1e6]) == 1.0
    assert lower_median([5.0, 1.0, 3.0]) == 3.0
    assert lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0
    with pytest.raises(ValueError, match="no values"):
        lower_median([])


def test_norm_bound_at_one_two_and_eight_replies() -> None:
    # T = 1, no history: nothing to compare with -> no bound (accepted, norm recorded).
    assert norm_bound([2.0], [], 10.0) is None
    # T = 1 with history: the history is the reference.
    one = norm_bound([2e6], [1.0, 1.2, 0.9], 10.0)
    assert one is not None and one.reference == 1.0 and one.bound == 10.0 and one.pool == 4
    # T = 2, no history: the smaller norm is the reference, the x1e6 one is far above it.
    two = norm_bound([1.0, 1e6], [], 10.0)
    assert two is not None and two.reference == 1.0 and two.bound == 10.0
    # T = 8 with 3 outsized: the lower median is still an honest norm.
    eight = norm_bound([1.0, 1.1, 0.9, 1.2, 1.05, 1e6, 1e6, 1e6], [], 10.0)
    assert eight is not None and eight.reference == 1.1


def test_norm_bound_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match="factor"):
        norm_bound([1.0, 2.0], [], 0.5)
    with pytest.raises(ValueError, match="finite"):
        norm_bound([1.0, math.inf], [], 10.0)


def test_clip_scale() -> None:
    assert clip_scale(5.0, 10.0) == 1.0
    assert clip_scale(20.0, 10.0) == 0.5
    assert clip_scale(3.0, 0.0) == 0.0


@SETTINGS
@given(st.lists(norms, min_size=1, max_size=12), st.lists(norms, max_size=12))
def test_fewer_than_half_outsized_norms_cannot_raise_the_reference(
    honest: list[float], history: list[float]
) -> None:
    pool = honest + history
    attackers = (len(pool) - 1) // 2 if len(pool) % 2 else len(pool) // 2 - 1
    bound = norm_bound(honest, history, 10.0)
    attacked = norm_bound([*honest, *[1e12] * max(attackers, 0)], history, 10.0)
    if bound is None or attacked is None:
        return
    # the reference stays within the honest pool's range
    assert min(pool) <= attacked.reference <= max(pool)
    assert attacked.bound == 10.0 * attacked.reference


# --- multi-Krum


def test_multikrum_drops_the_far_update_by_hand() -> None:
    rows = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]])
    distances = pairwise_squared_distances(rows)
    assert distances[0, 3] == pytest.approx(20000.0)
    assert distances[1, 2] == pytest.approx(2.0)
    assert multikrum_select(distances, num_malicious=1, num_select=3) == [0, 1, 2]
    # Krum (m = 1): the row with the smallest sum to its n - f - 2 = 1 closest: row 0
    assert multikrum_select(distances, num_malicious=1, num_select=1) == [0]


def test_multikrum_small_federations() -> None:
    assert multikrum_select(torch.zeros(0, 0), 1, 1) == []
    assert multikrum_select(torch.zeros(1, 1), 1, 1) == [0]
    assert multikrum_select(pairwise_squared_distances(torch.tensor([[0.0], [5.0]])), 1, 1) == [0]


def test_multikrum_agrees_with_flowers_selection() -> None:
    from flwr.app import ArrayRecord, RecordDict
    from flwr.serverapp.strategy.multikrum import select_multikrum

    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(7, 20, generator=generator)
    rows[5] *= 50.0
    rows[2] += 8.0
    contents = [RecordDict({"arrays": ArrayRecord([row.double().numpy()])}) for row in rows]
    flower = select_multikrum(contents, num_malicious_nodes=2, num_nodes_to_select=4)
    want = sorted(contents.index(content) for content in flower)
    assert multikrum_select(pairwise_squared_distances(rows), 2, 4) == want


@SETTINGS
@given(
    st.integers(min_value=0, max_value=2**31 - 1),
    st.integers(min_value=1, max_value=9),
    st.integers(min_value=0, max_value=3),
    st.integers(min_value=0, max_value=10),
)
def test_multikrum_returns_sorted_distinct_positions_and_is_permutation_equivariant(
    seed: int, count: int, malicious: int, select: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, 6, generator=generator)
    picked = multikrum_select(pairwise_squared_distances(rows), malicious, select)
    assert picked == sorted(set(picked))
    assert len(picked) == min(max(select, 1), count)
    permutation = torch.randperm(count, generator=generator)
    again = multikrum_select(pairwise_squared_distances(rows[permutation]), malicious, select)
    # the same rows are chosen unless scores tie (random floats: they do not)
    assert sorted(int(permutation[p]) for p in again) == picked


# --- coordinate-wise stage


def test_trim_count() -> None:
    assert [trim_count(t, None) for t in (1, 2, 3, 4, 8)] == [0, 0, 1, 1, 3]
    assert [trim_count(t, 0.25) for t in (1, 2, 3, 4, 8)] == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="trim fraction"):
        trim_count(4, 0.5)
    with pytest.raises(ValueError, match="count"):
        trim_count(0, 0.1)


def test_trimmed_range_and_clamp_by_hand() -> None:
    stack = torch.tensor([[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [1e6, 2.0]])
    low, high = trimmed_range(stack, 1)
    assert low.tolist() == [2.0, 0.0] and high.tolist() == [3.0, 1.0]
    clamped = torch.stack([clamp_to_range(row, low, high) for row in stack])
    assert clamped.tolist() == [[2.0, 0.0], [2.0, 0.0], [3.0, 1.0], [3.0, 1.0]]
    # T even, median range: the mean of the clamped rows is the median (0.5 * (2 + 3), ...)
    assert clamped.mean(0).tolist() == [2.5, 0.5]
    with pytest.raises(ValueError, match="cannot trim"):
        trimmed_range(stack, 2)


def test_the_trimmed_range_does_not_keep_the_stack_alive() -> None:
    """A round keeps every key's (low, high) until its merge: rows of the sorted T x key stack
    would hold all T replies' updates of every key in memory (measured before the fix: median
    at T = 48 grew peak RSS by 1.9 adapters per reply)."""
    stack = torch.randn(64, 3, 5)
    low, high = trimmed_range(stack, 10)
    for bound in (low, high):
        assert bound.shape == (3, 5)
        assert bound.untyped_storage().nbytes() == bound.numel() * bound.element_size()


STACK = [[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [1e3, 2.0], [-4.0, 8.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_trimmed_range_in_every_float_dtype(dtype: torch.dtype) -> None:
    """Half precisions take the sorting path (NumPy has no bfloat16), single and double the
    selecting one: the same order statistics, in the stack's dtype."""
    low, high = trimmed_range(torch.tensor(STACK, dtype=dtype), 1)
    assert low.dtype == high.dtype == dtype
    assert low.tolist() == [1.0, 0.0] and high.tolist() == [3.0, 2.0]


def test_trimmed_range_of_a_stack_autograd_tracks() -> None:
    """A stack that requires grad is sorted (NumPy cannot read it): the same values."""
    stack = torch.tensor(STACK, requires_grad=True)
    low, high = trimmed_range(stack, 2)
    assert low.tolist() == [2.0, 1.0] and high.tolist() == [2.0, 1.0]


def test_a_cpu_single_precision_stack_is_selected_not_sorted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The float32 / float64 CPU path is NumPy's partition at the two positions (one copy of the
    stack; sorting makes the sorted values and their int64 positions); half precision is not."""
    calls: list[tuple[tuple[int, ...], list[int]]] = []
    partition = np.partition

    def spy(array: np.ndarray, kth: list[int], axis: int) -> np.ndarray:
        calls.append((array.shape, list(kth)))
        return partition(array, kth, axis=axis)

    monkeypatch.setattr(np, "partition", spy)
    for dtype in (torch.float32, torch.float64, torch.float16):
        trimmed_range(torch.tensor(STACK, dtype=dtype), 1)
    trimmed_range(torch.tensor(STACK), 2)
    assert calls == [((5, 2), [1, 3]), ((5, 2), [1, 3]), ((5, 2), [2])]


@SETTINGS
@given(st.integers(min_value=0, max_value=2**31 - 1), st.integers(min_value=1, max_value=9))
def test_median_clamp_then_mean_is_flowers_median(seed: int, count: int) -> None:
    """FedMedian's aggregate (np.median over clients) is the plain mean of the median-clamped
    deltas, so with fedavg the "median" option reproduces FedMedian."""
    generator = torch.Generator().manual_seed(seed)
    stack = torch.randn(count, 3, 4, generator=generator, dtype=torch.float64)
    low, high = trimmed_range(stack, trim_count(count, None))
    clamped = torch.stack([clamp_to_range(row, low, high) for row in stack])
    want = np.median(stack.numpy(), axis=0)
    np.testing.assert_allclose(clamped.mean(0).numpy(), want, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(
    st.integers(min_value=0, max_value=2**31 - 1),
    st.integers(min_value=1, max_value=9),
    st.floats(min_value=0.0, max_value=0.49),
)
def test_clamped_values_stay_within_the_untrimmed_values(
    seed: int, count: int, fraction: float
) -> None:
    """However large k outliers are, every clamped coordinate lies within the range of the
    others; the clamp moves nothing already inside."""
    generator = torch.Generator().manual_seed(seed)
    stack = torch.randn(count, 5, generator=generator)
    trim = trim_count(count, fraction)
    attacked = stack.clone()
    attacked[:trim] = 1e9
    low, high = trimmed_range(attacked, trim)
    honest = attacked[trim:]
    assert bool((low >= honest.min(0).values).all()) and bool((high <= honest.max(0).values).all())
    inside = (attacked >= low) & (attacked <= high)
    clamped = torch.stack([clamp_to_range(row, low, high) for row in attacked])
    assert bool((clamped[inside] == attacked[inside]).all())


# --- settings


def test_robust_settings_are_checked() -> None:
    assert RobustSettings().aggregation == "auto" and RobustSettings().resolve().screens
    assert not RobustSettings("none").screens
    assert RobustSettings("krum").selects and not RobustSettings("krum").rewrites_coordinates
    assert RobustSettings("median").trim_fraction_or_median is None
    for bad, message in (
        ({"aggregation": "bulyan"}, "robust-aggregation"),
        ({"norm_factor": 0.5}, "robust-norm-factor"),
        ({"norm_factor": math.inf}, "robust-norm-factor"),
        ({"history": -1}, "robust-history"),
        ({"krum_malicious": -1}, "robust-krum"),
        ({"trim_fraction": 0.5}, "robust-trim-fraction"),
    ):
        with pytest.raises(ValueError, match=message):
            RobustSettings(**bad)  # type: ignore[arg-type]
    assert "reject" in RobustSettings("norm").describe()
    assert "multi-Krum" in RobustSettings("krum").describe()
    assert "clamp" in RobustSettings("trimmed-mean").describe()


def test_zero_norms_do_not_set_the_reference() -> None:
    # a round of updates that did not move (a first shared-a round of one step, free riders)
    # must not leave a zero bound that rejects every real update after it
    assert norm_bound([0.0, 0.0], [], 10.0) is None
    assert norm_bound([0.1, 0.1], [0.0, 0.0], 10.0) == NormBound(0.1, 1.0, 2)
    bound = norm_bound([0.0, 0.0, 0.0, 2.0], [1.0], 10.0)  # free riders cannot pull it down
    assert bound is not None and bound.reference == 1.0 and bound.pool == 2


def test_trimmed_range_of_one_value_per_client_is_a_pair_of_scalars() -> None:
    """A 0-dim key stacks to one value per client; the partition then yields NumPy scalars,
    which must come back as 0-dim tensors (this raised a TypeError before)."""
    stack = torch.tensor([3.0, 1.0, 2.0, 7.0, -1.0])
    low, high = trimmed_range(stack, 1)
    assert low.shape == high.shape == torch.Size([])
    assert (float(low), float(high)) == (1.0, 3.0)
    assert [float(v) for v in trimmed_range(stack.double(), 2)] == [2.0, 2.0]
