"""The regime map (issue 31): local work draws, update signals, the training cache, tuning that
serves several cells, the plan, the report; and (slow) a tiny end-to-end run that resumes."""

from __future__ import annotations

import itertools
import json
import math
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import regime_signals
from benchmarks.federations import Federation, local_work_draw, round_subsample
from benchmarks.per_example import encode_flags
from benchmarks.regimes import (
    QUICK,
    REFERENCE_ROW,
    Regime,
    RegimeConfig,
    SkippedCell,
    cell_groups,
    combine,
    full_hyper,
    point_key,
    tuned_axes,
)
from benchmarks.regimes_report import best_challenger, cell_cost, comparisons, markdown, plot
from benchmarks.train_cache import TrainCache, adapter_digest, data_digest
from workload.tasks import TaskData
from workload.training import TrainResult, TrainSettings

# ----------------------------------------------------------------------------- local work


def _shard(size: int) -> TaskData:
    return TaskData(
        "t", [f"text {i}" for i in range(size)], [i % 3 for i in range(size)], ["a", "b", "c"]
    )


def test_local_work_draw_gives_exactly_the_asked_examples_in_whole_passes() -> None:
    shard = _shard(5)
    data = local_work_draw(shard, 12, seed=0, server_round=1, node=1)
    assert len(data) == 12
    counts = Counter(data.texts)
    # two whole passes (every example twice), then 2 of a third pass
    assert sorted(counts.values()) == [2, 2, 2, 3, 3]
    assert set(counts) == set(shard.texts)
    # labels travel with their texts
    assert all(data.labels[i] == int(t.split()[1]) % 3 for i, t in enumerate(data.texts))
    # seeded: the same (seed, round, node) draws the same; another round another order
    assert local_work_draw(shard, 12, seed=0, server_round=1, node=1).texts == data.texts
    assert local_work_draw(shard, 12, seed=0, server_round=2, node=1).texts != data.texts


def test_local_work_draw_of_a_large_shard_is_the_subsample() -> None:
    shard = _shard(40)
    drawn = local_work_draw(shard, 8, seed=3, server_round=2, node=4)
    expected = round_subsample(shard, 8, seed=3, server_round=2, node=4)
    assert drawn.texts == expected.texts and len(set(drawn.texts)) == 8
    assert local_work_draw(shard, None, seed=0, server_round=1, node=1) is shard
    with pytest.raises(ValueError, match="examples must be"):
        local_work_draw(_shard(3), 0, seed=0, server_round=1, node=1)
    with pytest.raises(ValueError, match="empty shard"):
        local_work_draw(_shard(0), 4, seed=0, server_round=1, node=7)


# ----------------------------------------------------------------------------- signals


def _adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    out = {}
    for module, (a, b) in factors.items():
        out[f"base_model.model.{module}.lora_A.weight"] = a
        out[f"base_model.model.{module}.lora_B.weight"] = b
    return out


def test_signals_hand_checked() -> None:
    zero = _adapter({"q": (torch.tensor([[1.0, 0.0]]), torch.zeros(2, 1))})
    # client updates B A: [[1,0],[0,0]] and [[0,0],[1,0]] -> orthogonal; and its negative
    one = _adapter({"q": (torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0], [0.0]]))})
    two = _adapter({"q": (torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0], [1.0]]))})
    minus = _adapter({"q": (torch.tensor([[1.0, 0.0]]), torch.tensor([[-1.0], [0.0]]))})
    u = [regime_signals.flat_update(zero, t) for t in (one, two, minus)]
    assert regime_signals.mean_pairwise_cosine(u[:2]) == pytest.approx(0.0)
    assert regime_signals.mean_pairwise_cosine([u[0], u[2]]) == pytest.approx(-1.0)
    assert regime_signals.mean_pairwise_cosine([u[0], u[0]]) == pytest.approx(1.0)
    # three updates: pairs (0,1)=0, (0,2)=-1, (1,2)=0 -> mean -1/3
    assert regime_signals.mean_pairwise_cosine(u) == pytest.approx(-1 / 3)
    assert math.isnan(regime_signals.mean_pairwise_cosine(u[:1]))
    # same A, so averaging factors is exact: no gap
    assert regime_signals.factorwise_gap(zero, [one, two]) == pytest.approx(0.0)
    # A differs: clients B=[1],A=[1,0] and B=[0]... use scalars: B_i A_i = 2*0 and 0*2
    left = _adapter({"q": (torch.tensor([[2.0]]), torch.tensor([[0.0]]))})
    right = _adapter({"q": (torch.tensor([[0.0]]), torch.tensor([[2.0]]))})
    origin = _adapter({"q": (torch.tensor([[1.0]]), torch.tensor([[-1.0]]))})  # B0 A0 = -1
    # mean(B) mean(A) = 1, mean(BA) = 0, mean update = 0 - (-1) = 1 -> gap |1 - 0| / 1 = 1
    assert regime_signals.factorwise_gap(origin, [left, right]) == pytest.approx(1.0)
    assert regime_signals.step_norm(zero, one) == pytest.approx(1.0)
    assert regime_signals.step_norm(origin, left) == pytest.approx(1.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(0, 10_000))
def test_signals_match_a_float64_loop(clients: int, rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)

    def random_adapter() -> dict[str, torch.Tensor]:
        return _adapter(
            {
                m: (
                    torch.randn(rank, 3, generator=generator),
                    torch.randn(4, rank, generator=generator),
                )
                for m in ("k", "q")
            }
        )

    start = random_adapter()
    trained = [random_adapter() for _ in range(clients)]
    keys = sorted({k.rsplit(".lora_", 1)[0] for k in start})

    def product(adapter: dict[str, torch.Tensor], module: str) -> np.ndarray:
        b = adapter[f"{module}.lora_B.weight"].double().numpy()
        a = adapter[f"{module}.lora_A.weight"].double().numpy()
        return b @ a

    updates = [
        np.concatenate([(product(t, m) - product(start, m)).ravel() for m in keys]) for t in trained
    ]
    cosines = [
        float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y))
        for x, y in itertools.combinations(updates, 2)
    ]
    flat = [regime_signals.flat_update(start, t) for t in trained]
    assert regime_signals.mean_pairwise_cosine(flat) == pytest.approx(np.mean(cosines), abs=1e-9)
    gap_sq = mean_sq = 0.0
    for m in keys:
        bs = [t[f"{m}.lora_B.weight"].double().numpy() for t in trained]
        as_ = [t[f"{m}.lora_A.weight"].double().numpy() for t in trained]
        exact = sum(b @ a for b, a in zip(bs, as_, strict=True)) / clients
        factorwise = (sum(bs) / clients) @ (sum(as_) / clients)
        gap_sq += float(((factorwise - exact) ** 2).sum())
        mean_sq += float(((exact - product(start, m)) ** 2).sum())
    assert regime_signals.factorwise_gap(start, trained) == pytest.approx(
        math.sqrt(gap_sq / mean_sq), rel=1e-9
    )


# ----------------------------------------------------------------------------- the cache


def test_train_cache_hits_only_the_same_training() -> None:
    cache = TrainCache(max_entries=2)
    start = {"w": torch.zeros(2)}
    data = _shard(4)
    settings_ = TrainSettings(batch_size=2)
    trained = {"w": torch.ones(2)}
    cache.put(start, data, settings_, 1, trained, TrainResult(4, 0.5))
    hit = cache.get(start, data, settings_, 1)
    assert hit is not None and torch.equal(hit[0]["w"], trained["w"]) and hit[1].num_examples == 4
    hit[0]["w"].add_(1)  # a copy: the stored entry is unchanged
    again = cache.get(start, data, settings_, 1)
    assert again is not None and torch.equal(again[0]["w"], torch.ones(2))
    for other in (
        ({"w": torch.tensor([0.0, 1e-30])}, data, settings_, 1),
        (start, _shard(5), settings_, 1),
        (start, data, replace(settings_, learning_rate=1e-2), 1),
        (start, data, settings_, 2),
    ):
        assert cache.get(*other) is None
    assert (cache.hits, cache.misses) == (2, 4)
    # FIFO bound
    cache.put(start, data, settings_, 2, trained, TrainResult(4, 0.5))
    cache.put(start, data, settings_, 3, trained, TrainResult(4, 0.5))
    assert cache.get(start, data, settings_, 1) is None and len(cache.entries) == 2


def test_digests_see_every_part() -> None:
    assert adapter_digest({"a": torch.zeros(2)}) != adapter_digest({"a": torch.zeros(2, 1)})
    assert adapter_digest({"a": torch.zeros(2)}) != adapter_digest({"b": torch.zeros(2)})
    assert adapter_digest({"a": torch.zeros(2)}) != adapter_digest(
        {"a": torch.zeros(2, dtype=torch.float64)}
    )
    base = _shard(3)
    relabelled = TaskData(base.name, base.texts, [0, 0, 0], base.label_names)
    assert data_digest(base) != data_digest(relabelled)
    assert data_digest(base) == data_digest(_shard(3))


# ----------------------------------------------------------------------------- tuning and plan


def test_tuned_axes_and_points() -> None:
    config = RegimeConfig()
    assert [a.name for a in tuned_axes(config, REFERENCE_ROW)] == ["server_lr"]
    assert [a.name for a in tuned_axes(config, "robustmerge (paper-exact)")] == [
        "server_lr",
        "keep_ratio",
    ]
    assert tuned_axes(config, "robustmerge (paper-exact)")[1].maximum == 1.0
    hyper = full_hyper({"server_lr": 0.5})
    assert hyper == {"server_lr": 0.5, "fuse_weight": 2.0, "keep_ratio": 0.2}
    assert point_key(hyper) == "fuse_weight=2,keep_ratio=0.2,server_lr=0.5"


def test_cell_groups_share_one_run_per_setting() -> None:
    a = full_hyper({"server_lr": 1.0})
    b = full_hyper({"server_lr": 2.0})
    groups = cell_groups({"chosen": {"1": a, "3": b, "10": a}})
    assert groups == [(a, [1, 10]), (b, [3])]


def test_full_plan_covers_every_cell_or_says_why() -> None:
    config = RegimeConfig()
    planned = {(r.federation, r.steps, n) for r in config.regimes for n in r.rounds}
    skipped = {(c.federation, c.steps, c.rounds) for c in config.skipped}
    grid = set(itertools.product(("7", "16"), (2, 16, 64), (1, 3, 10)))
    assert planned | skipped == grid and not planned & skipped
    assert all(c.reason for c in config.skipped)
    # cross-silo first: the most local work and fewest rounds lead the plan
    assert config.regimes[0] == Regime("7", 64, (1, 3))
    assert config.stages()[:3] == ["zero-shot", "tune-7x64", "measure-7x64"]
    assert config.federation("16").alpha == 0.1


# ----------------------------------------------------------------------------- report


def _flags(correct: int, total: int = 20) -> str:
    return encode_flags([i < correct for i in range(total)])


def _synthetic_results(config: RegimeConfig) -> dict[str, Any]:
    seen, unseen = config.base.seen, config.base.unseen
    signal = {
        "round": 1,
        "clients": 3,
        "cosine": 0.2,
        "factorwise_gap": 0.1,
        "step_norm": 1.0,
        "client_seconds": 3.0,
        "cached_clients": 0,
    }
    cost = {
        "bytes_up_per_client_round": 2048.0,
        "bytes_down_per_client_round": 1024.0,
        "merge_seconds_per_round": 0.01,
    }
    runs: dict[str, Any] = {}
    for seed in config.seeds:
        for row, correct in ((REFERENCE_ROW, 10), ("robustmerge (paper-exact)", 18)):
            runs[f"3x4|1|{row}|{seed}"] = {
                "flags": {t: _flags(correct) for t in (*seen, *unseen)},
                "signals": [{**signal, "step_norm": 2.0 if "robust" in row else 1.0}],
                "cost": cost,
                "hyper": full_hyper({"server_lr": 2.0}),
            }
        runs[f"zero-shot|0|zero-shot|{seed}"] = {"flags": {t: _flags(5) for t in (*seen, *unseen)}}
    return {
        "machine": "test",
        "date": "today",
        "wall_seconds": 60.0,
        "runs": runs,
        "tuning": {},
        "tune_points": {},
    }


def test_report_compares_each_cell_with_tuned_fedavg(tmp_path: Path) -> None:
    config = replace(QUICK, resamples=200)
    results = _synthetic_results(config)
    table = comparisons(results, config)
    assert set(table) == {("3", 4, 1)}
    cell = table[("3", 4, 1)]
    robust = cell["robustmerge (paper-exact)"]["seen"]
    assert robust["diff"]["mean"] == pytest.approx(0.4)
    assert robust["diff"]["verdict"] == "win"
    assert cell["zero-shot"]["seen"]["diff"]["mean"] == pytest.approx(-0.25)
    best = best_challenger(cell)
    assert best is not None and best[0] == "robustmerge (paper-exact)"
    cost = cell_cost(results, ("3", 4, 1))
    assert cost["client_s"] == pytest.approx(1.0) and cost["up_kib"] == pytest.approx(2.0)
    text = markdown(results, config, "cmd")
    assert "+40.0 [" in text and "**win**" in text
    assert "robustmerge (paper-exact) 2.00" in text  # step norm relative to FedAvg
    assert "Cells planned but not measured yet" in text and "3 clients x 4 steps x 2" in text
    assert "quick run: one regime per federation" in text  # the skip reason
    results["tune_points"] = {
        "3x4|robustmerge (paper-exact)": {
            "p": {
                "hyper": full_hyper({"server_lr": 2.0}),
                "dev": {"2": 0.5, "1": 0.25},
                "record": {"signals": []},
            }
        }
    }
    results["tuning"] = {}
    tuning = markdown(results, config, "cmd")
    assert "- 3x4, robustmerge (paper-exact): lr 2, keep 0.2: 1 rnd 25.0, 2 rnd 50.0" in tuning
    assert "(tuning not finished)" in tuning
    plot(results, config, tmp_path / "map.png")
    assert (tmp_path / "map.png").stat().st_size > 1000


def test_combine_keeps_both_runs_and_tuned_points() -> None:
    into = {
        "config": {},
        "run_id": "a",
        "tuning": {},
        "runs": {"x": 1},
        "meter": {"m": 1.0},
        "tune_points": {"r|row": {"p1": 1}},
    }
    fork = {
        "config": {},
        "run_id": "b",
        "tuning": {"t": 2},
        "runs": {"y": 2},
        "meter": {"m": 2.0},
        "tune_points": {"r|row": {"p2": 2}, "s|row": {"p3": 3}},
    }
    out = combine(into, fork)
    assert out["runs"] == {"x": 1, "y": 2} and out["tuning"] == {"t": 2}
    assert out["meter"]["m"] == 3.0
    assert out["tune_points"] == {"r|row": {"p1": 1, "p2": 2}, "s|row": {"p3": 3}}


# ----------------------------------------------------------------------------- end to end

TINY = replace(
    QUICK,
    base=replace(QUICK.base, seen=("sentiment", "mcid"), unseen=("stackoverflow",), tag="tiny"),
    seeds=(0, 1),
    pool_examples=16,
    federations=(Federation("2", 2),),
    regimes=(Regime("2", 2, (1, 2)),),
    skipped=(SkippedCell("2", 2, 3, "test"),),
    lr_grid=(1.0, 2.0),
    keep_grid=(0.2, 0.4),
    max_extensions=0,
    curve_examples=4,
    resamples=100,
)


@pytest.mark.slow
def test_tiny_run_end_to_end_resumes_and_reuses_exactly(tmp_path: Path) -> None:
    from benchmarks.regimes import run_stages

    logs: list[str] = []
    cache = tmp_path / "cache"
    results = run_stages(TINY, tmp_path, log=logs.append, cache_dir=cache)
    runs = results["runs"]
    for row in TINY.rows:
        tuning = results["tuning"][f"2x2|{row}"]
        assert set(tuning["chosen"]) == {"1", "2"}
        for cells_seed in itertools.product((1, 2), (0, 1)):
            run = runs[f"2x2|{cells_seed[0]}|{row}|{cells_seed[1]}"]
            assert set(run["flags"]) == {"sentiment", "mcid", "stackoverflow"}
            assert len(run["signals"]) == len(run["curve"]) == cells_seed[0]
            assert run["signals"][0]["clients"] == 2
        # the tuning seed's measured runs came from tuning
        assert runs[f"2x2|1|{row}|0"]["from_tuning"]
        assert not runs[f"2x2|1|{row}|1"]["from_tuning"]
    # round 1 is the same for every row and point of a seed: trained once per seed
    assert results["train_cache"]["hits"] > 0
    points = results["tune_points"]["2x2|robustmerge (paper-exact)"]
    assert all(p["record"]["signals"][0]["cached_clients"] in (0, 2) for p in points.values())
    assert sum(p["record"]["signals"][0]["cached_clients"] == 0 for p in points.values()) <= 1
    # a rerun trains nothing
    logs.clear()
    again = run_stages(TINY, tmp_path, log=logs.append, cache_dir=cache)
    assert again["runs"].keys() == runs.keys()
    assert not any(line.startswith("  fed ") for line in logs)
    # without the kept adapters (another machine), seed 0 is rerun (no cache) and scores the same
    key = f"2x2|2|{REFERENCE_ROW}|0"
    saved = json.loads((tmp_path / "regimes-tiny.json").read_text())
    del saved["runs"][key]
    (tmp_path / "regimes-tiny.json").write_text(json.dumps(saved))
    shutil.rmtree(cache)
    rerun = run_stages(TINY, tmp_path, log=logs.append, cache_dir=cache, stages=["measure-2x2"])
    assert not rerun["runs"][key]["from_tuning"]
    assert rerun["runs"][key]["flags"] == runs[key]["flags"]
    assert rerun["runs"][key]["curve"] == runs[key]["curve"]
    with pytest.raises(SystemExit, match="another configuration"):
        run_stages(replace(TINY, seeds=(5,)), tmp_path, log=logs.append)
    # the plan may grow across sessions: a new regime runs, the saved cells stay
    grown = replace(TINY, regimes=(*TINY.regimes, Regime("2", 1, (1,))), rows=TINY.rows)
    more = run_stages(grown, tmp_path, log=logs.append, cache_dir=cache, stages=["zero-shot"])
    assert more["runs"].keys() == rerun["runs"].keys()
    assert json.loads((tmp_path / "regimes-tiny.json").read_text())["config"]["regimes"][-1] == {
        "federation": "2",
        "steps": 1,
        "rounds": [1],
    }
