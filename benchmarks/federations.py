"""Federation shapes of the quality benchmark v2 and what one federated run costs.

What and why
------------
Issue 17 runs every method at three federation sizes: one client per seen task (7), and 16
and 64 clients where each seen task is split over several clients with Dirichlet(0.5) label
skew, 25 % of the 64 taking part each round. Every shape holds the same data, a fixed local
pool of ``pool_examples`` training examples per seen task (drawn per seed), split by
``benchmarks.partitioning.client_shards`` (one shard per task at 7 clients: the whole pool).

What a client holds and what it trains per round are two sizes. The pool must be large for the
Dirichlet split to be feasible: a task's classes are cut over its shards, so with few examples
per class some shard ends up empty in every draw (dbpedia's 219 classes need a pool of about 256
at 9 shards; banking77's 77 about 128 at 10). But training one epoch on a whole shard each round
would make the run's cost grow with the pool. So each round a sampled client trains one local
epoch on ``round_subsample``: at most ``round_examples`` examples of its own shard, drawn
uniformly without replacement with a generator seeded by (seed, round, node). The draw is from
the client's skewed shard, so the label skew stays; it differs from round to round, so over the
rounds a client sees much of its shard; and a rerun draws the same examples.

``RunMeter`` collects what a run costs, from what actually happened: the examples trained
(``metered_hook`` is the data hook: it draws the round's subsample and counts it; it learns the
round from ``round_hook``, which ``run_federated`` calls after every merge), and from the
strategy's round report (that ``round_hook``) the bytes the server received and its merge time
(``merge-seconds`` plus ``fold-seconds`` of a streamed round). Bytes down are the global
adapter's size, sent to every sampled client.
"""

from __future__ import annotations

import hashlib
import math
import random
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


def round_subsample(
    shard: TaskData, limit: int | None, *, seed: int, server_round: int, node: int
) -> TaskData:
    """What node ``node`` trains in round ``server_round`` of a run seeded ``seed``: at most
    ``limit`` examples of its ``shard`` (all of it when ``limit`` is None or not smaller).

    A uniform draw without replacement, in the shard's order, from a generator seeded by the
    first 8 bytes of SHA-256 of ``"<seed>:<round>:<node>"``: the same (seed, round, node) give
    the same examples, other rounds or nodes other ones (see the module docstring).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None; got {limit}")
    if limit is None or limit >= len(shard):
        return shard
    key = hashlib.sha256(f"{seed}:{server_round}:{node}".encode()).digest()[:8]
    picked = sorted(random.Random(int.from_bytes(key, "big")).sample(range(len(shard)), limit))
    return TaskData(
        shard.name,
        [shard.texts[i] for i in picked],
        [shard.labels[i] for i in picked],
        list(shard.label_names),
    )


def local_work_draw(
    shard: TaskData, examples: int | None, *, seed: int, server_round: int, node: int
) -> TaskData:
    """What node ``node`` trains in round ``server_round``: exactly ``examples`` examples of
    its ``shard`` (a fixed amount of local work: ``examples / batch size`` local steps), or the
    whole shard when ``examples`` is None.

    A shard at least that large gives ``round_subsample``'s draw without replacement; a smaller
    one gives whole passes over the shard, each in a new seeded order, then a partial pass (so
    a small Dirichlet shard trains several local epochs, as a site with little data would).
    """
    if examples is None or (examples >= 1 and len(shard) >= examples):
        return round_subsample(shard, examples, seed=seed, server_round=server_round, node=node)
    if examples < 1:
        raise ValueError(f"examples must be >= 1 or None; got {examples}")
    if not len(shard):
        raise ValueError(f"node {node} has an empty shard")
    key = hashlib.sha256(f"{seed}:{server_round}:{node}:passes".encode()).digest()[:8]
    order_source = random.Random(int.from_bytes(key, "big"))
    picked: list[int] = []
    while len(picked) < examples:
        order = list(range(len(shard)))
        order_source.shuffle(order)
        picked.extend(order[: examples - len(picked)])
    return TaskData(
        shard.name,
        [shard.texts[i] for i in picked],
        [shard.labels[i] for i in picked],
        list(shard.label_names),
    )


Draw = Callable[..., TaskData]


@dataclass
class RunMeter:
    """What a federated run cost: examples trained, bytes received, merge seconds per round.

    ``current_round`` is the round the data hook is drawing for: 1 at the start, then one past
    the last round reported to ``round_hook``.
    """

    train_examples: int = 0
    rounds: list[dict[str, float]] = field(default_factory=list)
    current_round: int = 1

    def metered_hook(
        self,
        shards: Sequence[TaskData],
        round_examples: int | None = None,
        seed: int = 0,
        draw: Draw = round_subsample,
    ) -> Callable[[int, TaskData], TaskData]:
        """``run_federated``'s data hook: node i + 1 trains on ``draw`` of ``shards[i]``
        (``round_subsample``: at most ``round_examples``; ``local_work_draw``: exactly that
        many; seeded by ``seed``, the round and the node), and the examples it trains are
        counted."""

        def hook(node: int, _drawn: TaskData) -> TaskData:
            data = draw(
                shards[node - 1],
                round_examples,
                seed=seed,
                server_round=self.current_round,
                node=node,
            )
            self.train_examples += len(data)
            return data

        return hook

    def round_hook(self, server_round: int, report: Any) -> None:
        """``run_federated``'s round hook: keep the report's clients, bytes and merge time; the
        data hook's next draws are for the round after ``server_round``."""
        self.current_round = server_round + 1
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
