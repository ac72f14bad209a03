"""The paper's direction-robustness diagnostics for one merged round, on sampled modules.

Per client, how well the merged update keeps the client's top singular directions
(``merging.diagnostics.direction_score``), and how far the factor-wise mean is from the exact
mean of the updates (``merging.diagnostics.factorwise_gap``); both land in the round report.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from strategies.merging import parse_layout
from strategies.merging.diagnostics import DirectionScore, direction_score, factorwise_gap
from strategies.merging.lora_keys import LoraModule
from strategies.round_report import RoundReport

# A round scores at most this many clients (a seeded pick, see ``DiagnosticsSample``): the
# factor-wise gap works on every scored client's factors of a module at once, in float64, so
# scoring all T clients would cost about 16 x T x one module at merge time (measured: median at
# T = 48, 4 LLaMA layers, 1.3 adapters of peak RSS per client), the one part of a spilled
# round's memory that still grew with T.
DIAGNOSTICS_CLIENTS = 8


class ClientFactors(Protocol):
    """What the diagnostics read of a client: its node and its tensors, key by key."""

    @property
    def node_id(self) -> int: ...

    def tensor(self, key: str) -> torch.Tensor: ...


def picked_modules(keys: Sequence[str], count: int) -> list[LoraModule]:
    """Up to ``count`` evenly spaced LoRA modules of an adapter with ``keys`` (0: none)."""
    modules = parse_layout(keys).modules
    if count <= 0 or not modules:
        return []
    count = min(count, len(modules))
    return [modules[(i * len(modules)) // count] for i in range(count)]


def score_directions(
    accepted: Sequence[ClientFactors],
    base: Mapping[str, torch.Tensor],
    new_global: Mapping[str, torch.Tensor],
    weights: Sequence[float] | None,
    diagnostics_modules: int,
    report: RoundReport,
) -> None:
    """Fill ``report``'s direction scores and factor-wise gap from up to ``diagnostics_modules``
    evenly spaced modules (0: none); ``base`` is the global the clients started from."""
    picked = picked_modules(list(base.keys()), diagnostics_modules)
    if not picked:
        return
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


@dataclass(frozen=True)
class HeldFactors:
    """One client's factors of the diagnostics' modules, kept after its reply is dropped."""

    node_id: int
    tensors: dict[str, torch.Tensor]
    weight: float

    def tensor(self, key: str) -> torch.Tensor:
        """The held tensor under ``key``."""
        return self.tensors[key]


class DiagnosticsSample:
    """The clients a round scores (streamed or buffered): at most ``clients`` of them, the ones
    whose seeded key (a hash of seed, round and node) is smallest, so the pick does not depend
    on the order replies arrive in; only their factors of the sampled modules are kept."""

    def __init__(
        self,
        keys: Sequence[str],
        modules: int,
        seed: int,
        server_round: int,
        clients: int = DIAGNOSTICS_CLIENTS,
    ) -> None:
        self.modules = modules
        self.keys = [k for m in picked_modules(keys, modules) for k in (m.a_key, m.b_key)]
        self.salt = f"{seed}:{server_round}:"
        self.clients = clients
        self.held: dict[int, tuple[bytes, HeldFactors]] = {}

    def offer(self, reply: ClientFactors, weight: float) -> None:
        """Keep ``reply``'s factors if it is among the sample so far (dropping the one it
        displaces)."""
        if not self.keys or self.clients <= 0:
            return
        key = hashlib.sha256((self.salt + str(reply.node_id)).encode()).digest()
        if len(self.held) >= self.clients:
            worst = max(self.held, key=lambda node: self.held[node][0])
            if key >= self.held[worst][0]:
                return
            del self.held[worst]
        factors = {name: reply.tensor(name).clone() for name in self.keys}
        self.held[reply.node_id] = (key, HeldFactors(reply.node_id, factors, weight))

    def score(
        self,
        base: Mapping[str, torch.Tensor],
        new_global: Mapping[str, torch.Tensor],
        weighted: bool,
        report: RoundReport,
    ) -> None:
        """``score_directions`` over the sample (in node order)."""
        if not self.held:
            return
        sample = [self.held[node][1] for node in sorted(self.held)]
        weights = [held.weight for held in sample] if weighted else None
        score_directions(sample, base, new_global, weights, self.modules, report)
