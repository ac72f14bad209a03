"""Smoke run of the quality benchmark: every row is produced and every accuracy is a fraction."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.quality import ONE_SHOT_ROWS, QUICK, extend_saved_run, markdown, run_benchmark

TINY = replace(
    QUICK,
    seen=("stackoverflow", "sentiment"),
    unseen=("mcid",),
    train_examples=8,
    eval_examples=8,
    dev_examples=8,
    rounds=1,
    sweep_rounds=1,
    keep_ratios=(0.2,),
    oneshot_fuse_weights=(2.0,),
    fed_grid=((1.0, 1.0),),
    fedavg_lrs=(1.0, 2.0),
    tag="tiny",
)


pytestmark = pytest.mark.slow  # about 30 s alone, 100 s on a busy 2-core machine


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One tiny run (about 30 s on 2 cores), shared by the tests below."""
    root = tmp_path_factory.mktemp("quality")
    out = run_benchmark(TINY, root / "out", log=lambda _: None, cache_dir=root / "cache")
    out["out_dir"] = str(root / "out")
    return out


def test_every_row_present(results: dict[str, object]) -> None:
    table = results["table"]
    assert isinstance(table, dict)
    expected = {"zero-shot", "individual", "multi-task"}
    expected |= {f"one-shot {row}" for row, _, _ in ONE_SHOT_ROWS}
    expected |= {"ablation: prune only", "ablation: prune + scale"}
    expected |= {"ablation: + normalisation (= robustmerge)"}
    missing = expected - set(table)
    assert not missing, f"rows missing from the table: {sorted(missing)}"
    assert any(row.startswith("federated robustmerge") for row in table)
    assert any(row.startswith("federated fedavg") for row in table)
    assert any(row.startswith("federated fedavg (eta ") and "swept" in row for row in table)
    assert set(results["fedavg_sweep"]["dev_seen_avg"]) == {"1.0", "2.0"}  # type: ignore[index]


def test_numbers_are_fractions(results: dict[str, object]) -> None:
    table = results["table"]
    assert isinstance(table, dict)
    for row, columns in table.items():
        assert "seen-avg" in columns, row
        for column, (mean, std) in columns.items():
            assert 0.0 <= mean <= 1.0, (row, column, mean)
            assert std >= 0.0, (row, column, std)


def test_markdown_lists_rows(results: dict[str, object], tmp_path: Path) -> None:
    text = markdown(results, "pytest")
    table = results["table"]
    assert isinstance(table, dict)
    for row in table:
        assert f"| {row} |" in text
    assert "machine:" in text
    assert "wall time:" in text


def test_extend_adds_a_missing_stage_to_a_saved_run(results: dict[str, object]) -> None:
    out_dir = Path(str(results["out_dir"]))
    saved_path = out_dir / "quality-v1-tiny.json"
    saved = json.loads(saved_path.read_text())
    swept = [row for row in saved["per_seed"] if "swept" in row and "fedavg" in row]
    assert swept
    # a run made before the FedAvg stage existed
    del saved["fedavg_sweep"]
    for row in swept:
        del saved["per_seed"][row]
    saved["fed_curves"] = {k: v for k, v in saved["fed_curves"].items() if "swept" not in k}
    saved_path.write_text(json.dumps(saved))
    extended = extend_saved_run(TINY, out_dir, lambda _: None)
    assert set(extended["fedavg_sweep"]["dev_seen_avg"]) == {"1.0", "2.0"}
    assert any("swept" in row and "fedavg" in row for row in extended["table"])
    assert json.loads(saved_path.read_text())["fedavg_sweep"] == extended["fedavg_sweep"]
    with pytest.raises(SystemExit, match="seeds"):
        extend_saved_run(replace(TINY, seeds=(5,)), out_dir, lambda _: None)
