"""A mixed-rank strategy round against a float64 reading written here (issue 29).

``test_fed_robustmerge_ranks.py`` takes its expected values from ``ranks.merge_mixed_ranks`` and
``ranks.adapter_at_rank``, the functions the strategy calls. Here the expectation is formed from
the definitions alone: a site of rank r started from S_r, the best rank-r approximation of the
global's product B_G A_G (a float64 SVD); its update is B_t A_t - S_r; the new global's product
is the best rank-R cut of B_G A_G + eta * sum_t p_t (B_t A_t - S_{r_t}), p_t by num-examples.
"""

from __future__ import annotations

import pytest
import torch

from strategies import FedRobustMerge
from tests.strategies.test_fed_robustmerge import as_tensors, start_round
from tests.strategies.test_fed_robustmerge_ranks import (
    GLOBAL_RANK,
    MODULES,
    make_global,
    site_reply,
)

F64 = torch.float64

pytestmark = pytest.mark.usefixtures("flower_task_identity")


def best_rank(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.mark.parametrize("method", ["svd", "exact-mean"])
def test_a_round_of_ranks_4_8_16_is_the_cut_of_the_float64_update(method: str) -> None:
    base = make_global()
    server_lr = 0.8
    strategy = FedRobustMerge(merge_method=method, server_lr=server_lr, device="cpu")
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
