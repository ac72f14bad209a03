"""Non-IID label skew for the quality benchmark's larger federations (issue 17): Dirichlet shards.

Issue 17's 16- and 64-client federations split every seen task over several clients, each with
its own skewed mix of the task's classes. The split is flwr-datasets' ``DirichletPartitioner``
(Yurochkin et al., *Bayesian Nonparametric Federated Learning of Neural Networks*, ICML 2019;
Hsu et al., 2019), run on the task's local ``TaskData``, not a partitioning of our own:

    for every class c of the task:   p_c ~ Dir(alpha, ..., alpha)   (k shards)
    the examples of class c, in order, are cut at the cumulative fractions of p_c

so every example lands in exactly one shard, and alpha sets the skew: alpha = 0.5 (issue 17)
gives each shard a few dominant classes, alpha -> infinity the task's own label distribution
(mean total-variation distance of a shard's label mix from the task's, mcid, 512 examples, 3
shards: about 0.37 at alpha 0.5, 0.01 at alpha 1000). Plain Dirichlet: the partitioner's
``self_balancing`` (stop filling a shard past the mean size) is off.

The partitioner rounds each class's cut points down (``int(fraction * n_c)``), so every class
hands its rounding remainder, about half an example on average, from the first shard to the
last: with many classes and few examples each the last shard is the largest even at a large
alpha (banking77, 2400 examples over 10 shards at alpha 1000: about 235 each, the last 295).
Give a task a pool of many examples per class (tens per shard), as issue 17's sizes do.

Small tasks: a shard must hold at least ``min_examples`` (1: non-empty). When a draw leaves a
shard smaller, the partitioner draws every class's fractions again from its generator (a
seeded retry, so the result stays deterministic); after 11 draws it gives up and
``dirichlet_shards`` raises ValueError naming the task, its size, k and alpha (fewer clients,
a larger alpha or more examples fix it). Fewer examples than ``k * min_examples`` is refused
before any draw. A class with fewer examples than shards reaches only the later shards (the
rounding above), so a task with about one example per class and shard fails even so. The
retries' own warnings are silenced (they say the same thing each time).

Which client gets what (``assign_clients``): client i trains on task ``tasks[i % T]``, shard
``i // T`` of that task, the rule the app uses for ``partition-id`` (``seen-tasks[i % len]``).
So N clients over T tasks give the first ``N mod T`` tasks ``N // T + 1`` clients and the others
``N // T``: 16 clients over 7 tasks are 3, 3, 2, 2, 2, 2, 2; 64 over 7 are 10, 9, 9, 9, 9, 9, 9.

With ``benchmarks.quality.run_federated``: ``shards = client_shards(pools, 16, alpha=0.5,
seed=s)`` and ``run_federated(..., client_tasks=[d.name for d in shards],
data_hook=shard_data_hook(shards))``; node i + 1 then trains on ``shards[i]`` every round (the
round's class-balanced draw is replaced, as a balanced draw would undo the skew).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import datasets
from flwr_datasets.partitioner import DirichletPartitioner

from workload.tasks import TaskData

# flwr-datasets' DirichletPartitioner draws at most this many times (its first draw and 10
# retries) before it gives up on min_partition_size.
PARTITIONER_DRAWS = 11
_RETRY_WARNING = r"The specified min_partition_size"


@dataclass(frozen=True)
class ClientShard:
    """Client ``client`` (0-based) trains on shard ``shard`` of the ``shards`` of ``task``."""

    client: int
    task: str
    shard: int
    shards: int


def assign_clients(clients: int, tasks: Sequence[str]) -> list[ClientShard]:
    """Spread ``clients`` over ``tasks`` as evenly as possible (see the module docstring).

    Client i gets task ``tasks[i % T]`` and shard ``i // T`` of it; the first ``clients mod T``
    tasks have one client more than the others. Raises ValueError with fewer clients than tasks
    (a task without a client would never be trained on), no tasks, or a task named twice.
    """
    if not tasks:
        raise ValueError("assign_clients needs at least one task")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks must be distinct; got {list(tasks)}")
    count = len(tasks)
    if clients < count:
        raise ValueError(
            f"{clients} clients cannot cover {count} tasks ({', '.join(tasks)}): every task "
            "needs at least one client; use at least as many clients as tasks"
        )
    base, extra = divmod(clients, count)
    return [
        ClientShard(
            client=i,
            task=tasks[i % count],
            shard=i // count,
            shards=base + (1 if i % count < extra else 0),
        )
        for i in range(clients)
    ]


def dirichlet_shards(
    data: TaskData,
    clients: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_examples: int = 1,
) -> list[TaskData]:
    """``data`` split into ``clients`` shards with Dirichlet(alpha) label skew.

    Parameters
    ----------
    data : TaskData
        One task's examples (texts, labels into ``label_names``).
    clients : int
        k, the number of shards (>= 1).
    alpha : float (default: 0.5)
        Dirichlet concentration (> 0): small is skewed, large approaches the task's own mix.
    seed : int (default: 0)
        Seeds the partitioner's generator: the same arguments give the same shards.
    min_examples : int (default: 1)
        Every shard holds at least this many examples (the partitioner redraws otherwise).

    Returns
    -------
    list[TaskData]
        k shards named like ``data`` with its ``label_names``; together they hold every example
        of ``data`` exactly once, each shard in ``data``'s order.

    Raises ValueError for bad arguments, fewer examples than ``clients * min_examples``, or
    when 11 draws all leave a shard too small (see the module docstring).
    """
    if clients < 1:
        raise ValueError(f"clients must be >= 1; got {clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    if min_examples < 1:
        raise ValueError(f"min_examples must be >= 1; got {min_examples}")
    if len(data.texts) != len(data.labels):
        raise ValueError(
            f"task {data.name!r}: {len(data.texts)} texts but {len(data.labels)} labels"
        )
    if len(data) < clients * min_examples:
        raise ValueError(
            f"task {data.name!r} has {len(data)} examples, too few for {clients} shards of at "
            f"least {min_examples}; use fewer clients or more examples"
        )
    table = datasets.Dataset.from_dict(
        {"label": list(data.labels), "position": list(range(len(data)))}
    )
    partitioner = DirichletPartitioner(
        num_partitions=clients,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=min_examples,
        self_balancing=False,
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = table
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RETRY_WARNING)
        try:
            positions = [
                sorted(int(p) for p in partitioner.load_partition(i)["position"])
                for i in range(clients)
            ]
        except ValueError as error:
            raise ValueError(
                f"task {data.name!r}: {PARTITIONER_DRAWS} Dirichlet draws (alpha {alpha}, "
                f"seed {seed}) all left a shard of its {len(data)} examples with fewer than "
                f"{min_examples} over {clients} shards; use fewer clients, a larger alpha or "
                f"more examples ({error})"
            ) from error
    return [
        TaskData(
            data.name,
            [data.texts[i] for i in shard],
            [data.labels[i] for i in shard],
            list(data.label_names),
        )
        for shard in positions
    ]


def task_seed(seed: int, task: str) -> int:
    """The partitioner seed of ``task`` in a run seeded ``seed``: independent across tasks and
    of the tasks' order (the first 4 bytes of SHA-256 of ``"<seed>:<task>"``)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{task}".encode()).digest()[:4], "big")


def client_shards(
    pools: Mapping[str, TaskData],
    clients: int,
    *,
    alpha: float = 0.5,
    seed: int = 0,
    min_examples: int = 1,
) -> list[TaskData]:
    """Client i's local data: its shard of its task (``assign_clients`` over ``pools``' tasks,
    in ``pools``' order; each task split by ``dirichlet_shards`` with ``task_seed(seed, task)``).
    """
    assignment = assign_clients(clients, list(pools))
    shards = {
        task: dirichlet_shards(
            pools[task],
            sum(1 for a in assignment if a.task == task),
            alpha=alpha,
            seed=task_seed(seed, task),
            min_examples=min_examples,
        )
        for task in pools
    }
    return [shards[a.task][a.shard] for a in assignment]


def shard_data_hook(shards: Sequence[TaskData]) -> Callable[[int, TaskData], TaskData]:
    """``run_federated``'s ``data_hook`` that gives node i + 1 (its nodes count from 1) the
    data ``shards[i]`` in place of the round's draw."""

    def hook(node: int, _drawn: TaskData) -> TaskData:
        return shards[node - 1]

    return hook
