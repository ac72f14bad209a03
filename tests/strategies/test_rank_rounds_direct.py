"""Direct checks of ``rank_rounds`` (mixed LoRA ranks, issue 16) against float64 readings written
here and against whole refusal messages: the one-group path, zero-weight groups, the sent factors,
the per-direction normalisation of paper-equation RobustMerge, the reported errors and energies,
and every refusal of ``_checked_round`` and ``_sent_pair``.
"""

from __future__ import annotations

import re

import pytest
import torch

from strategies.merging import create_method
from strategies.merging.errors import MergeInputError
from strategies.merging.exact_mean import ExactMean
from strategies.merging.method import MergeMethod, task_coefficients
from strategies.merging.rank_rounds import (
    _checked_round,
    _rank_groups,
    _sent_pair,
    merge_mixed_ranks,
    merge_zero_padded,
    mixed_rank_update_terms,
)
from strategies.merging.ranks import MixedRankError, mixed_rank_support, truncate_to_rank
from strategies.merging.robustmerge import RobustMerge

F64 = torch.float64
D_OUT, D_IN, GLOBAL_RANK = 9, 11, 6


def exact(message: str) -> str:
    """A pattern matching the whole message."""
    return "^" + re.escape(message) + "$"


def factors(seed: int, rank: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, A) pair of ``rank``: B D_OUT x rank, A rank x D_IN."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(D_OUT, rank, generator=g) * scale,
        torch.randn(rank, D_IN, generator=g) * scale,
    )


def own_sent(ranks: list[int], seed: int = 100) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Sent factors per rank that are not the global's truncation (so a default is visible)."""
    return {rank: factors(seed + rank, rank, 0.5) for rank in sorted(set(ranks))}


def clients_from(
    sent: dict[int, tuple[torch.Tensor, torch.Tensor]], ranks: list[int], seed: int = 7
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Clients that trained from what their rank was sent: (A list, B list)."""
    g = torch.Generator().manual_seed(seed)
    a_list, b_list = [], []
    for rank in ranks:
        b_sent, a_sent = sent[rank]
        b_list.append(b_sent + 0.2 * torch.randn(b_sent.shape, generator=g))
        a_list.append(a_sent + 0.2 * torch.randn(a_sent.shape, generator=g))
    return a_list, b_list


def exact_mean_update(
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    p: list[float],
    sent: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """sum_t p_t (B_t A_t - B_sent A_sent), the d_out x d_in matrices formed in float64."""
    total = torch.zeros(D_OUT, D_IN, dtype=F64)
    for share, a_t, b_t in zip(p, a_list, b_list, strict=True):
        b_s, a_s = sent[int(a_t.shape[0])]
        total += share * (b_t.to(F64) @ a_t.to(F64) - b_s.to(F64) @ a_s.to(F64))
    return total


def best_cut(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, float, float]:
    """The best rank-``rank`` approximation (full float64 SVD), its dropped and total energy."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    cut = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
    return cut, float(s[rank:].square().sum()), float(s.square().sum())


def equation_method(keep_ratio: float = 0.5, fuse_weight: float = 1.5) -> MergeMethod:
    return create_method(
        "robustmerge", mode="paper-equation", keep_ratio=keep_ratio, fuse_weight=fuse_weight
    ).round_form()


def equation_update(
    method: RobustMerge,
    a_list: list[torch.Tensor],
    b_list: list[torch.Tensor],
    p: torch.Tensor,
    sent: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """M = sum_t lambda_t [dB^_t diag(c_t) A_t + B_sent diag(c_t) dA^_t] with
    c_t[i] = (T_i / T) s_t[i] / sum_{u: r_u > i} s_u[i], client by client in float64."""
    count = len(a_list)
    lambdas = task_coefficients(method.fuse_weight, p).to(F64)
    pieces = []
    for a_t, b_t in zip(a_list, b_list, strict=True):
        b_s, a_s = sent[int(a_t.shape[0])]
        a_hat, b_hat, s = method.prune_and_scale((a_t - a_s)[None], (b_t - b_s)[None])
        pieces.append((a_hat[0].to(F64), b_hat[0].to(F64), s[0].to(F64)))
    total = torch.zeros(D_OUT, D_IN, dtype=F64)
    for t, (a_hat, b_hat, s) in enumerate(pieces):
        rank = int(a_list[t].shape[0])
        c = torch.zeros(rank, dtype=F64)
        for i in range(rank):
            owners = [u for u in range(count) if int(a_list[u].shape[0]) > i]
            c[i] = (len(owners) / count) * s[i] / sum(float(pieces[u][2][i]) for u in owners)
        b_s = sent[rank][0].to(F64)
        total += lambdas[t] * (
            b_hat @ torch.diag(c) @ a_list[t].to(F64) + b_s @ torch.diag(c) @ a_hat
        )
    return total


# --- mixed_rank_update_terms ------------------------------------------------------------------


def test_update_terms_refuse_a_factor_wise_method_with_its_reason() -> None:
    """A method without a mixed-rank form is refused with ``mixed_rank_support``'s reason."""
    method = create_method("fedavg").round_form()
    b_g, a_g = factors(0, GLOBAL_RANK)
    a_list, b_list = clients_from(own_sent([2, 4]), [2, 4])
    reason = mixed_rank_support(method).reason
    assert reason
    with pytest.raises(MixedRankError, match=exact(reason)):
        mixed_rank_update_terms(method, a_g, b_g, a_list, b_list, torch.tensor([0.5, 0.5]))


@pytest.mark.parametrize("ranks", [[2, 2, 2], [4, 2, 6, 2]])
def test_exact_mean_terms_are_the_float64_weighted_update(ranks: list[int]) -> None:
    """L @ R = sum_t p_t (B_t A_t - B_sent A_sent), K = sum_t r_t + sum of distinct ranks."""
    b_g, a_g = factors(1, GLOBAL_RANK)
    sent = own_sent(ranks)
    a_list, b_list = clients_from(sent, ranks)
    raw = torch.tensor([1.0, 3.0, 2.0, 5.0][: len(ranks)], dtype=F64)
    p = (raw / raw.sum()).to(torch.float32)
    left, right = mixed_rank_update_terms(ExactMean(), a_g, b_g, a_list, b_list, p, sent=sent)
    expected = exact_mean_update(a_list, b_list, p.tolist(), sent)
    assert left.shape == (D_OUT, sum(ranks) + sum(set(ranks)))
    assert right.shape == (sum(ranks) + sum(set(ranks)), D_IN)
    actual = left.to(F64) @ right.to(F64)
    assert torch.allclose(actual, expected, rtol=0, atol=2e-6)


def test_one_group_hands_back_the_methods_own_terms_unchanged() -> None:
    """One rank in use: ``method.update_terms`` of all clients against its sent pair, exactly."""
    b_g, a_g = factors(2, GLOBAL_RANK)
    sent = own_sent([3])
    a_list, b_list = clients_from(sent, [3, 3])
    p = torch.tensor([0.25, 0.75])
    left, right = mixed_rank_update_terms(ExactMean(), a_g, b_g, a_list, b_list, p, sent=sent)
    b_s, a_s = sent[3]
    want_left, want_right = ExactMean().update_terms(
        a_s, b_s, torch.stack(a_list), torch.stack(b_list), p
    )
    assert torch.equal(left, want_left) and torch.equal(right, want_right)


def test_default_sent_factors_are_the_globals_truncation() -> None:
    """Without ``sent`` each rank's sites were sent the best rank-r cut of B_G A_G."""
    b_g, a_g = factors(3, GLOBAL_RANK)
    ranks = [2, 4]
    sent = {r: (truncate_to_rank(b_g, a_g, r).b, truncate_to_rank(b_g, a_g, r).a) for r in ranks}
    a_list, b_list = clients_from(sent, ranks)
    p = torch.tensor([0.4, 0.6])
    left, right = mixed_rank_update_terms(ExactMean(), a_g, b_g, a_list, b_list, p)
    expected = exact_mean_update(a_list, b_list, p.tolist(), sent)
    assert torch.allclose(left.to(F64) @ right.to(F64), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("weights", [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
def test_a_group_of_zero_weight_adds_nothing_and_stops_nothing(weights: list[float]) -> None:
    """A zero-weight rank group is skipped, later groups still count, a full-weight one stays."""
    b_g, a_g = factors(4, GLOBAL_RANK)
    ranks = [2, 4, 5]
    sent = own_sent(ranks)
    a_list, b_list = clients_from(sent, ranks)
    p = torch.tensor(weights) / sum(weights)
    left, right = mixed_rank_update_terms(ExactMean(), a_g, b_g, a_list, b_list, p, sent=sent)
    width = sum(2 * r for r, w in zip(ranks, weights, strict=True) if w > 0)
    assert left.shape == (D_OUT, width) and right.shape == (width, D_IN)
    expected = exact_mean_update(a_list, b_list, p.tolist(), sent)
    assert torch.allclose(left.to(F64) @ right.to(F64), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("ranks", [[2, 4, 4, 6], [3, 3], [5, 2]])
def test_equation_terms_are_the_float64_per_direction_normalisation(ranks: list[int]) -> None:
    """Paper-equation: c_t[i] = (T_i / T) s_t[i] / sum_{u: r_u > i} s_u[i], in float64."""
    method = equation_method()
    assert isinstance(method, RobustMerge)
    b_g, a_g = factors(5, GLOBAL_RANK)
    sent = own_sent(ranks)
    a_list, b_list = clients_from(sent, ranks, seed=11)
    raw = torch.tensor([2.0, 1.0, 4.0, 3.0][: len(ranks)], dtype=F64)
    p = (raw / raw.sum()).to(torch.float32)
    left, right = mixed_rank_update_terms(method, a_g, b_g, a_list, b_list, p, sent=sent)
    expected = equation_update(method, a_list, b_list, p, sent)
    actual = left.to(F64) @ right.to(F64)
    assert float((actual - expected).norm()) <= 1e-5 * float(expected.norm())
    assert left.shape == (D_OUT, sum(ranks) + sum(set(ranks)))  # per group: clients, B_sent


# --- merge_mixed_ranks ------------------------------------------------------------------------


@pytest.mark.parametrize(("server_lr", "rank"), [(0.7, 3), (1.3, None)])
def test_merge_is_the_best_cut_of_the_float64_step_with_its_energies(
    server_lr: float, rank: int | None
) -> None:
    """P = B_G A_G + eta M cut to the target rank, with its energies and both errors."""
    b_g, a_g = factors(6, 4)
    ranks = [2, 6, 3]
    sent = own_sent(ranks)
    a_list, b_list = clients_from(sent, ranks)
    weights = [1.0, 2.0, 3.0]
    result = merge_mixed_ranks(
        ExactMean(),
        a_g,
        b_g,
        a_list,
        b_list,
        weights,
        server_lr=server_lr,
        rank=rank,
        sent=sent,
    )
    target = 6 if rank is None else rank
    assert result.b.shape == (D_OUT, target) and result.a.shape == (target, D_IN)
    assert result.b.dtype == torch.float32 and result.a.dtype == torch.float32
    p = torch.tensor(weights, dtype=F64) / sum(weights)
    update = server_lr * exact_mean_update(a_list, b_list, p.to(torch.float32).tolist(), sent)
    full = b_g.to(F64) @ a_g.to(F64) + update
    cut, dropped, total = best_cut(full, target)
    update_energy = float(update.square().sum())
    product = result.b.to(F64) @ result.a.to(F64)
    assert float((product - cut).norm()) <= 1e-5 * float(cut.norm())
    assert result.total_energy == pytest.approx(total, rel=1e-6)
    assert result.update_energy == pytest.approx(update_energy, rel=1e-5)
    assert result.dropped_energy == pytest.approx(dropped, rel=1e-4, abs=1e-9)
    assert result.relative_error == pytest.approx((dropped / total) ** 0.5, rel=1e-4, abs=1e-6)
    assert result.update_relative_error == pytest.approx(
        (dropped / update_energy) ** 0.5, rel=1e-4, abs=1e-6
    )
    if rank is not None:
        assert result.dropped_energy > 0 and result.relative_error > 0
        assert result.update_relative_error > 0


def test_merge_with_small_update_reports_its_update_error() -> None:
    """An update of energy below 1 still reports ||B A - P|| / ||eta M|| (not 0)."""
    b_g, a_g = factors(7, GLOBAL_RANK)
    ranks = [2, 4]
    sent = own_sent(ranks)
    a_list = [a_s + 1e-3 * torch.ones_like(a_s) for _, a_s in (sent[2], sent[4])]
    b_list = [b_s + 1e-3 * torch.ones_like(b_s) for b_s, _ in (sent[2], sent[4])]
    result = merge_mixed_ranks(ExactMean(), a_g, b_g, a_list, b_list, rank=2, sent=sent)
    assert 0 < result.update_energy < 1
    assert result.update_relative_error == pytest.approx(
        (result.dropped_energy / result.update_energy) ** 0.5, rel=1e-12
    )
    assert result.update_relative_error > 0


def test_merge_of_clients_that_did_not_move_has_zero_errors() -> None:
    """Zero factors sent and returned: M = 0, update energy 0 and its error 0.0 (not 0 / 0)."""
    b_g, a_g = factors(8, GLOBAL_RANK)
    ranks = [2, 4]
    sent = {r: (torch.zeros(D_OUT, r), torch.zeros(r, D_IN)) for r in ranks}
    a_list = [torch.zeros(r, D_IN) for r in ranks]
    b_list = [torch.zeros(D_OUT, r) for r in ranks]
    result = merge_mixed_ranks(ExactMean(), a_g, b_g, a_list, b_list, sent=sent)
    assert result.update_energy == 0.0
    assert result.update_relative_error == 0.0
    assert result.relative_error == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(result.b @ result.a, b_g @ a_g, atol=1e-5)


def test_merge_defaults_are_equal_weights_and_a_unit_step() -> None:
    """weights None is equal weights and server_lr defaults to 1.0, bit for bit."""
    b_g, a_g = factors(9, GLOBAL_RANK)
    ranks = [2, 4, 4]
    sent = own_sent(ranks)
    a_list, b_list = clients_from(sent, ranks)
    default = merge_mixed_ranks(ExactMean(), a_g, b_g, a_list, b_list, sent=sent)
    explicit = merge_mixed_ranks(
        ExactMean(), a_g, b_g, a_list, b_list, [1.0, 1.0, 1.0], server_lr=1.0, sent=sent
    )
    assert torch.equal(default.a, explicit.a) and torch.equal(default.b, explicit.b)
    assert default.relative_error == explicit.relative_error


def test_merge_takes_the_sent_factors_it_is_given() -> None:
    """``sent`` reaches the update terms: other sent factors give the other float64 update."""
    b_g, a_g = factors(10, GLOBAL_RANK)
    ranks = [2, 4]
    sent = own_sent(ranks)
    a_list, b_list = clients_from(sent, ranks)
    result = merge_mixed_ranks(ExactMean(), a_g, b_g, a_list, b_list, sent=sent, rank=6)
    update = exact_mean_update(a_list, b_list, [0.5, 0.5], sent)
    expected = b_g.to(F64) @ a_g.to(F64) + update
    cut, _, _ = best_cut(expected, 6)
    product = result.b.to(F64) @ result.a.to(F64)
    assert float((product - cut).norm()) <= 1e-5 * float(cut.norm())


def test_merge_refuses_a_bad_rank() -> None:
    """An explicit target rank below 1 is refused by ``check_rank``."""
    b_g, a_g = factors(11, GLOBAL_RANK)
    sent = own_sent([2])
    a_list, b_list = clients_from(sent, [2])
    with pytest.raises(ValueError, match=exact("rank must be an integer >= 1, got 0")):
        merge_mixed_ranks(ExactMean(), a_g, b_g, a_list, b_list, rank=0, sent=sent)


def test_merge_names_clients_by_their_labels() -> None:
    """``labels`` reach the checks: the faulty client is named by its label."""
    b_g, a_g = factors(12, GLOBAL_RANK)
    good_b, good_a = factors(13, 2)
    bad_a = torch.randn(2, D_IN + 1)
    with pytest.raises(
        MergeInputError,
        match=exact(
            f"adapter site-b: module is {D_OUT} x {D_IN} in the global but B ({D_OUT}, 2), "
            f"A (2, {D_IN + 1}) here; a client's rank may differ, its module's size may not"
        ),
    ):
        merge_mixed_ranks(
            ExactMean(), a_g, b_g, [good_a, bad_a], [good_b, good_b], labels=["a", "site-b"]
        )


# --- _checked_round ---------------------------------------------------------------------------


def test_checked_round_returns_float32_copies() -> None:
    """Float32 copies of the global and of every client, detached, the same values as a cast."""
    b_g, a_g = factors(14, GLOBAL_RANK)
    b_t, a_t = factors(15, 3)
    a_g64 = a_g.to(F64).requires_grad_(True)
    b_t64 = b_t.to(F64).requires_grad_(True)
    a_out, b_out, a_list, b_list = _checked_round(a_g64, b_g.to(F64), [a_t.to(F64)], [b_t64], None)
    for got, want in ((a_out, a_g), (b_out, b_g), (a_list[0], a_t), (b_list[0], b_t)):
        assert got.dtype == torch.float32 and not got.requires_grad
        assert torch.equal(got, want)
    assert len(a_list) == 1 and len(b_list) == 1


def test_checked_round_refuses_counts_with_whole_messages() -> None:
    """No clients, unequal A and B counts, and labels of the wrong length are refused."""
    b_g, a_g = factors(16, GLOBAL_RANK)
    b_t, a_t = factors(17, 2)
    with pytest.raises(MergeInputError, match=exact("nothing to merge: zero clients were given")):
        _checked_round(a_g, b_g, [], [], None)
    with pytest.raises(
        MergeInputError,
        match=exact("2 A factors but 1 B factors; give one of each per client"),
    ):
        _checked_round(a_g, b_g, [a_t, a_t], [b_t], None)
    with pytest.raises(MergeInputError, match=exact("labels has 1 entries for 2 clients")):
        _checked_round(a_g, b_g, [a_t, a_t], [b_t, b_t], ["x"])
    with pytest.raises(MergeInputError, match=r"^expected B \(d_out x r\)"):
        _checked_round(a_g, b_g[:, :2], [a_t], [b_t], None)


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [
        ((2, D_IN, 1), (D_OUT, 2)),  # A not 2-d
        ((2, D_IN), (D_OUT, 2, 1)),  # B not 2-d
        ((2, D_IN), (D_OUT, 3)),  # ranks differ
        ((0, D_IN), (D_OUT, 0)),  # rank 0
    ],
)
def test_checked_round_refuses_a_client_that_is_not_a_pair(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> None:
    """A client must be B (d_out x r_t), A (r_t x d_in) with r_t >= 1; it is named by index."""
    b_g, a_g = factors(18, GLOBAL_RANK)
    b_ok, a_ok = factors(19, 2)
    message = (
        "adapter 1: expected B (d_out x r_t) and A (r_t x d_in) with one r_t >= 1; got B "
        f"{b_shape} and A {a_shape}"
    )
    with pytest.raises(MergeInputError, match=exact(message)):
        _checked_round(a_g, b_g, [a_ok, torch.zeros(a_shape)], [b_ok, torch.zeros(b_shape)], None)


@pytest.mark.parametrize(
    ("a_shape", "b_shape"),
    [((2, D_IN + 1), (D_OUT, 2)), ((2, D_IN), (D_OUT - 1, 2))],
)
def test_checked_round_refuses_a_client_of_another_module_size(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> None:
    """d_in and d_out must be the global's, whatever the client's rank."""
    b_g, a_g = factors(20, GLOBAL_RANK)
    message = (
        f"adapter 0: module is {D_OUT} x {D_IN} in the global but B {b_shape}, A {a_shape} "
        "here; a client's rank may differ, its module's size may not"
    )
    with pytest.raises(MergeInputError, match=exact(message)):
        _checked_round(a_g, b_g, [torch.zeros(a_shape)], [torch.zeros(b_shape)], None)


# --- _sent_pair and _rank_groups --------------------------------------------------------------


def test_sent_pair_default_is_truncate_to_rank() -> None:
    """No ``sent``: the rank's factors are ``truncate_to_rank`` of the global, bit for bit."""
    b_g, a_g = factors(21, GLOBAL_RANK)
    b_s, a_s = _sent_pair(b_g, a_g, 3, None)
    pair = truncate_to_rank(b_g, a_g, 3)
    assert torch.equal(b_s, pair.b) and torch.equal(a_s, pair.a)


def test_sent_pair_returns_the_given_factors_as_float32() -> None:
    """Given factors come back as float32 with their values."""
    b_g, a_g = factors(22, GLOBAL_RANK)
    b_r, a_r = factors(23, 3)
    b_s, a_s = _sent_pair(b_g, a_g, 3, {3: (b_r.to(F64), a_r.to(F64)), 5: factors(1, 5)})
    assert b_s.dtype == torch.float32 and a_s.dtype == torch.float32
    assert torch.equal(b_s, b_r) and torch.equal(a_s, a_r)


def test_sent_pair_refuses_a_missing_rank() -> None:
    """A rank absent from ``sent`` is refused, listing the ranks it has."""
    b_g, a_g = factors(24, GLOBAL_RANK)
    message = (
        "no sent factors for rank 3: sent has ranks [2, 5]; give the (B, A) that sites of every "
        "rank in the round were sent, or None to recompute them"
    )
    with pytest.raises(MergeInputError, match=exact(message)):
        _sent_pair(b_g, a_g, 3, {5: factors(1, 5), 2: factors(2, 2)})


@pytest.mark.parametrize(
    ("b_shape", "a_shape"),
    [
        ((D_OUT + 1, 3), (3, D_IN)),
        ((D_OUT, 2), (3, D_IN)),
        ((D_OUT, 3), (4, D_IN)),
        ((D_OUT, 3), (3, D_IN - 1)),
    ],
)
def test_sent_pair_refuses_factors_of_the_wrong_shape(
    b_shape: tuple[int, int], a_shape: tuple[int, int]
) -> None:
    """Each of the four dimensions of the sent (B, A) is checked, with the whole message."""
    b_g, a_g = factors(25, GLOBAL_RANK)
    message = (
        f"sent factors for rank 3 have shapes B {b_shape}, A {a_shape}; expected "
        f"B ({D_OUT}, 3), A (3, {D_IN})"
    )
    with pytest.raises(MergeInputError, match=exact(message)):
        _sent_pair(b_g, a_g, 3, {3: (torch.zeros(b_shape), torch.zeros(a_shape))})


def test_rank_groups_are_ascending_with_clients_in_input_order() -> None:
    """Client indices grouped by rank, ranks ascending, input order within a rank."""
    groups = _rank_groups([4, 2, 4, 8, 2, 4])
    assert list(groups.items()) == [(2, [1, 4]), (4, [0, 2, 5]), (8, [3])]
    assert _rank_groups([3]) == {3: [0]}


def test_checked_round_takes_a_rank_one_client() -> None:
    """r_t = 1 is a rank (the smallest): a rank-one client is taken, not refused."""
    b_g, a_g = factors(26, GLOBAL_RANK)
    b_t, a_t = factors(27, 1)
    _, _, a_list, b_list = _checked_round(a_g, b_g, [a_t], [b_t], None)
    assert torch.equal(a_list[0], a_t) and torch.equal(b_list[0], b_t)


# --- merge_zero_padded ------------------------------------------------------------------------


@pytest.mark.parametrize(("server_lr", "rank"), [(0.6, None), (1.0, 7)])
def test_zero_padded_is_the_float64_factor_wise_mean_and_its_gap(
    server_lr: float, rank: int | None
) -> None:
    """B = pad(B_G) + eta sum_t p_t pad(dB_t), A likewise; errors: its gap from exact mean."""
    b_g, a_g = factors(30, 5)
    ranks = [2, 5, 3]
    sent = {r: (b_g[:, :r].clone(), a_g[:r].clone()) for r in ranks}
    a_list, b_list = clients_from(sent, ranks, seed=31)
    weights = [1.0, 2.0, 5.0]
    result = merge_zero_padded(a_g, b_g, a_list, b_list, weights, server_lr=server_lr, rank=rank)
    target = 5 if rank is None else rank
    p = (torch.tensor(weights, dtype=F64) / sum(weights)).to(torch.float32).to(F64)
    b_new = torch.zeros(D_OUT, target, dtype=F64)
    a_new = torch.zeros(target, D_IN, dtype=F64)
    b_new[:, :5], a_new[:5] = b_g.to(F64), a_g.to(F64)
    for share, a_t, b_t in zip(p, a_list, b_list, strict=True):
        r_t = a_t.shape[0]
        b_new[:, :r_t] += server_lr * share * (b_t.to(F64) - b_g[:, :r_t].to(F64))
        a_new[:r_t] += server_lr * share * (a_t.to(F64) - a_g[:r_t].to(F64))
    assert result.b.shape == (D_OUT, target) and result.a.shape == (target, D_IN)
    assert torch.allclose(result.b.to(F64), b_new, rtol=0, atol=1e-6)
    assert torch.allclose(result.a.to(F64), a_new, rtol=0, atol=1e-6)
    update = server_lr * exact_mean_update(a_list, b_list, p.tolist(), sent)
    full = b_g.to(F64) @ a_g.to(F64) + update
    gap = float((result.b.to(F64) @ result.a.to(F64) - full).square().sum())
    total = float(full.square().sum())
    update_energy = float(update.square().sum())
    assert gap > 0
    assert result.dropped_energy == pytest.approx(gap, rel=1e-4)
    assert result.total_energy == pytest.approx(total, rel=1e-6)
    assert result.update_energy == pytest.approx(update_energy, rel=1e-5)
    assert result.relative_error == pytest.approx((gap / total) ** 0.5, rel=1e-4)
    assert result.update_relative_error == pytest.approx((gap / update_energy) ** 0.5, rel=1e-4)


def test_zero_padded_defaults_are_equal_weights_and_a_unit_step() -> None:
    """weights None is equal weights and server_lr defaults to 1.0, bit for bit."""
    b_g, a_g = factors(32, 4)
    sent = {r: (b_g[:, :r].clone(), a_g[:r].clone()) for r in (2, 4)}
    a_list, b_list = clients_from(sent, [2, 4])
    default = merge_zero_padded(a_g, b_g, a_list, b_list)
    explicit = merge_zero_padded(a_g, b_g, a_list, b_list, [3.0, 3.0], server_lr=1.0, rank=4)
    assert torch.equal(default.a, explicit.a) and torch.equal(default.b, explicit.b)
    assert default.relative_error == explicit.relative_error


def test_zero_padded_of_unmoved_zero_clients_has_zero_errors() -> None:
    """Zero global and zero clients: every energy 0 and both errors 0.0 (not 0 / 0)."""
    a_g, b_g = torch.zeros(4, D_IN), torch.zeros(D_OUT, 4)
    result = merge_zero_padded(a_g, b_g, [torch.zeros(2, D_IN)], [torch.zeros(D_OUT, 2)])
    assert result.relative_error == 0.0 and result.update_relative_error == 0.0
    assert result.total_energy == 0.0 and result.update_energy == 0.0


def test_zero_padded_refuses_a_rank_below_a_clients() -> None:
    """The target rank cannot be below a client's rank, with the whole message."""
    b_g, a_g = factors(33, 4)
    sent = {r: (b_g[:, :r].clone(), a_g[:r].clone()) for r in (2, 4)}
    a_list, b_list = clients_from(sent, [2, 4])
    message = (
        "rank 3 is below a client's rank 4: zero-padding cannot shrink a client's factors; "
        "pass rank >= 4 (or leave it None)"
    )
    with pytest.raises(MergeInputError, match=exact(message)):
        merge_zero_padded(a_g, b_g, a_list, b_list, rank=3)
    with pytest.raises(MergeInputError, match=r"^adapter q: module is "):
        merge_zero_padded(a_g, b_g, [torch.zeros(2, D_IN + 1)], [b_list[0]], labels=["q"])


def test_zero_padded_small_round_reports_its_errors() -> None:
    """Energies below 1 still give sqrt(gap / total) and sqrt(gap / update), not 0."""
    b_g, a_g = factors(34, 4, 0.05)
    sent = {r: (b_g[:, :r].clone(), a_g[:r].clone()) for r in (2, 4)}
    a_list, b_list = clients_from(sent, [2, 4], seed=35)
    a_list = [
        a_s + 0.1 * (a_t - a_s) for a_t, (_, a_s) in zip(a_list, (sent[2], sent[4]), strict=True)
    ]
    b_list = [
        b_s + 0.1 * (b_t - b_s) for b_t, (b_s, _) in zip(b_list, (sent[2], sent[4]), strict=True)
    ]
    result = merge_zero_padded(a_g, b_g, a_list, b_list)
    assert 0 < result.total_energy < 1 and 0 < result.update_energy < 1
    assert result.dropped_energy > 0
    assert result.relative_error == (result.dropped_energy / result.total_energy) ** 0.5
    assert result.update_relative_error == (result.dropped_energy / result.update_energy) ** 0.5
