"""The baseline merges (fedavg, task_arithmetic, ties, dare, svd) and the method registry."""

from __future__ import annotations

import pytest
import torch

from strategies import available_methods, merge_lora, merge_lora_with_report
from strategies.merging import accepted_hyperparameters, create_method, register_method
from strategies.merging.fedavg import FedAvg
from tests.strategies import reference_spec as ref

HEAD = "base_model.model.classifier.modules_to_save.default.weight"
A_KEY, B_KEY = ref.lora_keys("base_model.model.layer.0.attention.query")


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-6) -> None:
    expected = expected.to(torch.float64)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.to(torch.float64),
        expected,
        rtol=rtol,
        atol=rtol * scale,
        msg=lambda m: f"{what}: {m}",
    )


def _weighted_sum(
    adapters: list[dict[str, torch.Tensor]], key: str, coefficients: list[float]
) -> torch.Tensor:
    total = torch.zeros(adapters[0][key].shape, dtype=torch.float64)
    for coefficient, adapter in zip(coefficients, adapters, strict=True):
        total += coefficient * adapter[key].double()
    return total


# --- fedavg and task arithmetic ---------------------------------------------------------------


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 5.0], [0.0, 3.0, 1.0]])
def test_fedavg_is_weighted_mean_of_each_factor(weights: list[float] | None) -> None:
    # A_m = sum_t p_t A_t, B_m = sum_t p_t B_t, every other key the same weighted mean.
    adapters = ref.make_adapters(40, 3, 4, 9, 7)
    raw = weights or [1.0, 1.0, 1.0]
    p = [w / sum(raw) for w in raw]
    merged = merge_lora(adapters, "fedavg", weights=weights)
    assert list(merged) == list(adapters[0])
    for key in adapters[0]:
        _close(merged[key], _weighted_sum(adapters, key, p), key)


def test_fedavg_hand_checked() -> None:
    # weights (1, 3): p = (1/4, 3/4). A: 1/4 [4, 8] + 3/4 [0, -4] = [1, 2 - 3] = [1, -1].
    adapters = [
        {A_KEY: torch.tensor([[4.0, 8.0]]), B_KEY: torch.tensor([[2.0]]), HEAD: torch.ones(2)},
        {A_KEY: torch.tensor([[0.0, -4.0]]), B_KEY: torch.tensor([[6.0]]), HEAD: torch.zeros(2)},
    ]
    merged = merge_lora(adapters, "fedavg", weights=[1, 3])
    assert merged[A_KEY].tolist() == [[1.0, -1.0]]
    assert merged[B_KEY].tolist() == [[5.0]]  # 1/4 * 2 + 3/4 * 6 = 0.5 + 4.5
    assert merged[HEAD].tolist() == [0.25, 0.25]


@pytest.mark.parametrize(
    ("fuse_weight", "weights"),
    [(1.0, None), (0.5, None), ((1.0, 2.0, -1.0), None), (2.0, [1.0, 1.0, 2.0])],
)
def test_task_arithmetic_is_lambda_times_sum(
    fuse_weight: float | tuple[float, ...], weights: list[float] | None
) -> None:
    # lambda_t = fuse_t * T * p_t; with equal weights A_m = sum_t fuse_t A_t.
    adapters = ref.make_adapters(41, 3, 3, 6, 5)
    lambdas = ref.task_lambdas(3, fuse_weight, weights)
    merged = merge_lora(adapters, "task_arithmetic", weights=weights, fuse_weight=fuse_weight)
    raw = weights or [1.0, 1.0, 1.0]
    p = [w / sum(raw) for w in raw]
    lora = {key for pair in ref.lora_pairs(adapters[0]) for key in pair}
    for key in adapters[0]:
        expected = _weighted_sum(adapters, key, lambdas if key in lora else p)
        _close(merged[key], expected, key)


# --- TIES -------------------------------------------------------------------------------------

# T = 3, r = 1, d_in = 4, keep_ratio 0.5: n = 4, k = floor(4 * 0.5) = 2 (tau = 2nd smallest).
TIES_A = [
    [[3.0, -1.0, 2.0, -4.0]],  # |.| 1 2 3 4 -> tau 2 -> trimmed [3, 0, 2, -4]
    [[-2.0, 5.0, 0.5, 1.0]],  # |.| .5 1 2 5 -> tau 1 -> trimmed [-2, 5, 0, 1]
    [[1.0, 1.0, -3.0, 6.0]],  # |.| 1 1 3 6 -> tau 1 (tie) -> all kept [1, 1, -3, 6]
]
# sum of trimmed: [3 - 2 + 1, 0 + 5 + 1, 2 + 0 - 3, -4 + 1 + 6] = [2, 6, -1, 3] -> signs + + - +
# disjoint mean of the values that agree (zeros do not vote):
#   e0: {3, 1} -> 2;  e1: {5, 1} -> 3;  e2: {-3} -> -3;  e3: {1, 6} -> 3.5
TIES_A_MERGED = [[2.0, 3.0, -3.0, 3.5]]
# B (d_out = 2 x r = 1): n = 2, k = 1, tau = the smaller magnitude: everything is kept.
TIES_B = [[[1.0], [-2.0]], [[-3.0], [-1.0]], [[2.0], [4.0]]]
# e0: 1 - 3 + 2 = 0 -> elected sign 0 -> no value agrees -> 0
# e1: -2 - 1 + 4 = 1 -> + -> {4} -> 4
TIES_B_MERGED = [[0.0], [4.0]]


@pytest.mark.parametrize("fuse_weight", [1.0, 2.0])
def test_ties_hand_checked(fuse_weight: float) -> None:
    adapters = [
        {A_KEY: torch.tensor(a), B_KEY: torch.tensor(b)}
        for a, b in zip(TIES_A, TIES_B, strict=True)
    ]
    merged = merge_lora(adapters, "ties", keep_ratio=0.5, fuse_weight=fuse_weight)
    _close(merged[A_KEY], fuse_weight * torch.tensor(TIES_A_MERGED), "A_m")
    _close(merged[B_KEY], fuse_weight * torch.tensor(TIES_B_MERGED), "B_m")


def test_ties_weights_scale_before_the_sign_election() -> None:
    # keep_ratio 1 (no trim). A_1 = [1, -4], A_2 = [-3, 1].
    # Equal weights: sum [-2, -3] -> signs (-, -): e0 {-3} -> -3, e1 {-4} -> -4.
    # weights (3, 1): T p = (1.5, 0.5): [1.5, -6] and [-1.5, 0.5]; sum [0, -5.5]:
    #   e0 elected sign 0 -> 0; e1 {-6} -> -6.
    adapters = [
        {A_KEY: torch.tensor([[1.0, -4.0]]), B_KEY: torch.ones(1, 1)},
        {A_KEY: torch.tensor([[-3.0, 1.0]]), B_KEY: torch.ones(1, 1)},
    ]
    plain = merge_lora(adapters, "ties", keep_ratio=1.0)
    weighted = merge_lora(adapters, "ties", keep_ratio=1.0, weights=[3.0, 1.0])
    assert plain[A_KEY].tolist() == [[-3.0, -4.0]]
    assert weighted[A_KEY].tolist() == [[0.0, -6.0]]
    assert weighted[B_KEY].tolist() == [[1.0]]  # (1.5 + 0.5) / 2 voters


def test_ties_refuses_per_adapter_fuse_weights() -> None:
    with pytest.raises(ValueError, match="fuse_weight"):
        merge_lora(ref.make_adapters(0, 2, 2, 3, 3), "ties", fuse_weight=(1.0, 2.0))


# --- DARE -------------------------------------------------------------------------------------


def test_dare_is_reproducible_by_seed() -> None:
    adapters = ref.make_adapters(42, 3, 4, 16, 8)
    first = merge_lora(adapters, "dare", drop_rate=0.5, seed=3)
    again = merge_lora(adapters, "dare", drop_rate=0.5, seed=3)
    other = merge_lora(adapters, "dare", drop_rate=0.5, seed=4)
    lora = [key for pair in ref.lora_pairs(adapters[0]) for key in pair]
    for key in lora:
        assert torch.equal(first[key], again[key]), key
    assert any(not torch.equal(first[key], other[key]) for key in lora)


def test_dare_without_drops_is_task_arithmetic() -> None:
    adapters = ref.make_adapters(43, 3, 4, 10, 6)
    for fuse in (1.0, 0.7):
        dare = merge_lora(adapters, "dare", drop_rate=0.0, fuse_weight=fuse, seed=9)
        arithmetic = merge_lora(adapters, "task_arithmetic", fuse_weight=fuse)
        for key in arithmetic:
            assert torch.equal(dare[key], arithmetic[key]), key


@pytest.mark.parametrize("drop_rate", [0.3, 0.9])
def test_dare_rescales_survivors_by_one_over_keep_probability(drop_rate: float) -> None:
    # One adapter of ones (T = 1, lambda 1): each entry is 0 (dropped) or 1 / (1 - p); the kept
    # fraction is ~ 1 - p (n = 65,536: its standard deviation is <= 0.002), so the mean stays 1.
    a, b = torch.ones(16, 4096), torch.ones(4096, 16)
    merged = merge_lora([{A_KEY: a, B_KEY: b}], "dare", drop_rate=drop_rate, seed=0)
    for key in (A_KEY, B_KEY):
        values = merged[key]
        survivors = values != 0
        expected = torch.full_like(values[survivors], 1.0 / (1.0 - drop_rate))
        torch.testing.assert_close(values[survivors], expected)
        assert abs(float(survivors.float().mean()) - (1.0 - drop_rate)) < 0.01
        assert abs(float(values.mean()) - 1.0) < 0.1
    # A and B draw independent masks.
    assert not torch.equal(merged[A_KEY] != 0, (merged[B_KEY] != 0).T)


# --- SVD (FlexLoRA) ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "count", "rank", "d_in", "d_out", "weights"),
    [
        (44, 1, 4, 10, 8, None),
        (45, 3, 4, 12, 10, None),
        (46, 4, 2, 6, 9, [1.0, 2.0, 3.0, 4.0]),
        (47, 5, 3, 5, 4, [0.0, 1.0, 1.0, 0.5, 2.0]),  # T r = 15 > d_in, d_out
    ],
)
def test_svd_is_best_rank_r_of_weighted_product_sum(
    seed: int, count: int, rank: int, d_in: int, d_out: int, weights: list[float] | None
) -> None:
    # delta_W = sum_t p_t B_t A_t; B A must be its best rank-r approximation (Eckart-Young),
    # B^T B = A A^T (balanced factors) and the report gives ||B A - delta_W|| / ||delta_W||.
    adapters = ref.make_adapters(seed, count, rank, d_in, d_out)
    raw = weights or [1.0] * count
    p = [w / sum(raw) for w in raw]
    result = merge_lora_with_report(adapters, "svd", weights=weights)
    assert result.report.relative_error is not None
    for a_key, b_key in ref.lora_pairs(adapters[0]):
        full = torch.zeros(adapters[0][b_key].shape[0], adapters[0][a_key].shape[1]).double()
        for weight, adapter in zip(p, adapters, strict=True):
            full += weight * adapter[b_key].double() @ adapter[a_key].double()
        a, b = result.tensors[a_key].double(), result.tensors[b_key].double()
        assert a.shape == adapters[0][a_key].shape
        assert b.shape == adapters[0][b_key].shape
        _close(b @ a, ref.best_rank_approximation(full, rank), a_key)
        top = float(torch.linalg.svdvals(full)[0])
        torch.testing.assert_close(b.T @ b, a @ a.T, rtol=1e-5, atol=1e-5 * top)
        error = float(torch.linalg.norm(b @ a - full) / torch.linalg.norm(full))
        stem = a_key.split(".lora_")[0]
        (name,) = [n for n in result.report.relative_errors if n.startswith(stem)]
        assert result.report.relative_errors[name] == pytest.approx(error, rel=1e-5, abs=1e-6)
        if count == 1:
            assert result.report.relative_errors[name] == 0.0


def test_svd_non_lora_keys_are_weighted_mean() -> None:
    adapters = ref.make_adapters(48, 2, 2, 4, 3)
    merged = merge_lora(adapters, "svd", weights=[1.0, 3.0])
    _close(merged[HEAD], _weighted_sum(adapters, HEAD, [0.25, 0.75]), HEAD)


# --- registry ---------------------------------------------------------------------------------


def test_shipped_methods() -> None:
    assert set(available_methods()) == {
        "robustmerge",
        "fedavg",
        "task_arithmetic",
        "ties",
        "dare",
        "svd",
        "exact-mean",
    }
    assert list(available_methods()) == sorted(available_methods())


def test_unknown_method_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown merge method 'robust_merge'") as info:
        merge_lora(ref.make_adapters(0, 2, 2, 3, 3), "robust_merge")
    for name in available_methods():
        assert name in str(info.value)


def test_registry_refuses_a_duplicate_name() -> None:
    class Impostor(FedAvg):
        pass

    with pytest.raises(ValueError, match="'fedavg' is already registered"):
        register_method("fedavg")(Impostor)
    assert type(create_method("fedavg")) is FedAvg


def test_unknown_hyperparameter_is_refused_by_name() -> None:
    with pytest.raises((TypeError, ValueError), match="keepratio"):
        create_method("robustmerge", keepratio=0.3)
    assert set(accepted_hyperparameters("robustmerge")) == {
        "keep_ratio",
        "scale_quantile",
        "fuse_weight",
        "mode",
        "scale_floor",
        "form",
    }
    assert accepted_hyperparameters("fedavg") == ()


# --- report -----------------------------------------------------------------------------------


def test_report_and_progress() -> None:
    adapters = ref.make_adapters(49, 3, 2, 4, 3)
    seen: list[tuple[int, int]] = []
    result = merge_lora_with_report(
        adapters,
        keep_ratio=0.3,
        device="cpu",
        progress=lambda done, total: seen.append((done, total)),
    )
    # 3 LoRA modules and 2 other keys: one progress step each, in order, ending at 5 of 5.
    assert seen == [(step, 5) for step in range(1, 6)]
    report = result.report
    assert report.num_adapters == 3
    assert report.device == "cpu"
    assert report.seconds >= 0.0
    assert report.method == {
        "method": "robustmerge",
        "mode": "paper-exact",
        "keep_ratio": 0.3,
        "scale_quantile": 0.2,
        "fuse_weight": 2.0,
        "scale_floor": True,
        "form": "one-shot",
    }
