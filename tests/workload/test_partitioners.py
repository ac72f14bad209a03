"""Run-config ``partitioner``: flwr-datasets' IID, Dirichlet and pathological splits of the pooled
seen tasks. Sizes, label skew, determinism by seed, and the error on too-small shards."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from workload.config import ConfigError
from workload.kinds.base import LocalRound
from workload.kinds.classification import WorkloadSettings, local_data
from workload.partitioners import (
    MIN_SHARD_EXAMPLES,
    PartitionSettings,
    ShardError,
    check_shards,
    partition_positions,
    pooled_tasks,
    site_shard,
    uniform_draw,
)
from workload.tasks import TaskData, load_task

TASKS = ("mcid", "hwu64")


def synthetic(classes: int, per_class: int) -> TaskData:
    labels = [c for c in range(classes) for _ in range(per_class)]
    return TaskData(
        "synthetic", [f"text {i}" for i in range(len(labels))], labels, [str(c) for c in range(16)]
    )


def skew(labels: list[int], shard: list[int], classes: int) -> float:
    """Total-variation distance of a shard's label mix from the pool's."""
    pool, mine = Counter(labels), Counter(labels[p] for p in shard)
    return 0.5 * sum(abs(mine[c] / len(shard) - pool[c] / len(labels)) for c in range(classes))


def test_the_settings_come_from_the_run_config_and_are_checked() -> None:
    assert PartitionSettings.from_run_config({}) == PartitionSettings("task", 0.5, 2, 0)
    read = PartitionSettings.from_run_config(
        {"partitioner": "dirichlet", "partition-alpha": 0.1, "seed": 3}
    )
    assert (read.partitioner, read.alpha, read.seed) == ("dirichlet", 0.1, 3)
    with pytest.raises(ConfigError, match="run config key 'partitioner' must be one of task, iid"):
        PartitionSettings.from_run_config({"partitioner": "shards"})
    with pytest.raises(ConfigError, match="'partition-alpha' must be a finite number in \\(0"):
        PartitionSettings.from_run_config({"partition-alpha": 0.0})
    with pytest.raises(ConfigError, match="'partition-classes' must be an integer >= 1"):
        PartitionSettings.from_run_config({"partition-classes": 0})


@pytest.mark.parametrize(
    "settings",
    [
        PartitionSettings("iid", seed=1),
        PartitionSettings("dirichlet", alpha=0.1, seed=1),
        PartitionSettings("pathological", classes=2, seed=1),
    ],
    ids=["iid", "dirichlet", "pathological"],
)
def test_every_example_lands_in_exactly_one_shard_the_same_for_the_same_seed(
    settings: PartitionSettings,
) -> None:
    data = synthetic(8, 100)
    shards = partition_positions(data.labels, 8, settings)
    assert sorted(p for shard in shards for p in shard) == list(range(len(data)))
    assert partition_positions(data.labels, 8, settings) == shards
    other = PartitionSettings(settings.partitioner, settings.alpha, settings.classes, seed=2)
    assert partition_positions(data.labels, 8, other) != shards


def test_iid_shards_are_equal_and_keep_the_pools_label_mix() -> None:
    data = synthetic(8, 100)
    shards = partition_positions(data.labels, 8, PartitionSettings("iid"))
    assert [len(shard) for shard in shards] == [100] * 8
    assert max(skew(data.labels, shard, 8) for shard in shards) < 0.15


def test_dirichlet_skew_follows_alpha() -> None:
    data = synthetic(8, 200)

    def mean_skew(alpha: float) -> float:
        shards = partition_positions(data.labels, 8, PartitionSettings("dirichlet", alpha=alpha))
        return sum(skew(data.labels, shard, 8) for shard in shards) / len(shards)

    # measured: about 0.6 at alpha 0.1, under 0.05 at alpha 1000
    assert mean_skew(0.1) > 0.4
    assert mean_skew(1000.0) < 0.1


def test_pathological_shards_hold_exactly_the_asked_number_of_classes() -> None:
    data = synthetic(8, 100)
    for classes in (1, 3):
        shards = partition_positions(
            data.labels, 8, PartitionSettings("pathological", classes=classes)
        )
        assert [len({data.labels[p] for p in shard}) for shard in shards] == [classes] * 8


def test_a_too_small_shard_is_refused_naming_the_partition_and_the_fix() -> None:
    data = synthetic(4, 10)  # 40 examples over 16 shards: some get fewer than 10
    settings = PartitionSettings("pathological", classes=1)
    shards = partition_positions(data.labels, 16, settings)
    assert min(len(shard) for shard in shards) < MIN_SHARD_EXAMPLES
    with pytest.raises(
        ShardError, match=r"partition \d+ of 16 holds \d+ examples? .*raise partition-classes"
    ):
        check_shards(shards, settings, data)
    with pytest.raises(
        ShardError,
        match=r"partitioner = \"dirichlet\", partition-alpha = 0.1.*raise partition-alpha",
    ):
        partition_positions(data.labels, 16, PartitionSettings("dirichlet", alpha=0.1))


def test_site_shards_of_real_tasks_pool_their_labels_and_split_the_pool() -> None:
    pool = pooled_tasks(TASKS)
    parts = [load_task(task, "train") for task in TASKS]
    assert len(pool) == sum(len(part) for part in parts)
    assert set(pool.label_names) == {name for part in parts for name in part.label_names}
    settings = PartitionSettings("dirichlet", alpha=0.1, seed=0)
    shards = [site_shard(TASKS, i, 4, settings) for i in range(4)]
    assert sum(len(shard) for shard in shards) == len(pool)
    assert all(len(shard) >= MIN_SHARD_EXAMPLES for shard in shards)
    assert site_shard(TASKS, 2, 4, settings).texts == shards[2].texts  # cached, and the same
    with pytest.raises(ValueError, match="'partition-id' 4 is outside"):
        site_shard(TASKS, 4, 4, settings)
    # too many sites for one class each: a site's shard is refused, not handed out small
    with pytest.raises(
        ShardError, match=r"partition \d+ of 300 holds \d+ examples .*\(mcid\+hwu64\)"
    ):
        site_shard(TASKS, 0, 300, PartitionSettings("pathological", classes=1))


def test_a_nodes_round_draw_is_uniform_from_its_shard_and_never_its_held_out_part() -> None:
    run_config: dict[str, Any] = {
        "seen-tasks": ",".join(TASKS),
        "partitioner": "dirichlet",
        "partition-alpha": 0.1,
    }
    node = {"partition-id": 1, "num-partitions": 4}
    workload = WorkloadSettings.from_run_config(run_config)
    train = local_data(LocalRound(run_config, node, 3), workload, "train", limit=64, seed=3)
    dev = local_data(LocalRound(run_config, node), workload, "dev", limit=10_000, seed=0)
    shard = set(site_shard(TASKS, 1, 4, PartitionSettings.from_run_config(run_config)).texts)
    assert len(train) == 64
    assert set(train.texts) <= shard and set(dev.texts) <= shard
    assert not set(train.texts) & set(dev.texts)
    with pytest.raises(ValueError, match="needs node-config 'num-partitions'"):
        local_data(LocalRound(run_config, {"partition-id": 1}), workload, "train", limit=8, seed=0)


def test_the_uniform_draw_keeps_the_label_mix() -> None:
    data = TaskData("x", [str(i) for i in range(1000)], [0] * 900 + [1] * 100, ["a", "b"])
    drawn = uniform_draw(data, 200, seed=0)
    assert len(drawn) == 200 and 140 < drawn.labels.count(0) < 200
    assert uniform_draw(data, 200, seed=0).texts == drawn.texts
    assert uniform_draw(data, 5000, seed=0) is data
