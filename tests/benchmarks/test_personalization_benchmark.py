"""The personalisation benchmark (issue 27, item 4): site test data with the site's label mix,
and (slow) the quick configuration end to end through the app's server strategy and ClientApp:
per-site scores for every arm, shared-a's A-only uplink, resume, and the report."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from benchmarks.personalization import (
    ARMS,
    QUICK,
    REFERENCE_ARM,
    cross_silo_cells,
    run_all,
    site_test_data,
    write_site_file,
)
from benchmarks.personalization_report import markdown
from workload.tasks import TaskData, load_data_file


def _data(labels: list[int], names: int = 4) -> TaskData:
    return TaskData(
        "t", [f"text {i}" for i in range(len(labels))], labels, [f"c{k}" for k in range(names)]
    )


def test_site_test_data_follows_the_shards_label_mix_and_covers_its_classes() -> None:
    shard = _data([0] * 90 + [1] * 9 + [2])
    test = _data([k for k in range(4) for _ in range(50)])
    drawn = site_test_data(shard, test, 40, seed=3)
    counts = Counter(drawn.labels)
    assert counts == {0: 36, 1: 4, 2: 1}  # proportional; the rare class at least once; no 3
    assert set(drawn.texts) <= set(test.texts)
    assert site_test_data(shard, test, 40, seed=3) == drawn  # seeded


def test_site_file_round_trips_through_the_apps_reader(tmp_path: Path) -> None:
    data = _data([0, 2, 2, 3])
    write_site_file(tmp_path / "site.jsonl", data)
    read = load_data_file(tmp_path / "site.jsonl")
    assert read.texts == data.texts
    assert [read.label_names[k] for k in read.labels] == [data.label_names[k] for k in data.labels]


def test_full_run_uses_the_regime_maps_cross_silo_cells() -> None:
    assert cross_silo_cells() == (("7", 64, (1, 3)), ("16", 64, (1,)))


@pytest.mark.slow
def test_quick_run_end_to_end_resumes_and_reports(tmp_path: Path) -> None:
    logs: list[str] = []
    results = run_all(QUICK, tmp_path, log=logs.append, work_dir=tmp_path / "work")
    saved = json.loads((tmp_path / "personalization-quick.json").read_text())
    assert saved["runs"].keys() == results["runs"].keys()
    assert len(saved["runs"]) == len(QUICK.run_keys())
    assert saved["machine"] and saved["date"]
    assert "estimated" in logs[0]
    for federation, steps, cells in QUICK.cells:
        clients = QUICK.federation(federation).clients
        for seed in QUICK.seeds:
            for arm in ARMS:
                run = saved["runs"][f"{federation}x{steps}|{seed}|{arm.run}"]
                for rounds in cells:
                    scores = run["checkpoints"][str(rounds)][arm.field]
                    assert len(scores) == clients
                    assert all(0.0 <= s <= 1.0 for s in scores), (arm, scores)
            # shared-a sends A only: half of the dense uplink (A and B have equal sizes here)
            dense = saved["runs"][f"{federation}x{steps}|{seed}|fedavg"]["cost"]
            shared = saved["runs"][f"{federation}x{steps}|{seed}|shared-a"]["cost"]
            ratio = shared["bytes_up_per_client_round"] / dense["bytes_up_per_client_round"]
            assert ratio == pytest.approx(0.5, abs=0.02)
            assert shared["bytes_down_per_client_round"] == dense["bytes_down_per_client_round"]
    # a rerun runs nothing
    logs.clear()
    again = run_all(QUICK, tmp_path, log=logs.append, work_dir=tmp_path / "work")
    assert again["runs"] == saved["runs"]
    assert not any(line.startswith("run ") for line in logs)
    assert "0 runs" not in logs[0] and f"{len(saved['runs'])} saved" in logs[0]
    # the report: every arm of every cell, with an interval against the reference
    text = markdown(saved, QUICK, "cmd")
    for arm in ARMS:
        assert text.count(f"| {arm.name} |") == sum(len(cells) for _, _, cells in QUICK.cells)
    rows = [line for line in text.splitlines() if line.startswith("| 2x2 | 1 |")]
    assert sum("(reference)" in line for line in rows) == 1
    assert all("[" in line for line in rows if f"| {REFERENCE_ARM} |" not in line)
    assert "| shared-a | shared-a |" in text and "0.5" in text
