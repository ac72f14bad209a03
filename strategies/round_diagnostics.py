"""The paper's direction-robustness diagnostics for one merged round, on sampled modules.

Per client, how well the merged update keeps the client's top singular directions
(``merging.diagnostics.direction_score``), and how far the factor-wise mean is from the exact
mean of the updates (``merging.diagnostics.factorwise_gap``); both land in the round report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from strategies.merging import parse_layout
from strategies.merging.diagnostics import DirectionScore, direction_score, factorwise_gap
from strategies.reply_checks import AcceptedReply
from strategies.round_report import RoundReport


def score_directions(
    accepted: Sequence[AcceptedReply],
    base: Mapping[str, torch.Tensor],
    new_global: Mapping[str, torch.Tensor],
    weights: Sequence[float] | None,
    diagnostics_modules: int,
    report: RoundReport,
) -> None:
    """Fill ``report``'s direction scores and factor-wise gap from up to ``diagnostics_modules``
    evenly spaced modules (0: none); ``base`` is the global the clients started from."""
    if diagnostics_modules <= 0:
        return
    modules = parse_layout(base.keys()).modules
    if not modules:
        return
    count = min(diagnostics_modules, len(modules))
    picked = [modules[(i * len(modules)) // count] for i in range(count)]
    raw = torch.tensor(list(weights or [1.0] * len(accepted)), dtype=torch.float64)
    p = raw / raw.sum()
    scores: dict[int, list[DirectionScore]] = {reply.node_id: [] for reply in accepted}
    gap = exact = 0.0
    for m in picked:
        # Each reply's factors of this module, decoded once for both diagnostics.
        factors = [(reply.tensor(m.a_key), reply.tensor(m.b_key)) for reply in accepted]
        for reply, client in zip(accepted, factors, strict=True):
            score = direction_score(
                client=client,
                merged=(new_global[m.a_key], new_global[m.b_key]),
                reference=(base[m.a_key], base[m.b_key]),
            )
            if score is not None:
                scores[reply.node_id].append(score)
        rank = base[m.a_key].shape[0]
        module_gap = factorwise_gap(
            (base[m.a_key].reshape(rank, -1), base[m.b_key].reshape(-1, rank)),
            torch.stack([a.reshape(rank, -1) for a, _ in factors]),
            torch.stack([b.reshape(-1, rank) for _, b in factors]),
            p,
        )
        gap += module_gap.gap
        exact += module_gap.exact
    for node, valid in scores.items():
        if valid:
            report.direction_scores[node] = {
                "cosine": sum(s.cosine for s in valid) / len(valid),
                "retained": sum(s.retained for s in valid) / len(valid),
            }
    report.factorwise_gap = (gap / exact) ** 0.5 if exact > 0 else 0.0
