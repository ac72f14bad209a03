"""Heterogeneous LoRA ranks (strategies.merging.ranks): truncation to a site's rank and the
mixed-rank round merge, three ways: hand-checked small cases, hypothesis invariants, and parity
with a float64 reading that forms every d_out x d_in matrix and takes its full SVD.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies.merging import MergeInputError, create_method
from strategies.merging.method import MergeMethod
from strategies.merging.rank_rounds import (
    merge_mixed_ranks,
    merge_zero_padded,
    mixed_rank_update_terms,
)
from strategies.merging.ranks import (
    Factors,
    MixedRankError,
    dead_directions,
    mixed_rank_support,
    slice_to_rank,
    truncate_matrix,
    truncate_to_rank,
)
from strategies.merging.rounds import merge_round
from tests.strategies import reference_spec as ref

F64 = torch.float64
A_KEY = "base_model.model.layer.0.query.lora_A.weight"
B_KEY = "base_model.model.layer.0.query.lora_B.weight"

PRODUCT_METHODS: list[tuple[str, dict[str, object]]] = [
    ("svd", {}),
    ("exact-mean", {}),
    ("robustmerge", {"mode": "paper-equation"}),
]
SETTINGS = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def method_of(name: str, options: dict[str, object]) -> MergeMethod:
    return create_method(name, **options).round_form()


def product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return b.to(F64) @ a.to(F64)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.norm())
    return float((actual - expected).norm()) / (scale if scale > 0 else 1.0)


def random_pair(
    generator: torch.Generator, d_out: int, d_in: int, rank: int, size: float = 1.0
) -> Factors:
    """(B, A) with a spread spectrum (distinct singular values, so the top-k is unique)."""
    b = torch.randn(d_out, rank, generator=generator) * size
    a = torch.randn(rank, d_in, generator=generator)
    return b, a


def trained(sent: Factors, generator: torch.Generator, size: float = 0.2) -> Factors:
    """A client that trained from what it was sent: both factors moved."""
    b, a = sent
    return (
        b + size * torch.randn(b.shape, generator=generator),
        a + size * torch.randn(a.shape, generator=generator),
    )


def round_inputs(
    seed: int, ranks: list[int], global_rank: int = 6, d_out: int = 9, d_in: int = 11
) -> tuple[Factors, list[Factors]]:
    """A balanced global of ``global_rank`` and one trained client per entry of ``ranks``."""
    g = torch.Generator().manual_seed(seed)
    start = truncate_to_rank(*random_pair(g, d_out, d_in, global_rank + 2), global_rank)
    clients = [trained(_sent(start.b, start.a, r), g) for r in ranks]
    return (start.b, start.a), clients


def _sent(b: torch.Tensor, a: torch.Tensor, rank: int) -> Factors:
    pair = truncate_to_rank(b, a, rank)
    return pair.b, pair.a


# --- float64 readings ---------------------------------------------------------------------------


def dense_truncation(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Balanced rank-``rank`` factors of a matrix from its full float64 SVD, and the error."""
    u, s, vh = torch.linalg.svd(matrix.to(F64), full_matrices=False)
    kept = min(rank, s.shape[0])
    b = torch.zeros(matrix.shape[0], rank, dtype=F64)
    a = torch.zeros(rank, matrix.shape[1], dtype=F64)
    for i in range(kept):
        sign = 1.0 if float(u[int(u[:, i].abs().argmax()), i]) >= 0 else -1.0
        b[:, i] = sign * math.sqrt(float(s[i])) * u[:, i]
        a[i] = sign * math.sqrt(float(s[i])) * vh[i]
    total = float(s.square().sum())
    error = math.sqrt(float(s[kept:].square().sum()) / total) if total > 0 else 0.0
    return b, a, error


def dense_sent(global_pair: Factors, rank: int) -> Factors:
    """What a site of ``rank`` is sent: the SVD truncation below r_G, the global padded above."""
    b_g, a_g = global_pair
    if rank >= a_g.shape[0]:
        b = torch.zeros(b_g.shape[0], rank, dtype=F64)
        a = torch.zeros(rank, a_g.shape[1], dtype=F64)
        b[:, : b_g.shape[1]] = b_g.to(F64)
        a[: a_g.shape[0]] = a_g.to(F64)
        return b, a
    b, a, _ = dense_truncation(product(b_g, a_g), rank)
    return b, a


def exact_mean_reference(
    global_pair: Factors, clients: list[Factors], weights: list[float], server_lr: float
) -> torch.Tensor:
    """P = B_G A_G + eta sum_t p_t (B_t A_t - B_Gt A_Gt), every matrix formed."""
    p = [w / sum(weights) for w in weights]
    full = product(*global_pair)
    for share, (b_t, a_t) in zip(p, clients, strict=True):
        sent = dense_sent(global_pair, a_t.shape[0])
        full = full + server_lr * share * (product(b_t, a_t) - product(*sent))
    return full


def equation_reference(
    sent: dict[int, Factors],
    clients: list[Factors],
    weights: list[float],
    fuse_weight: float,
    keep_ratio: float,
) -> torch.Tensor:
    """sum_t lambda_t sum_{i < r_t} c_t[i] (dB^_t[:, i] A_t[i] + B_Gt[:, i] dA^_t[i]), with
    c_t[i] = (T_i / T) s_t[i] / sum_{u: r_u > i} s_u[i], term by term."""
    count = len(clients)
    p = [w / sum(weights) for w in weights]
    pruned = []
    for b_t, a_t in clients:
        b_s, a_s = sent[a_t.shape[0]]
        da = a_t.to(F64) - a_s.to(F64)
        db = b_t.to(F64) - b_s.to(F64)
        da_p, _ = ref.prune(da, keep_ratio)
        db_p, _ = ref.prune(db, keep_ratio)
        pruned.append((db_p, da_p, ref.complementary_scale(da, da_p, None)))
    widest = max(a.shape[0] for _, a in clients)
    sums = [0.0] * widest
    owners = [0] * widest
    for (_, a_t), (_, _, scale) in zip(clients, pruned, strict=True):
        for i in range(a_t.shape[0]):
            sums[i] += scale[i]
            owners[i] += 1
    total = torch.zeros(clients[0][0].shape[0], clients[0][1].shape[1], dtype=F64)
    for t, ((_, a_t), (db_p, da_p, scale)) in enumerate(zip(clients, pruned, strict=True)):
        b_s = sent[a_t.shape[0]][0].to(F64)
        lam = fuse_weight * count * p[t]
        for i in range(a_t.shape[0]):
            c = owners[i] / count * scale[i] / sums[i]
            total += lam * c * torch.outer(db_p[:, i], a_t.to(F64)[i])
            total += lam * c * torch.outer(b_s[:, i], da_p[i])
    return total


# --- hand-checked ---------------------------------------------------------------------------------


def test_truncating_a_diagonal_keeps_its_largest_entries() -> None:
    # W = B A = diag(3, 2, 1) with A = I: singular values 3, 2, 1 on e1, e2, e3.
    b, a = torch.diag(torch.tensor([3.0, 2.0, 1.0])), torch.eye(3)
    one = truncate_to_rank(b, a, 1)
    # B_1 = e1 sqrt(3), A_1 = sqrt(3) e1^T; error sqrt((2^2 + 1^2) / (3^2 + 2^2 + 1^2)) = sqrt(5/14)
    torch.testing.assert_close(one.b, torch.tensor([[3**0.5], [0.0], [0.0]]))
    torch.testing.assert_close(one.a, torch.tensor([[3**0.5, 0.0, 0.0]]))
    assert one.relative_error == pytest.approx(math.sqrt(5 / 14))
    two = truncate_to_rank(b, a, 2)
    torch.testing.assert_close(
        product(two.b, two.a), torch.diag(torch.tensor([3.0, 2.0, 0.0], dtype=F64))
    )
    assert two.relative_error == pytest.approx(math.sqrt(1 / 14))
    assert two.total_energy == pytest.approx(14.0)
    # rank >= r: the factors themselves, unchanged, zero-padded; exact
    five = truncate_to_rank(b, a, 5)
    assert five.relative_error == 0.0
    assert torch.equal(five.b[:, :3], b) and torch.equal(five.a[:3], a)
    assert torch.equal(dead_directions(five.b, five.a), torch.tensor([False] * 3 + [True] * 2))
    dense = truncate_matrix(torch.diag(torch.tensor([3.0, 2.0, 1.0])), 1)
    torch.testing.assert_close(dense.b, one.b)
    torch.testing.assert_close(dense.a, one.a)


def test_a_negative_direction_keeps_u_positive_and_puts_the_sign_on_a() -> None:
    # W = diag(-2, 1): top singular value 2 with u = e1 (largest entry positive), v = -e1.
    truncated = truncate_to_rank(torch.diag(torch.tensor([-2.0, 1.0])), torch.eye(2), 1)
    torch.testing.assert_close(truncated.b, torch.tensor([[2**0.5], [0.0]]))
    torch.testing.assert_close(truncated.a, torch.tensor([[-(2**0.5), 0.0]]))
    assert truncated.relative_error == pytest.approx(math.sqrt(1 / 5))


def test_a_zero_product_truncates_to_zero_factors_a_included() -> None:
    # Round 0 with PEFT's zero B: the product is 0, so the best rank-1 pair is 0, and A's
    # initialisation is lost; both factors are zero, so the direction would never train.
    a = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    truncated = truncate_to_rank(torch.zeros(4, 3), a, 1)
    assert truncated.relative_error == 0.0
    assert not truncated.a.any() and not truncated.b.any()
    assert dead_directions(truncated.b, truncated.a).all()
    # slicing (HetLoRA's rule) keeps A's leading rows: B's zero column alone is trainable
    b_slice, a_slice = slice_to_rank(torch.zeros(4, 3), a, 1)
    assert torch.equal(a_slice, a[:1]) and not dead_directions(b_slice, a_slice).any()


def test_mixed_ranks_hand_checked_exact_mean_and_zero_padding() -> None:
    # Global rank 1, zero. Client 1 (rank 1): B = e1, A = e1^T, product E11. Client 2 (rank 2,
    # above the global's, sent zeros): B = I, A = diag(0, 1), product E22. p = (1/2, 1/2).
    b_g, a_g = torch.zeros(2, 1), torch.zeros(1, 2)
    clients_a = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0], [0.0, 1.0]])]
    clients_b = [torch.tensor([[1.0], [0.0]]), torch.eye(2)]
    for name in ("exact-mean", "svd"):
        merged = merge_mixed_ranks(method_of(name, {}), a_g, b_g, clients_a, clients_b)
        # exact mean: diag(1/2, 1/2), rank 2 = the target rank (the largest in use): exact
        assert merged.b.shape == (2, 2) and merged.a.shape == (2, 2)
        torch.testing.assert_close(
            product(merged.b, merged.a), torch.diag(torch.tensor([0.5, 0.5], dtype=F64))
        )
        assert merged.relative_error == pytest.approx(0.0, abs=1e-7)
    # zero padding: mean B = (diag(1, 0) + I) / 2 = diag(1, 1/2), mean A = diag(1/2, 1/2), so
    # the product is diag(1/2, 1/4): 1/4 short of the mean update on e2, relative
    # (1/4) / ||diag(1/2, 1/2)|| = sqrt(2) / 4.
    padded = merge_zero_padded(a_g, b_g, clients_a, clients_b)
    torch.testing.assert_close(padded.b, torch.diag(torch.tensor([1.0, 0.5])))
    torch.testing.assert_close(padded.a, torch.diag(torch.tensor([0.5, 0.5])))
    assert padded.relative_error == pytest.approx(math.sqrt(2) / 4, rel=1e-6)
    assert padded.update_relative_error == pytest.approx(math.sqrt(2) / 4, rel=1e-6)


def test_mixed_ranks_hand_checked_truncation_to_a_smaller_target() -> None:
    # Balanced global B_G = A_G = diag(sqrt2, 1) (product diag(2, 1)). Client 1, rank 1, is
    # sent (sqrt2 e1, sqrt2 e1^T) and returns A_1 = [sqrt2, sqrt2]: U_1 = [[0, 2], [0, 0]].
    # Client 2, rank 2, is sent the global and returns A_2 = diag(sqrt2, 3): U_2 = diag(0, 2).
    # M = [[0, 1], [0, 1]], P = [[2, 1], [0, 2]]; P^T P = [[4, 2], [2, 5]] has eigenvalues
    # (9 +- sqrt17) / 2, so rank 1 keeps sqrt((9 + sqrt17) / 2) and drops
    # sqrt(((9 - sqrt17) / 2) / 9) of ||P|| = 3; the step ||M|| is sqrt2.
    root2 = 2**0.5
    b_g = torch.diag(torch.tensor([root2, 1.0]))
    a_g = torch.diag(torch.tensor([root2, 1.0]))
    clients_a = [torch.tensor([[root2, root2]]), torch.diag(torch.tensor([root2, 3.0]))]
    clients_b = [torch.tensor([[root2], [0.0]]), b_g.clone()]
    method = method_of("exact-mean", {})
    full = merge_mixed_ranks(method, a_g, b_g, clients_a, clients_b)
    torch.testing.assert_close(
        product(full.b, full.a), torch.tensor([[2.0, 1.0], [0.0, 2.0]], dtype=F64)
    )
    one = merge_mixed_ranks(method, a_g, b_g, clients_a, clients_b, rank=1)
    dropped = math.sqrt((9 - math.sqrt(17)) / 2)
    assert one.b.shape == (2, 1)
    assert one.relative_error == pytest.approx(dropped / 3, rel=1e-5)
    assert one.update_relative_error == pytest.approx(dropped / root2, rel=1e-5)
    # Zero padding: only A moved (dA_1 = [0, sqrt2] padded, dA_2 = diag(0, 2)), so the mean of
    # the padded factors is the exact mean here: no gap.
    padded = merge_zero_padded(a_g, b_g, clients_a, clients_b)
    torch.testing.assert_close(product(padded.b, padded.a), product(full.b, full.a))
    assert padded.relative_error == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("name", "options", "accepted", "hint"),
    [
        ("svd", {}, True, "products"),
        ("exact-mean", {}, True, "products"),
        ("robustmerge", {"mode": "paper-equation"}, True, "own rank"),
        ("robustmerge", {}, False, "paper-equation"),
        ("fedavg", {}, False, "entry by entry"),
        ("ties", {}, False, "sign election"),
        ("dare", {}, False, "drop masks"),
        ("task_arithmetic", {}, False, "no round form"),
    ],
)
def test_which_methods_take_mixed_ranks_and_why(
    name: str, options: dict[str, object], accepted: bool, hint: str
) -> None:
    method = create_method(name, **options)
    support = mixed_rank_support(method)
    assert support.mixed_ranks is accepted
    assert hint in support.reason
    if not accepted:
        (b_g, a_g), clients = round_inputs(0, [2, 4], global_rank=4)
        with pytest.raises(MixedRankError, match=hint):
            merge_mixed_ranks(method, a_g, b_g, [c[1] for c in clients], [c[0] for c in clients])


def test_bad_inputs_are_refused_with_what_came_and_what_to_do() -> None:
    (b_g, a_g), clients = round_inputs(1, [2, 4], global_rank=4)
    a_list, b_list = [c[1] for c in clients], [c[0] for c in clients]
    method = method_of("svd", {})
    with pytest.raises(MergeInputError, match=r"adapter node-7: module is 9 x 11"):
        merge_mixed_ranks(
            method, a_g, b_g, [a_list[0], torch.zeros(4, 5)], b_list, labels=["node-6", "node-7"]
        )
    with pytest.raises(MergeInputError, match="one r_t"):
        merge_mixed_ranks(method, a_g, b_g, [a_list[0], a_list[0]], b_list)
    with pytest.raises(MergeInputError, match="below a client's rank 4"):
        merge_zero_padded(a_g, b_g, a_list, b_list, rank=3)
    with pytest.raises(MergeInputError, match="no sent factors for rank 2"):
        merge_mixed_ranks(method, a_g, b_g, a_list, b_list, sent={4: (b_g, a_g)})
    with pytest.raises(MergeInputError, match="order of the product"):
        truncate_to_rank(a_g, b_g, 2)
    for rank in (0, True, 2.0):
        with pytest.raises(ValueError, match="rank must be an integer"):
            truncate_to_rank(b_g, a_g, rank)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "options"), PRODUCT_METHODS)
def test_a_rank_whose_clients_weigh_zero_adds_nothing(
    name: str, options: dict[str, object]
) -> None:
    (b_g, a_g), clients = round_inputs(7, [2, 4, 4])
    a_list, b_list = [c[1] for c in clients], [c[0] for c in clients]
    method = method_of(name, options)
    with_zero = merge_mixed_ranks(method, a_g, b_g, a_list, b_list, [0.0, 1.0, 3.0])
    if name == "robustmerge":  # the zero-weight client still enters the scale normalisation
        assert torch.isfinite(with_zero.a).all() and torch.isfinite(with_zero.b).all()
        return
    without = merge_mixed_ranks(method, a_g, b_g, a_list[1:], b_list[1:], [1.0, 3.0])
    assert relative(product(with_zero.b, with_zero.a), product(without.b, without.a)) < 1e-5


# --- invariants (hypothesis) ----------------------------------------------------------------------


@SETTINGS
@given(
    seed=st.integers(min_value=0, max_value=2**20),
    d_out=st.integers(min_value=1, max_value=12),
    d_in=st.integers(min_value=1, max_value=12),
    rank=st.integers(min_value=1, max_value=8),
)
def test_truncation_shapes_full_rank_exactness_and_monotone_error(
    seed: int, d_out: int, d_in: int, rank: int
) -> None:
    b, a = random_pair(torch.Generator().manual_seed(seed), d_out, d_in, rank)
    full = product(b, a)
    true_rank = min(d_out, d_in, rank)
    errors = []
    for k in range(1, rank + 3):
        truncated = truncate_to_rank(b, a, k)
        assert truncated.b.shape == (d_out, k) and truncated.a.shape == (k, d_in)
        assert truncated.b.dtype == torch.float32 and truncated.a.dtype == torch.float32
        assert truncated.relative_error is not None
        errors.append(truncated.relative_error)
        if k >= true_rank:
            assert truncated.relative_error < 1e-6
            assert relative(product(truncated.b, truncated.a), full) < 1e-5
    for smaller, larger in itertools.pairwise(errors):
        assert larger <= smaller + 1e-7


@SETTINGS
@given(
    seed=st.integers(min_value=0, max_value=2**20),
    ranks=st.lists(st.sampled_from([1, 2, 4, 6, 8]), min_size=2, max_size=5),
    order=st.randoms(use_true_random=False),
)
def test_client_order_does_not_change_the_mixed_rank_merge(
    seed: int, ranks: list[int], order: random.Random
) -> None:
    (b_g, a_g), clients = round_inputs(seed, ranks)
    weights = [float(t + 1) for t in range(len(ranks))]
    permutation = list(range(len(ranks)))
    order.shuffle(permutation)
    shuffled = [clients[i] for i in permutation]
    shuffled_weights = [weights[i] for i in permutation]

    def run(method: MergeMethod | None, inputs: list[Factors], w: list[float]) -> torch.Tensor:
        a_list, b_list = [c[1] for c in inputs], [c[0] for c in inputs]
        if method is None:
            merged = merge_zero_padded(a_g, b_g, a_list, b_list, w, server_lr=0.5)
        else:
            merged = merge_mixed_ranks(method, a_g, b_g, a_list, b_list, w, server_lr=0.5)
        assert merged.b.shape == (9, max(6, *ranks)) and merged.a.shape == (max(6, *ranks), 11)
        return product(merged.b, merged.a)

    for name, options in PRODUCT_METHODS:
        method = method_of(name, options)
        err = relative(run(method, shuffled, shuffled_weights), run(method, clients, weights))
        assert err < 1e-5, f"{name} {options}: {err:.2e}"
    assert relative(run(None, shuffled, shuffled_weights), run(None, clients, weights)) < 1e-5


@SETTINGS
@given(
    seed=st.integers(min_value=0, max_value=2**20),
    count=st.integers(min_value=1, max_value=4),
    rank=st.integers(min_value=1, max_value=6),
    server_lr=st.sampled_from([1.0, 0.5]),
)
def test_equal_ranks_give_merge_round_bit_for_bit(
    seed: int, count: int, rank: int, server_lr: float
) -> None:
    (b_g, a_g), clients = round_inputs(seed, [rank] * count, global_rank=rank)
    base = {A_KEY: a_g, B_KEY: b_g}
    client_dicts = [{A_KEY: a, B_KEY: b} for b, a in clients]
    weights = [float(3 + t) for t in range(count)]
    a_list, b_list = [c[1] for c in clients], [c[0] for c in clients]
    for name, options in PRODUCT_METHODS:
        method = method_of(name, options)
        want = merge_round(base, client_dicts, method, weights, server_lr=server_lr, device="cpu")
        got = merge_mixed_ranks(method, a_g, b_g, a_list, b_list, weights, server_lr=server_lr)
        assert torch.equal(got.a, want.tensors[A_KEY]), name
        assert torch.equal(got.b, want.tensors[B_KEY]), name
        assert got.relative_error == want.report.relative_error
        assert got.update_relative_error == want.report.update_relative_error
    # zero padding at equal ranks is fedavg's round form
    fedavg = merge_round(
        base, client_dicts, method_of("fedavg", {}), weights, server_lr=server_lr, device="cpu"
    )
    padded = merge_zero_padded(a_g, b_g, a_list, b_list, weights, server_lr=server_lr)
    torch.testing.assert_close(padded.a, fedavg.tensors[A_KEY], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(padded.b, fedavg.tensors[B_KEY], rtol=1e-6, atol=1e-7)


@SETTINGS
@given(
    seed=st.integers(min_value=0, max_value=2**20),
    ranks=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=4),
    copies=st.sampled_from([2, 3]),
)
def test_copies_of_every_client_move_the_global_as_far_as_one_set(
    seed: int, ranks: list[int], copies: int
) -> None:
    (b_g, a_g), clients = round_inputs(seed, ranks)
    a_list, b_list = [c[1] for c in clients], [c[0] for c in clients]
    for name, options in PRODUCT_METHODS:
        method = method_of(name, options)
        once = merge_mixed_ranks(method, a_g, b_g, a_list, b_list)
        many = merge_mixed_ranks(method, a_g, b_g, a_list * copies, b_list * copies)
        err = relative(product(many.b, many.a), product(once.b, once.a))
        assert err < 1e-5, f"{name} {options} x{copies}: {err:.2e}"


@SETTINGS
@given(
    seed=st.integers(min_value=0, max_value=2**20),
    ranks=st.lists(st.sampled_from([1, 3, 6, 8]), min_size=2, max_size=4),
)
def test_paper_equation_with_nothing_pruned_is_the_exact_mean_at_mixed_ranks(
    seed: int, ranks: list[int]
) -> None:
    (b_g, a_g), clients = round_inputs(seed, ranks)
    a_list, b_list = [c[1] for c in clients], [c[0] for c in clients]
    weights = [float(t + 1) for t in range(len(ranks))]
    equation = method_of("robustmerge", {"mode": "paper-equation", "keep_ratio": 1.0})
    exact = method_of("exact-mean", {})
    p = torch.tensor(weights) / sum(weights)
    left_e, right_e = mixed_rank_update_terms(equation, a_g, b_g, a_list, b_list, p)
    left_x, right_x = mixed_rank_update_terms(exact, a_g, b_g, a_list, b_list, p)
    # lambda = 2 (the default fuse weight) times the exact mean
    assert relative(product(left_e, right_e), 2.0 * product(left_x, right_x)) < 1e-5


@SETTINGS
@given(
    seed=st.integers(min_value=0, max_value=2**20),
    ranks=st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=4),
)
def test_clients_that_return_what_they_were_sent_leave_the_global_where_it_was(
    seed: int, ranks: list[int]
) -> None:
    (b_g, a_g), _ = round_inputs(seed, ranks)
    sent = [_sent(b_g, a_g, r) for r in ranks]
    a_list, b_list = [s[1] for s in sent], [s[0] for s in sent]
    for name, options in PRODUCT_METHODS:
        merged = merge_mixed_ranks(method_of(name, options), a_g, b_g, a_list, b_list)
        assert relative(product(merged.b, merged.a), product(b_g, a_g)) < 1e-5, name
    padded = merge_zero_padded(a_g, b_g, a_list, b_list)
    assert relative(product(padded.b, padded.a), product(b_g, a_g)) < 1e-5


def test_the_round_form_keeps_what_flexloras_product_average_drops() -> None:
    # FlexLoRA's paper averages the full products, sum_t p_t B_t A_t; the round form adds
    # B_G A_G - sum_t p_t B_Gt A_Gt, the global's part that lower-rank sites were not sent.
    (b_g, a_g), clients = round_inputs(6, [2, 4, 6])
    a_list, b_list = [c[1] for c in clients], [c[0] for c in clients]
    p = torch.tensor([0.5, 0.25, 0.25])
    left, right = mixed_rank_update_terms(method_of("svd", {}), a_g, b_g, a_list, b_list, p)
    ours = product(b_g, a_g) + product(left, right)
    flexlora = sum(float(p[t]) * product(b, a) for t, (b, a) in enumerate(clients))
    unsent = product(b_g, a_g) - sum(
        float(p[t]) * product(*dense_sent((b_g, a_g), a.shape[0]))
        for t, (_, a) in enumerate(clients)
    )
    assert float(unsent.norm()) > 0.1 * float(product(b_g, a_g).norm())
    assert relative(ours - flexlora, unsent) < 1e-5


# --- parity with the float64 reading ----------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "d_out", "d_in", "rank", "k"),
    [(0, 20, 30, 8, 3), (1, 30, 20, 8, 5), (2, 6, 40, 8, 4), (3, 40, 6, 8, 7), (4, 16, 16, 3, 1)],
)
def test_truncation_against_the_dense_svd(
    seed: int, d_out: int, d_in: int, rank: int, k: int
) -> None:
    b, a = random_pair(torch.Generator().manual_seed(seed), d_out, d_in, rank)
    want_b, want_a, want_error = dense_truncation(product(b, a), k)
    got = truncate_to_rank(b, a, k)
    # the factors themselves, not only their product (same sign convention)
    torch.testing.assert_close(got.b.to(F64), want_b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.a.to(F64), want_a, rtol=1e-4, atol=1e-4)
    assert got.relative_error == pytest.approx(want_error, rel=1e-6, abs=1e-9)
    dense = truncate_matrix(product(b, a), k)
    torch.testing.assert_close(dense.b, got.b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dense.a, got.a, rtol=1e-4, atol=1e-4)
    assert dense.relative_error == pytest.approx(want_error, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(
    ("seed", "ranks", "global_rank", "target", "server_lr"),
    [
        (0, [4, 8, 16], 16, None, 1.0),
        (1, [2, 2, 6], 6, None, 0.5),
        (2, [1, 4, 8, 3], 4, None, 2.0),  # clients above the global's rank: padded global sent
        (3, [4, 8, 16], 16, 8, 1.0),  # a target below the largest client rank
    ],
)
def test_exact_mean_mixed_ranks_against_the_formed_matrices(
    seed: int, ranks: list[int], global_rank: int, target: int | None, server_lr: float
) -> None:
    (b_g, a_g), clients = round_inputs(seed, ranks, global_rank=global_rank, d_out=24, d_in=20)
    weights = [float(2 * t + 1) for t in range(len(ranks))]
    full = exact_mean_reference((b_g, a_g), clients, weights, server_lr)
    step = full - product(b_g, a_g)
    rank = target if target is not None else max(global_rank, *ranks)
    best_b, best_a, error = dense_truncation(full, rank)
    for name in ("exact-mean", "svd"):
        got = merge_mixed_ranks(
            method_of(name, {}),
            a_g,
            b_g,
            [c[1] for c in clients],
            [c[0] for c in clients],
            weights,
            server_lr=server_lr,
            rank=target,
        )
        assert got.b.shape == (24, rank)
        assert relative(product(got.b, got.a), best_b @ best_a) < 1e-5
        assert got.relative_error == pytest.approx(error, rel=1e-4, abs=1e-7)
        lost = float((best_b @ best_a - full).norm() / step.norm())
        assert got.update_relative_error == pytest.approx(lost, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize(
    ("seed", "ranks", "keep_ratio", "weights"),
    [
        (0, [2, 4, 6], 0.2, [1.0, 1.0, 1.0]),
        (1, [6, 2, 2, 4], 0.5, [3.0, 1.0, 2.0, 2.0]),
        (2, [1, 8], 0.3, [1.0, 2.0]),  # a client above the global's rank 6
    ],
)
def test_paper_equation_mixed_ranks_against_its_float64_reading(
    seed: int, ranks: list[int], keep_ratio: float, weights: list[float]
) -> None:
    (b_g, a_g), clients = round_inputs(seed, ranks)
    sent = {r: dense_sent((b_g, a_g), r) for r in set(ranks)}
    sent32 = {r: (b.to(torch.float32), a.to(torch.float32)) for r, (b, a) in sent.items()}
    method = method_of("robustmerge", {"mode": "paper-equation", "keep_ratio": keep_ratio})
    p = torch.tensor(weights) / sum(weights)
    left, right = mixed_rank_update_terms(
        method, a_g, b_g, [c[1] for c in clients], [c[0] for c in clients], p, sent=sent32
    )
    want = equation_reference(sent32, clients, weights, 2.0, keep_ratio)
    assert relative(product(left, right), want) < 1e-5
    # the default sent factors are truncate_to_rank's, which the dense reading matches
    default = mixed_rank_update_terms(
        method, a_g, b_g, [c[1] for c in clients], [c[0] for c in clients], p
    )
    assert relative(product(*default), want) < 1e-4


def test_zero_padding_against_its_float64_reading() -> None:
    (b_g, a_g), clients = round_inputs(5, [2, 6, 8, 4])
    weights = [1.0, 2.0, 3.0, 4.0]
    p = [w / sum(weights) for w in weights]
    got = merge_zero_padded(
        a_g, b_g, [c[1] for c in clients], [c[0] for c in clients], weights, server_lr=0.5
    )
    want_b = torch.zeros(9, 8, dtype=F64)
    want_a = torch.zeros(8, 11, dtype=F64)
    want_b[:, :6] = b_g.to(F64)
    want_a[:6] = a_g.to(F64)
    for share, (b_t, a_t) in zip(p, clients, strict=True):
        r = a_t.shape[0]
        sent_b = torch.zeros(9, r, dtype=F64)
        sent_a = torch.zeros(r, 11, dtype=F64)
        kept = min(r, 6)
        sent_b[:, :kept] = b_g.to(F64)[:, :kept]
        sent_a[:kept] = a_g.to(F64)[:kept]
        want_b[:, :r] += 0.5 * share * (b_t.to(F64) - sent_b)
        want_a[:r] += 0.5 * share * (a_t.to(F64) - sent_a)
    torch.testing.assert_close(got.b.to(F64), want_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.a.to(F64), want_a, rtol=1e-5, atol=1e-6)
    exact = product(b_g, a_g) + 0.5 * sum(
        share * (product(b_t, a_t) - product(*slice_to_rank(b_g, a_g, a_t.shape[0])))
        for share, (b_t, a_t) in zip(p, clients, strict=True)
    )
    assert got.relative_error == pytest.approx(relative(want_b @ want_a, exact), rel=1e-4, abs=1e-7)
