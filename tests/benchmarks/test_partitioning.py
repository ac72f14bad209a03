"""Dirichlet label-skew shards (flwr-datasets' DirichletPartitioner) and the client assignment
of issue 17's 16- and 64-client federations; one tiny run of ``run_federated`` on the shards."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks.partitioning import (
    assign_clients,
    client_shards,
    dirichlet_shards,
    shard_data_hook,
    task_seed,
)
from benchmarks.quality import Adapter, QualityConfig, Workload, run_federated
from tests.workload.tiny_model import save_tiny_bert
from workload.model import LoraSettings, build_lora_model
from workload.tasks import TaskData, load_task
from workload.training import TrainSettings

SEVEN = ("banking77", "hwu64", "stackoverflow", "sentiment", "yahoo", "dbpedia", "20ng")


@pytest.fixture(scope="module")
def mcid() -> TaskData:
    """A class-balanced pool of a real task: 16 classes x 32 examples."""
    return load_task("mcid", "train", limit=512, seed=0)


def synthetic(name: str, classes: int, per_class: int) -> TaskData:
    labels = [c for c in range(classes) for _ in range(per_class)]
    texts = [f"{name} text {i} of class {c}" for i, c in enumerate(labels)]
    return TaskData(name, texts, labels, [f"class {c}" for c in range(classes)])


def total_variation(shard: TaskData, task: TaskData) -> float:
    """Half the L1 distance between the shard's and the task's label distributions."""
    mine, theirs = Counter(shard.labels), Counter(task.labels)
    return 0.5 * sum(
        abs(mine[c] / len(shard) - theirs[c] / len(task)) for c in range(len(task.label_names))
    )


def test_every_example_lands_in_exactly_one_shard(mcid: TaskData) -> None:
    shards = dirichlet_shards(mcid, 5, alpha=0.5, seed=3)
    assert len(shards) == 5
    assert all(len(shard) > 0 for shard in shards)
    assert sum(len(shard) for shard in shards) == len(mcid)
    pairs = Counter(zip(mcid.texts, mcid.labels, strict=True))
    sharded = Counter(pair for s in shards for pair in zip(s.texts, s.labels, strict=True))
    assert sharded == pairs
    for shard in shards:
        assert (shard.name, shard.label_names) == (mcid.name, mcid.label_names)
        # each shard keeps the task's order
        order = [mcid.texts.index(text) for text in shard.texts]
        assert order == sorted(order)


def test_shards_are_seeded_deterministic(mcid: TaskData) -> None:
    first = dirichlet_shards(mcid, 4, alpha=0.5, seed=11)
    again = dirichlet_shards(mcid, 4, alpha=0.5, seed=11)
    other = dirichlet_shards(mcid, 4, alpha=0.5, seed=12)
    assert first == again
    assert [s.labels for s in first] != [s.labels for s in other]


def test_alpha_half_skews_the_shards_label_mix_alpha_1000_hardly(mcid: TaskData) -> None:
    """Mean total-variation distance of a shard's label distribution from the task's, over 3
    shards and 6 seeds: about 0.37 at alpha 0.5 and 0.01 at alpha 1000 on this pool."""

    def mean_tv(alpha: float) -> float:
        distances = [
            total_variation(shard, mcid)
            for seed in range(6)
            for shard in dirichlet_shards(mcid, 3, alpha=alpha, seed=seed)
        ]
        return sum(distances) / len(distances)

    skewed, even = mean_tv(0.5), mean_tv(1000.0)
    assert skewed > 0.2, skewed
    assert even < 0.05, even
    assert skewed > 5 * even


def test_min_examples_holds_or_the_task_is_refused() -> None:
    pool = synthetic("t", classes=4, per_class=50)
    shards = dirichlet_shards(pool, 4, alpha=0.5, seed=0, min_examples=15)
    assert min(len(s) for s in shards) >= 15
    with pytest.raises(ValueError, match="has 200 examples, too few for 8 shards of at least 30"):
        dirichlet_shards(pool, 8, alpha=0.5, min_examples=30)
    # One example per class: the partitioner rounds each class's cut points down, so every
    # example goes to the last shard, every redraw too, and it gives up after 11 draws.
    sparse = synthetic("sparse", classes=8, per_class=1)
    with pytest.raises(ValueError, match=r"task 'sparse': 11 Dirichlet draws .* fewer clients"):
        dirichlet_shards(sparse, 4, alpha=0.5, seed=0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_shards(pool, 2, alpha=0.0)
    with pytest.raises(ValueError, match="clients must be >= 1"):
        dirichlet_shards(pool, 0)


@pytest.mark.parametrize(
    ("clients", "per_task"), [(16, [3, 3, 2, 2, 2, 2, 2]), (64, [10, 9, 9, 9, 9, 9, 9])]
)
def test_clients_spread_over_seven_tasks_as_evenly_as_possible(
    clients: int, per_task: list[int]
) -> None:
    assignment = assign_clients(clients, SEVEN)
    assert [a.client for a in assignment] == list(range(clients))
    assert [a.task for a in assignment] == [SEVEN[i % 7] for i in range(clients)]  # = the app's
    counts = Counter(a.task for a in assignment)
    assert [counts[task] for task in SEVEN] == per_task
    for task, count in zip(SEVEN, per_task, strict=True):
        mine = [a for a in assignment if a.task == task]
        assert sorted(a.shard for a in mine) == list(range(count))
        assert {a.shards for a in mine} == {count}
    with pytest.raises(ValueError, match="6 clients cannot cover 7 tasks"):
        assign_clients(6, SEVEN)


def test_client_shards_split_each_task_over_its_clients() -> None:
    pools = {name: synthetic(name, classes=3, per_class=20) for name in ("a", "b", "c")}
    shards = client_shards(pools, 7, alpha=0.5, seed=5)
    assert [s.name for s in shards] == ["a", "b", "c", "a", "b", "c", "a"]
    for name, count in (("a", 3), ("b", 2), ("c", 2)):
        mine = [s for s in shards if s.name == name]
        assert mine == dirichlet_shards(pools[name], count, alpha=0.5, seed=task_seed(5, name))
        assert sorted(t for s in mine for t in s.texts) == sorted(pools[name].texts)
    hook = shard_data_hook(shards)
    assert hook(1, pools["c"]) is shards[0]
    assert hook(7, pools["c"]) is shards[6]


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """The tiny model on one thread (as tests/workload/conftest.py does): 3 s, not 14 s, on a
    busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_torch_thread")
def test_run_federated_trains_each_node_on_its_shard_with_frozen_a(tmp_path: Path) -> None:
    """Per-client data through client_tasks + data_hook, FFA-LoRA through train_factors."""
    folder = save_tiny_bert(tmp_path / "tiny-bert")
    lora = LoraSettings(model=str(folder), r=4, alpha=8, target_modules=("query", "value"))
    config = QualityConfig(seen=("mcid", "sentiment"), unseen=(), train_examples=8)
    train = TrainSettings(batch_size=8, max_length=16, learning_rate=1e-2)
    work = Workload(config, lora, train, build_lora_model(lora, seed=0))
    for name in config.seen:
        work.test[name] = load_task(name, "test", limit=8, seed=0)
    pools = {name: load_task(name, "train", limit=48, seed=0) for name in config.seen}
    shards = client_shards(pools, 3, alpha=0.5, seed=0)
    hook = shard_data_hook(shards)
    seen: dict[int, TaskData] = {}

    def data_hook(node: int, drawn: TaskData) -> TaskData:
        seen[node] = hook(node, drawn)
        return seen[node]

    checked: list[int] = []

    def reply_hook(node: int, start: Adapter, trained: Adapter) -> Adapter:
        for key in start:
            kept = torch.equal(trained[key], start[key])
            assert kept == (".lora_A." in key), (node, key)
        checked.append(node)
        return trained

    history = run_federated(
        work,
        method="fedavg",
        seed=0,
        rounds=1,
        fuse_weight=1.0,
        server_lr=1.0,
        split="test",
        log=lambda _: None,
        client_tasks=[s.name for s in shards],
        data_hook=data_hook,
        reply_hook=reply_hook,
        train_factors="b",
    )
    assert sorted(checked) == [1, 2, 3]
    assert seen == {i + 1: shard for i, shard in enumerate(shards)}
    assert 0.0 <= history[0]["seen-avg"] <= 1.0
