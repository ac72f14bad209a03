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
    if not picked or not accepted:
        return
    raw = torch.tensor(list(weights or [1.0] * len(accepted)), dtype=torch.float64)
    p = raw / raw.sum()
    scores: dict[int, list[DirectionScore]] = {reply.node_id: [] for reply in accepted}
    gap = exact = 0.0
    for m in picked:
        a_stack, b_stack = _factor_stacks(accepted, m)
        merged, reference = _factors_2d(new_global, m), _factors_2d(base, m)
        for index, reply in enumerate(accepted):
            score = direction_score(
                client=(a_stack[index], b_stack[index]), merged=merged, reference=reference
            )
            if score is not None:
                scores[reply.node_id].append(score)
        module_gap = factorwise_gap(reference, a_stack, b_stack, p)
        del a_stack, b_stack
        gap += module_gap.gap
        exact += module_gap.exact
    for node, valid in scores.items():
        if valid:
            report.direction_scores[node] = {
                "cosine": sum(s.cosine for s in valid) / len(valid),
                "retained": sum(s.retained for s in valid) / len(valid),
            }
    report.factorwise_gap = (gap / exact) ** 0.5 if exact > 0 else 0.0


def _as_matrices(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A, B) as matrices (r x d_in, d_out x r; conv factors flattened)."""
    rank = a.shape[0]
    return a.reshape(rank, -1), b.reshape(-1, rank)


def _factors_2d(
    tensors: Mapping[str, torch.Tensor], module: LoraModule
) -> tuple[torch.Tensor, torch.Tensor]:
    """``module``'s (A, B) of ``tensors`` as matrices."""
    return _as_matrices(tensors[module.a_key], tensors[module.b_key])


def _factor_stacks(
    clients: Sequence[ClientFactors], module: LoraModule
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clients' factors of ``module`` stacked in float64 (T x r x d_in, T x d_out x r),
    decoded one client at a time into the stacks (no float32 copy of them all). The B stack is
    laid out d_out x T x r in memory, so ``factorwise_gap``'s [B_1 | ... | B_T] is a view."""
    a_stack = b_memory = None
    count = len(clients)
    for index, client in enumerate(clients):
        a, b = _as_matrices(client.tensor(module.a_key), client.tensor(module.b_key))
        if a_stack is None or b_memory is None:
            a_stack = torch.empty((count, *a.shape), dtype=torch.float64)
            b_memory = torch.empty((b.shape[0], count, b.shape[1]), dtype=torch.float64)
        a_stack[index] = a
        b_memory[:, index] = b
    if a_stack is None or b_memory is None:
        raise ValueError("no client to stack")
    return a_stack, b_memory.permute(1, 0, 2)


@dataclass(frozen=True)
class HeldFactors:
    """One client's factors of the diagnostics' modules, kept after its reply is dropped."""

    node_id: int
    tensors: dict[str, torch.Tensor]

    def tensor(self, key: str) -> torch.Tensor:
        """The held tensor under ``key``."""
        return self.tensors[key]


class DiagnosticsSample:
    """The clients a round scores (streamed or buffered): at most ``clients`` of them, the ones
    whose seeded key (a hash of seed, round and node) is smallest, so the pick does not depend
    on the order replies arrive in.

    A streamed round drops each reply once folded, so the sample keeps copies of the picked
    clients' factors of the sampled modules (``HeldFactors``; at most ``clients`` x
    ``modules`` modules). A buffered round holds its replies until it closes, and scores before
    that: ``by_reference`` keeps the replies themselves instead (no copy; at 2 LLaMA-7B layers,
    where 8 of 14 modules are sampled, the copies were 4.6 adapters of a round's peak)."""

    def __init__(
        self,
        keys: Sequence[str],
        modules: int,
        seed: int,
        server_round: int,
        clients: int = DIAGNOSTICS_CLIENTS,
        *,
        by_reference: bool = False,
    ) -> None:
        self.modules = modules
        self.keys = [k for m in picked_modules(keys, modules) for k in (m.a_key, m.b_key)]
        self.salt = f"{seed}:{server_round}:"
        self.clients = clients
        self.by_reference = by_reference
        self.held: dict[int, tuple[bytes, ClientFactors, float]] = {}

    def offer(self, reply: ClientFactors, weight: float) -> None:
        """Keep ``reply``'s factors (or, ``by_reference``, the reply) if it is among the sample
        so far (dropping the one it displaces)."""
        if not self.keys or self.clients <= 0:
            return
        key = hashlib.sha256((self.salt + str(reply.node_id)).encode()).digest()
        if len(self.held) >= self.clients:
            worst = max(self.held, key=lambda node: self.held[node][0])
            if key >= self.held[worst][0]:
                return
            del self.held[worst]
        kept: ClientFactors = reply
        if not self.by_reference:
            copies = {name: reply.tensor(name).clone() for name in self.keys}
            kept = HeldFactors(reply.node_id, copies)
        self.held[reply.node_id] = (key, kept, weight)

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
        nodes = sorted(self.held)
        sample = [self.held[node][1] for node in nodes]
        weights = [self.held[node][2] for node in nodes] if weighted else None
        score_directions(sample, base, new_global, weights, self.modules, report)
