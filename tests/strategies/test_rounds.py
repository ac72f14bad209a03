"""Round merges (strategies.merging.rounds): true updates for product-space methods, size and
order invariance for every method offered in rounds, and parity with a float64 reading.

The float64 readings below form every d_out x d_in matrix explicitly and loop over clients, the
straightforward way; the code under test never forms them.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies.merging import create_method
from strategies.merging.diagnostics import factorwise_gap
from strategies.merging.method import RoundFormError
from strategies.merging.rounds import DeltaView, global_change_norm, merge_round
from tests.strategies import reference_spec as ref

F64 = torch.float64
A_KEY = "base_model.model.layer.0.query.lora_A.weight"
B_KEY = "base_model.model.layer.0.query.lora_B.weight"
A2_KEY = "base_model.model.layer.1.value.lora_A.weight"
B2_KEY = "base_model.model.layer.1.value.lora_B.weight"
HEAD = "base_model.model.classifier.weight"

# Every method rounds offer, with the hyperparameters under test (defaults where empty).
ROUND_METHODS: list[tuple[str, dict[str, object]]] = [
    ("robustmerge", {}),
    ("robustmerge", {"mode": "paper-equation"}),
    ("fedavg", {}),
    ("ties", {}),
    ("dare", {"drop_rate": 0.3, "seed": 5}),
    ("svd", {}),
    ("exact-mean", {}),
]
PRODUCT_METHODS: list[tuple[str, dict[str, object]]] = [
    ("svd", {}),
    ("exact-mean", {}),
    ("robustmerge", {"mode": "paper-equation"}),
]


def make_global(
    seed: int, rank: int = 4, d_in: int = 10, d_out: int = 7
) -> dict[str, torch.Tensor]:
    """A global adapter with a non-zero B (a round after the first) and one non-LoRA tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        A_KEY: torch.randn(rank, d_in, generator=g),
        B_KEY: torch.randn(d_out, rank, generator=g) * 0.3,
        A2_KEY: torch.randn(rank, d_out, generator=g),
        B2_KEY: torch.randn(d_in, rank, generator=g) * 0.3,
        HEAD: torch.randn(3, d_in, generator=g),
    }


def moved(
    base: dict[str, torch.Tensor], seed: int, *, a: bool = True, b: bool = True, size: float = 0.1
) -> dict[str, torch.Tensor]:
    """A client that trained from ``base``: its A and/or B factors moved, the head always."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in base.items():
        is_a = ".lora_A." in key
        is_b = ".lora_B." in key
        move = (is_a and a) or (is_b and b) or not (is_a or is_b)
        out[key] = value + size * torch.randn(value.shape, generator=g) if move else value.clone()
    return out


def product(
    tensors: dict[str, torch.Tensor], a_key: str = A_KEY, b_key: str = B_KEY
) -> torch.Tensor:
    return tensors[b_key].to(F64) @ tensors[a_key].to(F64)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.norm())
    return float((actual - expected).norm()) / (scale if scale > 0 else 1.0)


def round_method(name: str, options: dict[str, object]):  # type: ignore[no-untyped-def]
    return create_method(name, **options).round_form()


# --- float64 readings of the round formulas ---------------------------------------------------


def exact_mean_update(
    base: dict[str, torch.Tensor], clients: list[dict[str, torch.Tensor]], weights: list[float]
) -> torch.Tensor:
    """sum_t p_t (B_t A_t - B_G A_G), the matrices formed."""
    p = [w / sum(weights) for w in weights]
    total = torch.zeros_like(product(base))
    for share, client in zip(p, clients, strict=True):
        total += share * (product(client) - product(base))
    return total


def equation_round_update(
    base: dict[str, torch.Tensor],
    clients: list[dict[str, torch.Tensor]],
    fuse_weight: float,
    keep_ratio: float,
) -> torch.Tensor:
    """sum_t lambda [dB^_t diag(c_t) A_t + B_G diag(c_t) dA^_t], c_t = s_t / sum_u s_u, equal
    weights, no floor (paper-equation's default), formed term by term."""
    a_g, b_g = base[A_KEY].to(F64), base[B_KEY].to(F64)
    pruned_a, pruned_b, scales = [], [], []
    for client in clients:
        da = client[A_KEY].to(F64) - a_g
        db = client[B_KEY].to(F64) - b_g
        da_p, _ = ref.prune(da, keep_ratio)
        db_p, _ = ref.prune(db, keep_ratio)
        pruned_a.append(da_p)
        pruned_b.append(db_p)
        scales.append(ref.complementary_scale(da, da_p, None))
    rank = a_g.shape[0]
    sums = [sum(s[i] for s in scales) for i in range(rank)]
    total = torch.zeros_like(product(base))
    for t, client in enumerate(clients):
        for i in range(rank):
            c = scales[t][i] / sums[i]
            total += fuse_weight * c * torch.outer(pruned_b[t][:, i], client[A_KEY].to(F64)[i])
            total += fuse_weight * c * torch.outer(b_g[:, i], pruned_a[t][i])
    return total


# --- the observation: clients that move only B ----------------------------------------


@pytest.mark.parametrize(("name", "options"), PRODUCT_METHODS)
def test_clients_that_move_only_b_move_the_global(name: str, options: dict[str, object]) -> None:
    base = make_global(1)
    base[B_KEY] = torch.zeros_like(base[B_KEY])  # round 1: PEFT's zero-initialised B
    base[B2_KEY] = torch.zeros_like(base[B2_KEY])
    clients = [moved(base, seed, a=False) for seed in (2, 3, 4)]
    result = merge_round(base, clients, round_method(name, options), device="cpu", server_lr=1.0)
    assert global_change_norm(base, result.tensors) > 0.05
    # sum_t p_t B_t A_G has rank r: nothing to truncate, the product is exact.
    if name != "robustmerge":
        want = sum(product(c) for c in clients) / 3
        assert relative(product(result.tensors), want) < 1e-5
        assert result.report.relative_error is not None and result.report.relative_error < 1e-6


@pytest.mark.parametrize(("name", "options"), PRODUCT_METHODS)
def test_clients_that_move_only_a_are_read_out_by_the_global_b(
    name: str, options: dict[str, object]
) -> None:
    base = make_global(2)
    clients = [moved(base, seed, b=False) for seed in (5, 6)]
    result = merge_round(base, clients, round_method(name, options), device="cpu", server_lr=1.0)
    if name == "robustmerge":
        want = product(base) + equation_round_update(base, clients, 2.0, 0.2)
    else:
        want = product(base) + exact_mean_update(base, clients, [1.0, 1.0])
    # B_G (A_G + mean dA) has rank r: exact again.
    assert relative(product(result.tensors), want) < 1e-5


@pytest.mark.parametrize(("name", "options"), PRODUCT_METHODS)
@pytest.mark.parametrize("server_lr", [1.0, 0.5, 2.0])
def test_new_product_is_the_global_plus_the_step_within_the_reported_error(
    name: str, options: dict[str, object], server_lr: float
) -> None:
    base = make_global(3)
    clients = [moved(base, seed) for seed in (7, 8, 9)]
    weights = [10.0, 30.0, 20.0] if name != "robustmerge" else [1.0, 1.0, 1.0]
    result = merge_round(
        base,
        clients,
        round_method(name, options),
        weights if name != "robustmerge" else None,
        server_lr=server_lr,
        device="cpu",
    )
    if name == "robustmerge":
        update = equation_round_update(base, clients, 2.0, 0.2)
    else:
        update = exact_mean_update(base, clients, weights)
    full = product(base) + server_lr * update
    got = product(result.tensors)
    best = ref.best_rank_approximation(full, base[A_KEY].shape[0])
    # The factors are the best rank-r approximation of P (Eckart-Young) ...
    assert relative(got, best) < 1e-5
    # ... and the reported errors are its distance to P, against P and against the step.
    report = result.report
    assert report.relative_errors, "per-module errors are reported"
    err_module = report.relative_errors["base_model.model.layer.0.query.weight"]
    assert err_module == pytest.approx(relative(got, full), rel=1e-4, abs=1e-7)
    assert report.update_relative_error is not None and report.relative_error is not None
    full2 = product(base, A2_KEY, B2_KEY) + server_lr * (
        sum(
            w * (product(c, A2_KEY, B2_KEY) - product(base, A2_KEY, B2_KEY))
            for w, c in zip(weights, clients, strict=True)
        )
        / sum(weights)
        if name != "robustmerge"
        else torch.zeros(1)
    )
    if name != "robustmerge":
        dropped = (got - full).norm() ** 2 + (
            product(result.tensors, A2_KEY, B2_KEY) - full2
        ).norm() ** 2
        step = (server_lr * update).norm() ** 2 + (
            full2 - product(base, A2_KEY, B2_KEY)
        ).norm() ** 2
        assert report.update_relative_error == pytest.approx(
            math.sqrt(float(dropped / step)), rel=1e-4
        )
    # the non-LoRA head: base + eta * (weighted mean - base)
    p = torch.tensor(weights, dtype=F64) / sum(weights)
    head = sum(p[t] * clients[t][HEAD].to(F64) for t in range(3))
    want_head = base[HEAD].to(F64) + server_lr * (head - base[HEAD].to(F64))
    torch.testing.assert_close(result.tensors[HEAD].to(F64), want_head, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "options"), PRODUCT_METHODS)
def test_one_client_no_pruning_reproduces_its_product(
    name: str, options: dict[str, object]
) -> None:
    base = make_global(4)
    client = moved(base, 11)
    extra = {"fuse_weight": 1.0, "keep_ratio": 1.0} if name == "robustmerge" else {}
    method = round_method(name, {**options, **extra})
    result = merge_round(base, [client], method, server_lr=1.0, device="cpu")
    assert relative(product(result.tensors), product(client)) < 1e-5
    assert relative(product(result.tensors, A2_KEY, B2_KEY), product(client, A2_KEY, B2_KEY)) < 1e-5


def test_paper_equation_round_form_against_its_float64_reading() -> None:
    base = make_global(5)
    clients = [moved(base, seed) for seed in (12, 13, 14, 15)]
    method = round_method("robustmerge", {"mode": "paper-equation", "keep_ratio": 0.4})
    a_g, b_g = base[A_KEY], base[B_KEY]
    a_stack = torch.stack([c[A_KEY] for c in clients])
    b_stack = torch.stack([c[B_KEY] for c in clients])
    left, right = method.update_terms(a_g, b_g, a_stack, b_stack, torch.full((4,), 0.25))
    want = equation_round_update(base, clients, 2.0, 0.4)
    assert relative(left.to(F64) @ right.to(F64), want) < 1e-5


@pytest.mark.parametrize("name", ["svd", "exact-mean"])
def test_exact_mean_and_flexlora_are_the_rank_r_cut_of_the_float64_mean_update(name: str) -> None:
    # svd shares exact-mean's code path (it overrides only describe()), so comparing the two
    # could not fail: each is held to the float64 reading instead (and, with a weighted mean and
    # a server step, in tests/strategies/test_round_values_f64.py).
    base = make_global(6)
    clients = [moved(base, seed, size=0.3) for seed in (16, 17, 18)]
    result = merge_round(
        base, clients, round_method(name, {}), [1.0, 2.0, 3.0], device="cpu", server_lr=1.0
    )
    target = product(base) + exact_mean_update(base, clients, [1.0, 2.0, 3.0])
    best = ref.best_rank_approximation(target, base[A_KEY].shape[0])
    assert relative(best, target) > 1e-3  # the cut drops something
    assert relative(product(result.tensors), best) < 1e-5
    assert result.report.method == {"method": name}


def test_adapter_target_merges_the_one_shot_product_and_steps_towards_it() -> None:
    base = make_global(7)
    clients = [moved(base, seed) for seed in (19, 20)]
    method = round_method("robustmerge", {"mode": "paper-equation"})
    result = merge_round(base, clients, method, server_lr=0.5, target="adapter", device="cpu")
    one_shot = ref.robustmerge_equation_full(
        [c[A_KEY] for c in clients], [c[B_KEY] for c in clients], [2.0, 2.0]
    )
    full = product(base) + 0.5 * (one_shot - product(base))
    best = ref.best_rank_approximation(full, 4)
    assert relative(product(result.tensors), best) < 1e-5


# --- paper-exact round form -------------------------------------------------------------------


def test_paper_exact_round_form_averages_a_and_keeps_b() -> None:
    base = make_global(8)
    clients = [moved(base, seed) for seed in (21, 22, 23)]
    deltas = [{k: c[k] - base[k] for k in base} for c in clients]
    one_shot = create_method("robustmerge")
    round_form = one_shot.round_form()
    result = merge_round(base, clients, round_form, server_lr=1.0, device="cpu")
    a_list = [d[A_KEY] for d in deltas]
    b_list = [d[B_KEY] for d in deltas]
    released = ref.robustmerge_exact(a_list, b_list, [2.0] * 3, 0.2, 0.2)
    want_a, want_b = released["a"], released["b"]
    assert isinstance(want_a, torch.Tensor) and isinstance(want_b, torch.Tensor)
    # rounds: A_m = lambda * mean of A^ (the released code's sum divided by T); B_m as released
    torch.testing.assert_close(
        result.tensors[A_KEY].to(F64), base[A_KEY].to(F64) + want_a / 3, rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        result.tensors[B_KEY].to(F64), base[B_KEY].to(F64) + want_b, rtol=1e-5, atol=1e-6
    )


def test_task_arithmetic_has_no_round_form_and_says_what_to_use() -> None:
    with pytest.raises(RoundFormError, match="Use merge-method 'fedavg'"):
        create_method("task_arithmetic").round_form()


# --- size and order invariance (hypothesis) ---------------------------------------------------

INVARIANCE = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def _assert_same_global(
    name: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str
) -> None:
    for key in want:
        expected = want[key].to(F64)
        scale = max(float(expected.abs().max()), 1e-12)
        err = float((got[key].to(F64) - expected).abs().max()) / scale
        assert err < 1e-5, f"{name} {what} {key}: relative {err:.2e}"


@INVARIANCE
@given(
    seed=st.integers(min_value=0, max_value=2**20),
    count=st.sampled_from([1, 4, 64]),
    rank=st.integers(min_value=1, max_value=5),
    server_lr=st.sampled_from([1.0, 0.5]),
)
def test_identical_clients_move_the_global_as_far_as_one(
    seed: int, count: int, rank: int, server_lr: float
) -> None:
    base = make_global(seed, rank=rank)
    client = moved(base, seed + 1)
    for name, options in ROUND_METHODS:
        method = round_method(name, options)
        one = merge_round(base, [client], method, server_lr=server_lr, device="cpu")
        many = merge_round(
            base, [client] * count, method, [3.0] * count, server_lr=server_lr, device="cpu"
        )
        if method.merges_products():
            for a_key, b_key in ((A_KEY, B_KEY), (A2_KEY, B2_KEY)):
                err = relative(
                    product(many.tensors, a_key, b_key), product(one.tensors, a_key, b_key)
                )
                assert err < 1e-5, f"{name} {options} x{count}: {err:.2e}"
            _assert_same_global(name, {HEAD: many.tensors[HEAD]}, {HEAD: one.tensors[HEAD]}, "head")
        else:
            _assert_same_global(name, many.tensors, one.tensors, f"x{count}")


@INVARIANCE
@given(
    seed=st.integers(min_value=0, max_value=2**20),
    count=st.integers(min_value=2, max_value=6),
    order=st.randoms(use_true_random=False),
)
def test_client_order_does_not_change_the_new_global(seed: int, count: int, order) -> None:  # type: ignore[no-untyped-def]
    base = make_global(seed)
    clients = [moved(base, seed + 10 + t) for t in range(count)]
    weights = [float(t + 1) for t in range(count)]
    permutation = list(range(count))
    order.shuffle(permutation)
    for name, options in ROUND_METHODS:
        method = round_method(name, options)
        first = merge_round(base, clients, method, weights, device="cpu", server_lr=1.0)
        shuffled = merge_round(
            base,
            [clients[i] for i in permutation],
            method,
            [weights[i] for i in permutation],
            device="cpu",
            server_lr=1.0,
        )
        if method.merges_products():
            for a_key, b_key in ((A_KEY, B_KEY), (A2_KEY, B2_KEY)):
                err = relative(
                    product(shuffled.tensors, a_key, b_key), product(first.tensors, a_key, b_key)
                )
                assert err < 1e-5, f"{name}: {err:.2e}"
        else:
            _assert_same_global(name, shuffled.tensors, first.tensors, "permuted")


# --- the factor-wise gap ----------------------------------------------------------------------


def test_factorwise_gap_against_the_formed_matrices() -> None:
    base = make_global(9)
    clients = [moved(base, seed, size=0.4) for seed in (30, 31, 32)]
    p = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    a_stack = torch.stack([c[A_KEY] for c in clients])
    b_stack = torch.stack([c[B_KEY] for c in clients])
    gap = factorwise_gap((base[A_KEY], base[B_KEY]), a_stack, b_stack, p)
    mean_a = sum(p[t] * clients[t][A_KEY].to(F64) for t in range(3))
    mean_b = sum(p[t] * clients[t][B_KEY].to(F64) for t in range(3))
    exact = exact_mean_update(base, clients, [0.2, 0.3, 0.5])
    factorwise = mean_b @ mean_a - product(base)
    assert gap.exact == pytest.approx(float(exact.norm() ** 2), rel=1e-9)
    assert gap.gap == pytest.approx(float((factorwise - exact).norm() ** 2), rel=1e-9)
    assert gap.gap > 0


def test_factorwise_gap_is_zero_when_only_one_factor_moves() -> None:
    base = make_global(10)
    clients = [moved(base, seed, a=False) for seed in (33, 34)]
    a_stack = torch.stack([c[A_KEY] for c in clients])
    b_stack = torch.stack([c[B_KEY] for c in clients])
    gap = factorwise_gap((base[A_KEY], base[B_KEY]), a_stack, b_stack, torch.full((2,), 0.5))
    assert gap.gap == pytest.approx(0.0, abs=1e-20)
    assert gap.exact > 0


# --- inputs -----------------------------------------------------------------------------------


def test_a_client_whose_shapes_differ_from_the_global_is_refused_by_name() -> None:
    from strategies.merging import MergeInputError

    base = make_global(11)
    bad = moved(base, 40)
    bad[A_KEY] = torch.zeros(2, 10)
    with pytest.raises(MergeInputError, match="node 9"):
        merge_round(
            base,
            [moved(base, 41), bad],
            round_method("svd", {}),
            device="cpu",
            labels=["node 8", "node 9"],
            server_lr=1.0,
        )
    with pytest.raises(ValueError, match="target must be one of"):
        merge_round(base, [bad], round_method("fedavg", {}), target="product", server_lr=1.0)


def test_delta_view_subtracts_key_by_key_without_touching_its_inputs() -> None:
    base = make_global(12)
    client = moved(base, 42)
    before = {k: v.clone() for k, v in client.items()}
    view = DeltaView(client, base)
    assert list(view) == list(client) and len(view) == len(client)
    torch.testing.assert_close(view[A_KEY], client[A_KEY] - base[A_KEY])
    for key in client:
        assert torch.equal(client[key], before[key])
