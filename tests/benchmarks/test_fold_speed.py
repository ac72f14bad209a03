"""The fold-speed benchmark runs end to end on a tiny shape and reports what it measured."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import fold_speed


def test_a_tiny_run_times_every_fold_beside_the_running_sum(tmp_path: Path) -> None:
    out = tmp_path / "fold"
    argv = ["--layers", "1", "--hidden", "64", "--replies", "2", "--repeats", "1", "--out"]
    assert fold_speed.main([*argv, str(out), "--note", "a note"]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["results"]) == set(fold_speed.METHODS)
    for row in data["results"].values():
        assert row["fold"] > 0 and row["plain"] > 0
        assert row["ratio"] == row["fold"] / row["plain"]
    assert {"steps 1-2", "exact sums"} <= set(data["results"]["robustmerge"])
    report = out.with_suffix(".md").read_text()
    assert "| robustmerge |" in report and "Where RobustMerge's fold spends" in report
    assert report.rstrip().endswith("a note")
