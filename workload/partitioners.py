"""Simulated sites' local data under run-config ``partitioner``: flwr-datasets' partitioners over
the pooled seen tasks.

``partitioner = "task"`` (the default) keeps the app's own rule: partition i trains task
``seen-tasks[i mod len]`` (``workload.kinds.classification.local_data``). The other choices pool
the train splits of every seen task into one labelled set (a class is a label name: two tasks
that share a label name share its class) and split the pool over node-config
``num-partitions`` with flwr-datasets' partitioners (Flower's own, as its simulations use them):

* ``"iid"``: ``IidPartitioner`` on the pool shuffled with ``seed``: equal shards, every shard
  with the pool's label mix;
* ``"dirichlet"``: ``DirichletPartitioner`` (Yurochkin et al., ICML 2019; Hsu et al., 2019): for
  every class c, p_c ~ Dir(``partition-alpha``) over the shards and the class's examples cut at
  its cumulative fractions, so small alpha (0.1) gives each shard a few dominant classes, large
  alpha (1000) the pool's mix; it redraws (10 times at most) while a shard holds fewer than
  ``MIN_SHARD_EXAMPLES``;
* ``"pathological"``: ``PathologicalPartitioner`` (Li et al., ICDE 2022): each shard holds
  exactly ``partition-classes`` classes (the first chosen as ``partition-id mod classes``, the
  rest drawn with ``seed``), each class's examples split evenly over the shards that hold it.

A node's shard is the same in every process and round (seeded by run-config ``seed``; computed
once per process and cached). Each round the node trains on a uniform draw of ``train-examples``
of its shard (seed ``seed + partition-id + server-round``): uniform, not class-balanced, as a
balanced draw would undo the skew. A fixed 10 % of the shard (``tasks.split_holdout``, by a hash
of each text) is held out for the node's evaluation and never trained on.

A shard with fewer than ``MIN_SHARD_EXAMPLES`` examples is refused with a ``ShardError`` naming
the partition, its size, the partitioner and its settings, and the fixes (a larger
``partition-alpha``, more ``partition-classes``, fewer sites or more seen tasks).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from workload.config import SCHEMA, Reader
from workload.tasks import TaskData, load_task

PARTITIONERS: tuple[str, ...] = SCHEMA["partitioner"].choices or ()
# A shard must hold at least this many examples (flwr-datasets' DirichletPartitioner default
# min_partition_size): fewer make a site's round a handful of examples and its 10 % hold-out
# empty.
MIN_SHARD_EXAMPLES = 10
# flwr-datasets' Dirichlet retry warning (it says the same on each of its 10 redraws)
_RETRY_WARNING = r"The specified min_partition_size"


class ShardError(ValueError):
    """A site's shard is empty or too small; names the partition and the fix."""


@dataclass(frozen=True)
class PartitionSettings:
    """Run-config ``partitioner``, ``partition-alpha``, ``partition-classes`` and ``seed``."""

    partitioner: str = str(SCHEMA["partitioner"].default)
    alpha: float = float(SCHEMA["partition-alpha"].default)
    classes: int = int(SCHEMA["partition-classes"].default)
    seed: int = 0

    @classmethod
    def from_run_config(cls, config: Mapping[str, Any]) -> PartitionSettings:
        """Read and validate the keys (absent keys take the schema's defaults)."""
        reader = Reader(config)
        return cls(
            partitioner=reader.choice("partitioner"),
            alpha=reader.number("partition-alpha"),
            classes=reader.integer("partition-classes"),
            seed=reader.integer("seed"),
        )

    def describe(self) -> str:
        """The partitioner and the settings it uses, as a run config spells them."""
        if self.partitioner == "dirichlet":
            return f'partitioner = "dirichlet", partition-alpha = {self.alpha:g}'
        if self.partitioner == "pathological":
            return f'partitioner = "pathological", partition-classes = {self.classes}'
        return f'partitioner = "{self.partitioner}"'


def pooled_tasks(tasks: Sequence[str], split: str = "train") -> TaskData:
    """The ``split`` of every task in ``tasks`` as one labelled set: texts in task order, one
    class per distinct label name (first seen first)."""
    texts: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    index: dict[str, int] = {}
    for task in tasks:
        data = load_task(task, split)
        ids = []
        for name in data.label_names:
            if name not in index:
                index[name] = len(names)
                names.append(name)
            ids.append(index[name])
        texts += data.texts
        labels += [ids[label] for label in data.labels]
    return TaskData("+".join(tasks), texts, labels, names)


def partition_positions(
    labels: Sequence[int], num_partitions: int, settings: PartitionSettings
) -> list[list[int]]:
    """Positions (into ``labels``) of each of ``num_partitions`` shards, each ascending.

    Raises
    ------
    ShardError
        When flwr-datasets' Dirichlet partitioner gives up on ``MIN_SHARD_EXAMPLES`` (see
        ``check_shards`` for the other partitioners).
    ValueError
        For ``partitioner = "task"`` (not a flwr-datasets split) or a partitioner's own refusal
        (e.g. more ``partition-classes`` than the pool has classes).
    """
    import datasets
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        PathologicalPartitioner,
    )

    positions = list(range(len(labels)))
    partitioner: Any
    if settings.partitioner == "iid":
        random.Random(settings.seed).shuffle(positions)
        partitioner = IidPartitioner(num_partitions)
    elif settings.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=settings.alpha,
            min_partition_size=MIN_SHARD_EXAMPLES,
            self_balancing=False,
            shuffle=False,
            seed=settings.seed,
        )
    elif settings.partitioner == "pathological":
        partitioner = PathologicalPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_classes_per_partition=settings.classes,
            class_assignment_mode="first-deterministic",
            shuffle=False,
            seed=settings.seed,
        )
    else:
        raise ValueError(f"partitioner {settings.partitioner!r} is not a flwr-datasets split")
    partitioner.dataset = datasets.Dataset.from_dict(
        {"label": [labels[p] for p in positions], "position": positions}
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_RETRY_WARNING)
        try:
            return [
                sorted(int(p) for p in partitioner.load_partition(i)["position"])
                for i in range(num_partitions)
            ]
        except ValueError as error:
            if settings.partitioner != "dirichlet" or "attempts" not in str(error):
                raise
            raise ShardError(
                f"{settings.describe()}: 11 draws over {num_partitions} partitions of "
                f"{len(labels)} examples all left a partition with fewer than "
                f"{MIN_SHARD_EXAMPLES} examples; {_FIX}"
            ) from error


_FIX = (
    "raise partition-alpha (e.g. 0.5), use fewer sites (num-supernodes) or more seen-tasks, "
    'or use partitioner = "iid"'
)


def check_shards(
    positions: Sequence[Sequence[int]], settings: PartitionSettings, pool: TaskData
) -> None:
    """Refuse a split in which a shard holds fewer than ``MIN_SHARD_EXAMPLES`` examples,
    naming the first such partition and the fix."""
    for partition, shard in enumerate(positions):
        if len(shard) >= MIN_SHARD_EXAMPLES:
            continue
        fix = _FIX
        if settings.partitioner == "pathological":
            fix = (
                "raise partition-classes, use fewer sites (num-supernodes) or more seen-tasks, "
                'or use partitioner = "dirichlet"'
            )
        raise ShardError(
            f"partition {partition} of {len(positions)} holds {len(shard)} example"
            f"{'' if len(shard) == 1 else 's'} of the {len(pool)} in the pooled seen tasks "
            f"({pool.name}) under {settings.describe()}, seed {settings.seed}; a site needs at "
            f"least {MIN_SHARD_EXAMPLES}: {fix}"
        )


@lru_cache(maxsize=4)
def _split(
    tasks: tuple[str, ...], num_partitions: int, settings: PartitionSettings
) -> tuple[TaskData, tuple[tuple[int, ...], ...]]:
    pool = pooled_tasks(tasks)
    positions = partition_positions(pool.labels, num_partitions, settings)
    check_shards(positions, settings, pool)
    return pool, tuple(tuple(shard) for shard in positions)


def site_shard(
    tasks: Sequence[str], partition_id: int, num_partitions: int, settings: PartitionSettings
) -> TaskData:
    """Partition ``partition_id``'s shard of the pooled ``tasks`` (see the module docstring);
    the same in every process for the same arguments."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"node config 'partition-id' {partition_id} is outside [0, {num_partitions}) "
            "('num-partitions')"
        )
    pool, positions = _split(tuple(tasks), num_partitions, settings)
    shard = positions[partition_id]
    return TaskData(
        f"{settings.partitioner} shard {partition_id}/{num_partitions} of {pool.name}",
        [pool.texts[p] for p in shard],
        [pool.labels[p] for p in shard],
        list(pool.label_names),
    )


def uniform_draw(data: TaskData, limit: int, *, seed: int) -> TaskData:
    """At most ``limit`` examples drawn uniformly (seeded), kept in ``data``'s order: the shard's
    own label mix, unlike ``tasks.balanced_subset``."""
    if limit >= len(data):
        return data
    picked = sorted(random.Random(seed).sample(range(len(data)), limit))
    return TaskData(
        data.name,
        [data.texts[i] for i in picked],
        [data.labels[i] for i in picked],
        list(data.label_names),
    )
