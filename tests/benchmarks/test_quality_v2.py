"""The quality benchmark v2's pieces: per-example flags, federations and costs, the budget
planner, the report's comparisons; and (slow) a tiny end-to-end run that resumes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import budget
from benchmarks.federations import (
    Federation,
    RunMeter,
    adapter_bytes,
    federation_shards,
    round_subsample,
    task_pools,
)
from benchmarks.partitioning import client_shards
from benchmarks.per_example import correct_flags, decode_flags, encode_flags
from benchmarks.quality import QualityConfig
from benchmarks.quality_v2 import (
    QUICK,
    REFERENCE_ROW,
    ROUND_ROWS,
    V2Config,
    combine_results,
    fork_results,
    hyper_for,
)
from benchmarks.quality_v2_report import comparisons, curves, markdown, plot
from workload.model import LoraSettings, build_lora_model, initial_adapter, set_lora_state
from workload.tasks import load_task
from workload.training import TrainSettings, evaluate_lora


def test_flags_round_trip() -> None:
    flags = [True, False, False, True, True]
    assert encode_flags(flags) == "10011"
    assert decode_flags("10011").tolist() == flags
    with pytest.raises(ValueError):
        decode_flags("10a")


def test_correct_flags_agree_with_evaluate_lora() -> None:
    model = build_lora_model(LoraSettings(), seed=0)
    set_lora_state(model, initial_adapter(LoraSettings(), seed=1))
    data = load_task("mcid", "test", limit=24, seed=3)
    settings = TrainSettings(max_length=32)
    flags = correct_flags(model, data, settings)
    assert len(flags) == len(data)
    assert sum(flags) / len(flags) == pytest.approx(evaluate_lora(model, data, settings).accuracy)
    # not all the same: the flags say which examples, not only how many
    assert 0 < sum(flags) < len(flags)


def test_federation_sampling_options() -> None:
    assert Federation("64", 64, participation=0.25).sampled() == 16
    assert Federation("64", 64, participation=0.25).strategy_options() == {
        "fraction_train": 0.25,
        "min_train_nodes": 16,
    }
    assert Federation("7", 7).sampled() == 7
    assert Federation("3", 3, participation=0.1).sampled() == 1


def test_run_meter_costs() -> None:
    meter = RunMeter()
    hook = meter.metered_hook(
        [load_task("mcid", "train", limit=5, seed=0), load_task("mcid", "train", limit=3, seed=0)]
    )
    assert len(hook(2, load_task("mcid", "train", limit=9, seed=0))) == 3
    hook(1, load_task("mcid", "train", limit=9, seed=0))
    for r, clients, received, merge, fold in ((1, [1, 2], 200, 0.5, 0.0), (2, [1], 100, 0.1, 0.3)):
        report = SimpleNamespace(
            accepted_nodes=clients, bytes_received=received, merge_seconds=merge, fold_seconds=fold
        )
        meter.round_hook(r, report)
    adapter = {
        "m.lora_A.default.weight": torch.zeros(4, 10),
        "m.lora_B.default.weight": torch.zeros(10, 4, dtype=torch.float16),
    }
    summary = meter.summary(adapter)
    assert summary["train_examples"] == 8
    assert meter.current_round == 3  # the data hook now draws for the round after the last
    assert summary["bytes_up_per_client_round"] == pytest.approx(300 / 3)
    assert summary["bytes_down_per_client_round"] == 40 * 4 + 40 * 2
    assert summary["b_bytes"] == 40 * 2 == adapter_bytes(adapter, only=".lora_B.")
    assert summary["merge_seconds_per_round"] == pytest.approx((0.5 + 0.4) / 2)


def test_run_meter_trains_a_bounded_subsample_per_round() -> None:
    shards = [load_task("banking77", "train", limit=40, seed=0)] * 2
    meter = RunMeter()
    hook = meter.metered_hook(shards, round_examples=6, seed=3)
    first = hook(2, shards[0])
    assert first == round_subsample(shards[1], 6, seed=3, server_round=1, node=2)
    meter.round_hook(
        1,
        SimpleNamespace(accepted_nodes=[2], bytes_received=1, merge_seconds=0.0, fold_seconds=0.0),
    )
    second = hook(2, shards[0])
    assert second == round_subsample(shards[1], 6, seed=3, server_round=2, node=2)
    assert second.texts != first.texts
    assert meter.train_examples == 12


def test_round_subsample_is_bounded_seeded_and_from_the_shard() -> None:
    pools = task_pools(("banking77",), 512, seed=0)
    shard = client_shards(pools, 3, alpha=0.5, seed=0)[0]
    assert len(shard) > 40
    pairs = set(zip(shard.texts, shard.labels, strict=True))
    draws = {
        (r, node): round_subsample(shard, 32, seed=0, server_round=r, node=node)
        for r in (1, 2, 3)
        for node in (1, 2)
    }
    for draw in draws.values():
        assert len(draw) == 32 and draw.label_names == shard.label_names
        assert set(zip(draw.texts, draw.labels, strict=True)) <= pairs
        assert len(set(draw.texts)) == 32  # without replacement
    texts = {key: tuple(d.texts) for key, d in draws.items()}
    assert len(set(texts.values())) == len(texts)  # differs across rounds and nodes
    again = round_subsample(shard, 32, seed=0, server_round=2, node=1)
    assert tuple(again.texts) == texts[(2, 1)]
    assert round_subsample(shard, 32, seed=1, server_round=2, node=1).texts != again.texts
    # the skew stays: the draw keeps the shard's dominant class, not the pool's balance
    top = max(set(shard.labels), key=shard.labels.count)
    share = shard.labels.count(top) / len(shard)
    drawn = sum(d.labels.count(top) for d in draws.values()) / (32 * len(draws))
    assert drawn == pytest.approx(share, abs=0.1)
    assert share > 2 / len(shard.label_names)
    # a shard no larger than the limit is trained whole; None means no limit
    assert round_subsample(shard, len(shard), seed=0, server_round=1, node=1) == shard
    assert round_subsample(shard, None, seed=0, server_round=1, node=1) == shard
    with pytest.raises(ValueError):
        round_subsample(shard, 0, seed=0, server_round=1, node=1)


def test_full_config_federations_split_on_real_data() -> None:
    full = V2Config()
    pools = task_pools(full.base.seen, full.pool_examples, seed=0)
    assert all(len(p) == full.pool_examples for p in pools.values())
    for federation in full.federations:
        shards = federation_shards(pools, federation, seed=0)
        assert len(shards) == federation.clients
        assert all(len(s) >= 1 for s in shards)
        assert sum(len(s) for s in shards) == len(full.base.seen) * full.pool_examples
        # the label skew is there: some shard of a many-class task misses classes
        if federation.clients > len(full.base.seen):
            assert any(len(set(s.labels)) < len(s.label_names) for s in shards)


def test_plan_counts_by_hand() -> None:
    inputs = budget.PlanInputs(
        seeds=2,
        seen_tasks=3,
        pool_examples=10,
        round_examples=4,
        train_examples=4,
        individual_epochs=2,
        test_total=100,
        seen_test_total=60,
        dev_total=30,
        curve_total=20,
        tune_rounds=2,
        tune_federation=(3, 3),
        federations=(("a", 3, 3, 3), ("b", 4, 2, 4), ("c", 10, 2, 1)),
        round_rows=2,
        tuning_grids=((3, 1), (3, 2)),
        one_shot_rows=1,
    )
    counts = budget.plan_counts(inputs)
    # tuning, one axis at a time: (3+1) + 2 x (3+1) = 12 points x 2 rounds x 3 clients x 4
    # round examples (of a pool of 30); dev eval once each
    assert counts["tune"] == budget.StageCount(train=12 * 2 * 12, evaluate=12 * 30)
    assert counts["references"] == budget.StageCount(train=2 * 2 * 24, evaluate=2 * 260)
    assert counts["fed-a"] == budget.StageCount(train=4 * 3 * 12, evaluate=4 * (60 + 100))
    # 2 of 4 clients x 4 examples (their pool share, 15, is larger)
    assert counts["fed-b"] == budget.StageCount(train=4 * 4 * 8, evaluate=4 * (80 + 100))
    # 2 of 10 clients hold a share of 6 examples of the pool, fewer than 2 x 4
    assert counts["fed-c"] == budget.StageCount(train=4 * 1 * 6, evaluate=4 * (20 + 100))
    assert counts["one-shot"] == budget.StageCount(train=0, evaluate=200)
    estimate = budget.estimate_seconds(counts, 0.5, 0.01)
    assert estimate["fed-a"] == pytest.approx(144 * 0.5 + 640 * 0.01)
    assert estimate["total"] == pytest.approx(sum(v for k, v in estimate.items() if k != "total"))
    with pytest.raises(ValueError):
        budget.unit_costs(1.0, 0, 1.0, 1)


TWO = V2Config(
    base=QualityConfig(seen=("s1", "s2"), unseen=("u",), tag="synthetic"),
    seeds=(0, 1),
    federations=(Federation("2", 2, rounds=2),),
    tune_federation="2",
    rows=(REFERENCE_ROW, "ties", "exact-mean"),
    tune_rows=(REFERENCE_ROW,),
    one_shot=False,
    resamples=300,
)


def synthetic_results() -> dict[str, object]:
    """Saved runs where ties is right on every example, exact-mean copies FedAvg."""
    generator = np.random.default_rng(0)
    runs: dict[str, object] = {}
    for seed in TWO.seeds:
        ref = {t: generator.random(200) < 0.5 for t in ("s1", "s2", "u")}
        rows = {
            REFERENCE_ROW: ref,
            "ties": {t: np.ones(200, dtype=bool) for t in ref},
            "exact-mean": ref,
        }
        for row, flags in rows.items():
            runs[f"fed-2|{row}|{seed}"] = {
                "flags": {t: encode_flags(f.tolist()) for t, f in flags.items()},
                "curve": [{"seen-avg": 0.1 * seed, "unseen-avg": 0.2}, {"seen-avg": 0.3}],
                "cost": {
                    "bytes_up_per_client_round": 2048.0,
                    "bytes_down_per_client_round": 2048.0,
                    "b_bytes": 1024.0,
                    "merge_seconds_per_round": 0.001,
                    "train_examples": 10.0,
                },
            }
        runs[f"references|zero-shot|{seed}"] = {
            "flags": {t: encode_flags([False] * 200) for t in ("s1", "s2", "u")}
        }
    tuning = {
        REFERENCE_ROW: {
            "grids": {"server_lr": [1.0, 2.0, 4.0]},
            "evaluations": 3,
            "chosen": {"server_lr": 2.0},
            "best_score": 0.5,
            "cap_hit": {},
        }
    }
    return {"machine": "test", "date": "today", "runs": runs, "tuning": tuning}


def test_comparisons_find_the_win_the_tie_and_the_loss() -> None:
    table = comparisons(synthetic_results(), TWO)
    fed = table["fed-2"]
    assert fed["ties"]["seen"]["diff"]["verdict"] == "win"
    assert fed["ties"]["seen"]["accuracy"] == 1.0
    assert fed["exact-mean"]["seen"]["diff"]["verdict"] == "tie"
    assert fed["exact-mean"]["unseen"]["diff"]["mean"] == 0.0
    assert fed[REFERENCE_ROW]["seen"]["seeds"] == 2
    assert table["references"]["zero-shot"]["seen"]["diff"]["verdict"] == "loss"


def test_markdown_and_curves() -> None:
    results = synthetic_results()
    text = markdown(results, TWO, "pytest")
    for row in TWO.rows:
        assert f"| {row} | 2 |" in text
    assert "| zero-shot | 2 |" in text
    assert "server_lr: 1, 2, 4" in text
    assert "Not tuned (strategy defaults): ties, exact-mean." in text
    assert "Best on dev (tuning, 2 clients): **fedavg (FedIT)** at server_lr 2, 50.0." in text
    wins = [line for line in text.splitlines() if line.startswith("- 2 clients, seen tasks")]
    assert len(wins) == 1 and "wins: ties (+" in wins[0] and "losses: none; 1 tie." in wins[0]
    unseen = [line for line in text.splitlines() if line.startswith("  2 clients, unseen tasks")]
    assert len(unseen) == 1 and "wins: ties (+" in unseen[0] and "1 tie." in unseen[0]
    mean = curves(results, "fed-2")["ties"]
    assert mean[0] == pytest.approx((0.05, 0.2))
    assert np.isnan(mean[1][1])


def test_plot_draws_seen_and_unseen_panels_per_federation(tmp_path: Path) -> None:
    import matplotlib.pyplot as plt

    figures: list[Any] = []
    original = plt.subplots

    def spy(*args: Any, **kwargs: Any) -> Any:
        made = original(*args, **kwargs)
        figures.append(made)
        return made

    path = tmp_path / "curves.png"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plt, "subplots", spy)
        plot(synthetic_results(), TWO, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    ((_, axes),) = figures
    assert axes.shape == (2, len(TWO.federations))
    seen, unseen = axes[0][0], axes[1][0]
    assert "seen tasks" in seen.get_title() and "unseen tasks" in unseen.get_title()
    ties = {line.get_label(): line for line in seen.get_lines()}["ties"]
    assert list(ties.get_ydata()) == pytest.approx(
        [100 * p[0] for p in curves(synthetic_results(), "fed-2")["ties"]]
    )


def test_hyper_for_uses_the_tuned_choice_else_the_defaults() -> None:
    results = synthetic_results()
    assert hyper_for(TWO, results, REFERENCE_ROW) == {"server_lr": 2.0, "fuse_weight": 2.0}
    assert hyper_for(TWO, results, "ties") == {"server_lr": 1.0, "fuse_weight": 2.0}


def test_hyper_for_refuses_a_row_whose_tuning_is_missing() -> None:
    results = synthetic_results()
    with pytest.raises(SystemExit, match="'ties' is not tuned yet"):
        hyper_for(replace(TWO, tune_rows=(REFERENCE_ROW, "ties")), results, "ties")


def saved(runs: dict[str, int], meter: tuple[float, int, float, int], wall: float) -> dict:
    """A saved results file with the given runs (values stand in for their contents)."""
    names = ("train_seconds", "train_examples", "eval_seconds", "eval_examples")
    return {
        "config": {"tag": "x"},
        "tuning": {REFERENCE_ROW: {"chosen": {"server_lr": 2.0}}},
        "runs": dict(runs),
        "meter": dict(zip(names, meter, strict=True)),
        "meter_before": {"eval_seconds": 1.0, "eval_examples": 1},
        "stage_seconds": {"tune": 100.0},
        "wall_seconds": wall,
        "run_id": "main",
    }


def test_fork_and_combine_add_the_forks_work_once() -> None:
    main = saved({"a": 1}, (10.0, 100, 5.0, 50), wall=120.0)
    fork = fork_results(main)
    assert fork["runs"] == {"a": 1} and fork["tuning"] == main["tuning"]
    assert fork["meter"] == {
        "train_seconds": 0.0,
        "train_examples": 0,
        "eval_seconds": 0.0,
        "eval_examples": 0,
    }
    assert "meter_before" not in fork and fork["stage_seconds"] == {}
    assert fork["run_id"] != "main" and fork["forked_from"] == "main"
    # each side then runs its own stages
    main["runs"]["b"] = 2
    main["meter"].update(train_seconds=30.0, train_examples=300)
    main["stage_seconds"]["fed-7"] = 50.0
    main["wall_seconds"] = 400.0
    fork["runs"]["c"] = 3
    fork["meter"].update(train_seconds=7.0, train_examples=70, eval_seconds=2.0, eval_examples=20)
    fork["stage_seconds"] = {"fed-16": 60.0, "fed-7": 1.0}
    fork["wall_seconds"] = 500.0
    both = combine_results(main, fork)
    assert both["runs"] == {"a": 1, "b": 2, "c": 3}
    assert both["meter"] == {
        "train_seconds": 37.0,
        "train_examples": 370,
        "eval_seconds": 7.0,
        "eval_examples": 70,
    }
    assert both["stage_seconds"] == {"tune": 100.0, "fed-7": 51.0, "fed-16": 60.0}
    assert both["wall_seconds"] == 500.0
    assert "meter_before" not in both
    assert main["runs"] == {"a": 1, "b": 2}  # inputs untouched


def test_combine_refuses_mixups() -> None:
    main = saved({"a": 1}, (1.0, 1, 1.0, 1), wall=1.0)
    with pytest.raises(SystemExit, match="not a fork"):
        combine_results(main, saved({"c": 3}, (1.0, 1, 1.0, 1), wall=1.0))  # a copy
    independent = saved({"c": 3}, (1.0, 1, 1.0, 1), wall=5.0) | {"run_id": "other"}
    assert combine_results(main, independent)["runs"] == {"a": 1, "c": 3}
    other = fork_results(main)
    other["config"] = {"tag": "y"}
    with pytest.raises(SystemExit, match="another configuration"):
        combine_results(main, other)
    clash = fork_results(main)
    clash["runs"]["a"] = 9
    with pytest.raises(SystemExit, match="runs 'a' differs"):
        combine_results(main, clash)


def test_configs_cover_the_issue() -> None:
    full = V2Config()
    assert set(full.rows) == set(ROUND_ROWS) == set(full.tune_rows)
    assert ROUND_ROWS["FFA-LoRA"].train_factors == "b"
    assert [(f.clients, f.participation) for f in full.federations] == [
        (7, 1.0),
        (16, 1.0),
        (64, 0.25),
    ]
    assert all(f.rounds >= 10 for f in full.federations if f.clients > 7)
    assert len(full.seeds) >= 3 and full.base.eval_examples >= 1000
    assert full.results_stem == "quality" and QUICK.results_stem == "quality-quick"
    assert full.stages() == ["tune", "references", "fed-7", "fed-16", "fed-64", "one-shot"]


TINY = replace(
    QUICK,
    base=replace(QUICK.base, seen=("sentiment", "mcid"), unseen=("stackoverflow",), tag="tiny"),
    pool_examples=48,
    round_examples=4,
    federations=(Federation("2", 2, rounds=1), Federation("4", 4, participation=0.5, rounds=1)),
    tune_federation="2",
    rows=(REFERENCE_ROW, "FFA-LoRA"),
    tune_rows=(REFERENCE_ROW,),
    lr_grid=(1.0, 2.0),
    max_extensions=0,
    one_shot=False,
    resamples=100,
)


@pytest.mark.slow
def test_tiny_run_end_to_end_and_resume(tmp_path: Path) -> None:
    from benchmarks.quality_v2 import run_stages

    logs: list[str] = []
    results = run_stages(TINY, tmp_path, log=logs.append, cache_dir=tmp_path / "cache")
    runs = results["runs"]
    assert set(results["tuning"]) == {REFERENCE_ROW}
    for stage in ("fed-2", "fed-4"):
        for row in TINY.rows:
            run = runs[f"{stage}|{row}|0"]
            assert set(run["flags"]) == {"sentiment", "mcid", "stackoverflow"}
            assert len(run["curve"]) == 1
            assert run["cost"]["bytes_up_per_client_round"] > run["cost"]["b_bytes"] > 0
    assert runs["fed-4|fedavg (FedIT)|0"]["cost"]["train_examples"] < 16  # half the clients
    saved = json.loads((tmp_path / "quality-tiny.json").read_text())
    assert saved["runs"].keys() == runs.keys()
    # a rerun trains nothing
    logs.clear()
    again = run_stages(TINY, tmp_path, log=logs.append, cache_dir=tmp_path / "cache")
    assert again["runs"].keys() == runs.keys()
    assert not any(line.startswith("  fed ") for line in logs)
    with pytest.raises(SystemExit, match="another configuration"):
        run_stages(replace(TINY, seeds=(5,)), tmp_path, log=logs.append)


def test_write_json_replaces_the_file_whole(tmp_path: Path) -> None:
    from benchmarks.quality_v2 import write_json

    path = tmp_path / "quality.json"
    write_json(path, {"runs": {"a": 1}})
    write_json(path, {"runs": {"a": 1, "b": 2}})
    assert json.loads(path.read_text()) == {"runs": {"a": 1, "b": 2}}
    assert [p.name for p in tmp_path.iterdir()] == ["quality.json"]


def test_a_run_can_take_some_of_the_configs_seeds(tmp_path: Path) -> None:
    from benchmarks.quality_v2 import Run, run_stages

    def run(only: tuple[int, ...] | None) -> Run:
        return Run(TWO, work=None, results={}, json_path=tmp_path / "x.json", only_seeds=only)  # type: ignore[arg-type]

    assert run(None).seeds == (0, 1)
    assert run((1,)).seeds == (1,)
    with pytest.raises(SystemExit, match=r"seeds \[7\] not in the config"):
        run_stages(TWO, tmp_path, only_seeds=[1, 7])
    assert not list(tmp_path.iterdir())


def test_late_moves_and_the_summary_say_whether_curves_flattened() -> None:
    from benchmarks.quality_v2_report import late_moves

    curves_by_row = {
        "a": [(0.5, 0.0), (0.55, 0.0), (0.6, 0.0), (0.7, 0.0)],
        "b": [(0.5, 0.0), (0.5, 0.0), (0.5, 0.0), (0.505, 0.0)],
        "short": [(0.1, 0.0), (0.2, 0.0)],
    }
    moves = late_moves(curves_by_row, 3)
    assert moves == pytest.approx({"a": 0.2, "b": 0.005})
    results = synthetic_results()
    for key, run in results["runs"].items():  # type: ignore[attr-defined]
        if key.startswith("fed-2|"):
            run["curve"] = [{"seen-avg": v} for v in (0.5, 0.5, 0.5, 0.504)]
    text = markdown(results, TWO, "pytest")
    assert "Curves over the last 3 rounds (seen, mean of seeds): +0.4 to +0.4 points" in text
    assert "(flat)." in text
    results["runs"]["fed-2|ties|0"]["curve"][-1]["seen-avg"] = 0.6  # type: ignore[index]
    assert "(still moving)." in markdown(results, TWO, "pytest")
