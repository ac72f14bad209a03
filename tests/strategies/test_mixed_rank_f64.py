"""A mixed-rank strategy round against a float64 reading written here (issue 29).

``test_fed_robustmerge_ranks.py`` takes its expected values from
``rank_rounds.merge_mixed_ranks`` and ``ranks.adapter_at_rank``, the functions the strategy
calls. Here the expectation is formed from the definitions alone: a site of rank r started from
S_r, the best rank-r approximation of the global's product B_G A_G (a float64 SVD); its update is
B_t A_t - S_r; the new global's product is the best rank-R cut of
B_G A_G + eta * sum_t p_t (B_t A_t - S_{r_t}), p_t by num-examples.
"""

from __future__ import annotations

import pytest
import torch

from strategies import FedRobustMerge
from strategies.merging.ranks import adapter_at_rank
from tests.strategies import reference_spec as spec
from tests.strategies.test_fed_robustmerge import as_tensors, start_round
from tests.strategies.test_fed_robustmerge_ranks import (
    GLOBAL_RANK,
    MIXED_RANK_SCREEN,
    MODULES,
    make_global,
    site_reply,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def site_start(base: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """What a site of ``rank`` was sent (and started its training from in ``site_reply``)."""
    return adapter_at_rank(base, rank).tensors


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("method", ["svd", "exact-mean"])
def test_a_round_of_ranks_4_8_16_is_the_cut_of_the_float64_update(method: str) -> None:
    base = make_global()
    server_lr = 0.8
    strategy = FedRobustMerge(
        robust=MIXED_RANK_SCREEN, merge_method=method, server_lr=server_lr, device="cpu"
    )
    start_round(strategy, base, nodes=3)
    ranks = {1: 4, 2: 8, 3: 16}
    examples = {1: 10, 2: 30, 3: 60}
    clients, messages = {}, []
    for node, rank in ranks.items():
        clients[node], message = site_reply(
            node, base, rank, seed=node, num_examples=examples[node]
        )
        messages.append(message)
    arrays, _ = strategy.aggregate_train(1, messages)
    got = as_tensors(arrays)
    total = sum(examples.values())
    for module in MODULES:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        start = base[b_key].to(F64) @ base[a_key].to(F64)
        update = torch.zeros_like(start)
        for node, rank in ranks.items():
            trained = clients[node][b_key].to(F64) @ clients[node][a_key].to(F64)
            update += examples[node] / total * (trained - best_rank(start, rank))
        want = best_rank(start + server_lr * update, GLOBAL_RANK)
        product = got[b_key].to(F64) @ got[a_key].to(F64)
        assert relative(product, want) < 1e-5, module
        # the lower-rank sites' starts differ from the global's: ignoring that moves the result
        naive = best_rank(
            start
            + server_lr
            * sum(
                examples[n]
                / total
                * (clients[n][b_key].to(F64) @ clients[n][a_key].to(F64) - start)
                for n in ranks
            ),
            GLOBAL_RANK,
        )
        assert relative(naive, want) > 1e-3


def paper_equation_update(
    sent: dict[int, tuple[torch.Tensor, torch.Tensor]],
    sites: list[tuple[int, torch.Tensor, torch.Tensor]],
    fuse_weight: float,
    keep_ratio: float,
    *,
    over_owners_only: bool = False,
) -> torch.Tensor:
    """M = sum_t lambda_t sum_{i < r_t} c_t[i] (dB^_t[:, i] A_t[i] + B_sent[:, i] dA^_t[i]), in
    float64 from docs/algorithm.md and the ranks module's docstring: each site's deltas against
    what it was sent, pruned (spec step 1), its unfloored complementary scale s_t from dA (step
    2), and c_t[i] = (T_i / T) s_t[i] / sum_{u: r_u > i} s_u[i] (T_i: the sites that own
    direction i). ``over_owners_only`` drops the T_i / T (the reading the docstring rejects).
    Equal weights: lambda_t = fuse_weight. ``sites``: (rank, A_t, B_t)."""
    count = len(sites)
    pruned = []
    for rank, a_t, b_t in sites:
        b_sent, a_sent = sent[rank]
        d_a = a_t.to(F64) - a_sent.to(F64)
        d_b = b_t.to(F64) - b_sent.to(F64)
        a_hat, _ = spec.prune(d_a, keep_ratio)
        b_hat, _ = spec.prune(d_b, keep_ratio)
        pruned.append((a_hat, b_hat, spec.complementary_scale(d_a, a_hat, None)))
    widest = max(rank for rank, _, _ in sites)
    update = torch.zeros(sites[0][2].shape[0], sites[0][1].shape[1], dtype=F64)
    for i in range(widest):
        owners = [t for t, (rank, _, _) in enumerate(sites) if rank > i]
        total = sum(pruned[t][2][i] for t in owners)
        present = 1.0 if over_owners_only else len(owners) / count
        for t in owners:
            rank, a_t, _ = sites[t]
            a_hat, b_hat, scale = pruned[t]
            share = fuse_weight * present * scale[i] / total
            b_sent = sent[rank][0].to(F64)
            update += share * torch.outer(b_hat[:, i], a_t.to(F64)[i])
            update += share * torch.outer(b_sent[:, i], a_hat[i])
    return update


def test_a_paper_equation_round_of_mixed_ranks_is_its_float64_reading() -> None:
    """Ranks 4, 8, 8, 16 (one group of two): the strategy's new global against the cut of
    B_G A_G + eta M with M read in float64 from the formulas; the sent factors are checked to be
    the best rank-r factors of the global's product before they are used."""
    base = make_global()
    server_lr, fuse_weight, keep_ratio = 0.8, 2.0, 0.2
    strategy = FedRobustMerge(
        robust=MIXED_RANK_SCREEN,
        merge_method="robustmerge",
        mode="paper-equation",
        server_lr=server_lr,
        fuse_weight=fuse_weight,
        keep_ratio=keep_ratio,
        device="cpu",
    )
    start_round(strategy, base, nodes=4)
    ranks = {1: 4, 2: 8, 3: 16, 4: 8}
    clients, messages = {}, []
    for node, rank in ranks.items():
        clients[node], message = site_reply(node, base, rank, seed=node)
        messages.append(message)
    arrays, _ = strategy.aggregate_train(1, messages)
    got = as_tensors(arrays)
    for module in MODULES:
        a_key, b_key = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        start = base[b_key].to(F64) @ base[a_key].to(F64)
        sent = {}
        for rank in sorted(set(ranks.values())):
            received = site_start(base, rank)
            b_sent, a_sent = received[b_key], received[a_key]
            if rank < GLOBAL_RANK:
                cut = best_rank(start, rank)
                assert relative(b_sent.to(F64) @ a_sent.to(F64), cut) < 1e-5
            else:
                assert torch.equal(b_sent, base[b_key]) and torch.equal(a_sent, base[a_key])
            sent[rank] = (b_sent, a_sent)
        sites = [(rank, clients[n][a_key], clients[n][b_key]) for n, rank in ranks.items()]
        update = paper_equation_update(sent, sites, fuse_weight, keep_ratio)
        want = best_rank(start + server_lr * update, GLOBAL_RANK)
        product = got[b_key].to(F64) @ got[a_key].to(F64)
        assert relative(product, want) < 1e-5, module
        other = paper_equation_update(sent, sites, fuse_weight, keep_ratio, over_owners_only=True)
        assert relative(best_rank(start + server_lr * other, GLOBAL_RANK), want) > 1e-3
