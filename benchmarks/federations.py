"""Federation shapes of the quality benchmark v2 and what one federated run costs.

What and why
------------
Issue 17 runs every method at three federation sizes: one client per seen task (7), and 16
and 64 clients where each seen task is split over several clients with Dirichlet(0.5) label
skew, 25 % of the 64 taking part each round. Every shape holds the same data, a fixed local
pool of ``pool_examples`` training examples per seen task (drawn per seed), split by
``benchmarks.partitioning.client_shards`` (one shard per task at 7 clients: the whole pool).
A client trains one local epoch on its whole shard each round it is sampled, as a real site
trains on the data it holds; so the shapes differ only in how the same data is split and how
many sites take part.

``RunMeter`` collects what a run costs, from what actually happened: the examples trained
(``metered_hook`` wraps the data hook), and from the strategy's round report (the
``round_hook`` of ``run_federated``) the bytes the server received and its merge time
(``merge-seconds`` plus ``fold-seconds`` of a streamed round). Bytes down are the global
adapter's size, sent to every sampled client.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.partitioning import client_shards
from workload.tasks import TaskData, load_task


@dataclass(frozen=True)
class Federation:
    """A federation shape: ``clients`` sites, ``participation`` of them sampled per round."""

    name: str
    clients: int
    participation: float = 1.0
    alpha: float = 0.5
    rounds: int = 10

    def sampled(self) -> int:
        """Clients per round (Flower samples ``int(clients * fraction)``, at least 1)."""
        return max(1, int(self.clients * self.participation))

    def strategy_options(self) -> dict[str, Any]:
        """``run_federated``'s sampling options for this shape."""
        return {"fraction_train": self.participation, "min_train_nodes": self.sampled()}


def task_pools(tasks: Sequence[str], examples: int, seed: int) -> dict[str, TaskData]:
    """Each task's local pool: a class-balanced draw of ``examples`` training examples."""
    return {t: load_task(t, "train", limit=examples, seed=7000 + seed) for t in tasks}


def federation_shards(
    pools: Mapping[str, TaskData], federation: Federation, seed: int
) -> list[TaskData]:
    """Client i's local data (``client_shards`` with the federation's alpha, seeded)."""
    return client_shards(pools, federation.clients, alpha=federation.alpha, seed=seed)


@dataclass
class RunMeter:
    """What a federated run cost: examples trained, bytes received, merge seconds per round."""

    train_examples: int = 0
    rounds: list[dict[str, float]] = field(default_factory=list)

    def metered_hook(self, shards: Sequence[TaskData]) -> Callable[[int, TaskData], TaskData]:
        """``run_federated``'s data hook: node i + 1 trains on ``shards[i]`` (counted)."""

        def hook(node: int, _drawn: TaskData) -> TaskData:
            self.train_examples += len(shards[node - 1])
            return shards[node - 1]

        return hook

    def round_hook(self, server_round: int, report: Any) -> None:
        """``run_federated``'s round hook: keep the report's clients, bytes and merge time."""
        self.rounds.append(
            {
                "round": float(server_round),
                "clients": float(len(report.accepted_nodes)),
                "bytes_received": float(report.bytes_received),
                "merge_seconds": float(report.merge_seconds) + float(report.fold_seconds),
            }
        )

    def summary(self, adapter: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Per client and round: bytes up (measured), bytes down (the global's size), and the
        B factors' bytes (what a client that sends only what it trains would send under
        FFA-LoRA); per round: the mean merge seconds."""
        clients = sum(r["clients"] for r in self.rounds)
        return {
            "bytes_up_per_client_round": (
                sum(r["bytes_received"] for r in self.rounds) / clients if clients else math.nan
            ),
            "bytes_down_per_client_round": float(adapter_bytes(adapter)),
            "b_bytes": float(adapter_bytes(adapter, only=".lora_B.")),
            "merge_seconds_per_round": (
                sum(r["merge_seconds"] for r in self.rounds) / len(self.rounds)
                if self.rounds
                else math.nan
            ),
            "train_examples": float(self.train_examples),
        }


def adapter_bytes(adapter: Mapping[str, torch.Tensor], only: str | None = None) -> int:
    """Payload bytes of ``adapter``'s tensors (those whose key contains ``only``, if given)."""
    return sum(
        t.numel() * t.element_size() for k, t in adapter.items() if only is None or only in k
    )
