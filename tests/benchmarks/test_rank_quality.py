"""The mixed-rank quality benchmark's pure parts, on synthetic adapters and results (no training).

``sliced_adapter`` and ``zero_padded_round`` are checked against dense products computed here;
the report against a hand-made results dict; resuming against a saved JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import rank_quality
from benchmarks.quality import Workload
from benchmarks.rank_quality import (
    CONFIG,
    ROWS,
    adapter_bytes,
    comparisons,
    errors_by_rank,
    markdown,
    node_rank,
    row_refusal,
    sliced_adapter,
    zero_padded_round,
)
from tests.workload.tiny_model import save_tiny_bert
from workload.model import LoraSettings, build_lora_model
from workload.tasks import load_task
from workload.training import TrainSettings

PREFIX = "base_model.model.encoder.layer.0.attention.self"
MODULES = ("query", "value")


def adapter(rank: int, seed: int, *, d_out: int = 6, d_in: int = 5) -> dict[str, torch.Tensor]:
    """A random two-module adapter at ``rank`` in PEFT's key layout."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in MODULES:
        out[f"{PREFIX}.{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator)
        out[f"{PREFIX}.{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=generator)
    return out


def product(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return tensors[f"{PREFIX}.{name}.lora_B.weight"] @ tensors[f"{PREFIX}.{name}.lora_A.weight"]


def test_node_rank_follows_client_ranks_rule() -> None:
    # partition i = node - 1 gets entry i mod len
    assert [node_rank((4, 8, 16), node) for node in range(1, 8)] == [4, 8, 16, 4, 8, 16, 4]
    assert [node_rank((8,), node) for node in range(1, 4)] == [8, 8, 8]


def test_rows_the_app_allows_and_the_refused_zero_padding() -> None:
    assert [row_refusal(row) for row in ROWS] == [None] * len(ROWS)
    keys = {row.key for row in ROWS}
    assert {"mixed-svd", "r8-svd", "r16-svd", "mixed-zero-padding"} <= keys
    # The check is the app's: a factor-wise method at mixed ranks is refused with a reason.
    refused = rank_quality.RankRow("x", "fedavg mixed", (4, 8), "fedavg")
    reason = row_refusal(refused)
    assert reason is not None and "fedavg" in reason


def test_adapter_bytes_counts_fp32_tensors() -> None:
    assert adapter_bytes(adapter(4, 0)) == 4 * 2 * (4 * 5 + 6 * 4)
    assert adapter_bytes(adapter(8, 0)) == 2 * adapter_bytes(adapter(4, 0))


def test_sliced_adapter_keeps_leading_directions_and_measures_the_error() -> None:
    full = adapter(4, 1)
    sliced, error = sliced_adapter(full, 2)
    dropped = total = 0.0
    for name in MODULES:
        a = full[f"{PREFIX}.{name}.lora_A.weight"]
        b = full[f"{PREFIX}.{name}.lora_B.weight"]
        assert torch.equal(sliced[f"{PREFIX}.{name}.lora_A.weight"], a[:2])
        assert torch.equal(sliced[f"{PREFIX}.{name}.lora_B.weight"], b[:, :2])
        w, w_k = b @ a, b[:, :2] @ a[:2]
        dropped += float((w - w_k).double().square().sum())
        total += float(w.double().square().sum())
    assert error == pytest.approx((dropped / total) ** 0.5, rel=1e-5)
    assert 0.0 < error < 1.5
    assert list(sliced) == list(full)
    same, none = sliced_adapter(full, 4)
    assert none == pytest.approx(0.0, abs=1e-6)
    assert all(torch.equal(same[k], full[k]) for k in full)


def test_zero_padded_round_is_the_mean_of_padded_factor_deltas() -> None:
    base = adapter(4, 2)
    clients = [adapter(2, 3), adapter(4, 4)]
    # Clients were sent the base's leading directions; make their updates explicit deltas.
    for client in clients:
        for key, value in client.items():
            rank = value.shape[0] if ".lora_A." in key else value.shape[1]
            sent = base[key][:rank] if ".lora_A." in key else base[key][:, :rank]
            client[key] = sent + 0.1 * value
    weights = [1.0, 3.0]
    merged, gap = zero_padded_round(base, clients, weights, server_lr=2.0)
    for name in MODULES:
        for factor in ("A", "B"):
            key = f"{PREFIX}.{name}.lora_{factor}.weight"
            expected = base[key].clone()
            for weight, client in zip(weights, clients, strict=True):
                delta = torch.zeros_like(expected)
                rank = client[key].shape[0] if factor == "A" else client[key].shape[1]
                if factor == "A":
                    delta[:rank] = client[key] - base[key][:rank]
                else:
                    delta[:, :rank] = client[key] - base[key][:, :rank]
                expected += 2.0 * weight / 4.0 * delta
            torch.testing.assert_close(merged[key], expected)
    # The gap is from the exact mean of the true updates: recompute it densely.
    gap_sq = total = 0.0
    for name in MODULES:
        w_g = product(base, name)
        step = sum(
            weight / 4.0 * (product(c, name) - _sent_product(base, name, c))
            for weight, c in zip(weights, clients, strict=True)
        )
        exact = w_g + 2.0 * step
        gap_sq += float((product(merged, name) - exact).double().square().sum())
        total += float(exact.double().square().sum())
    assert gap == pytest.approx((gap_sq / total) ** 0.5, rel=1e-4)
    assert gap > 0.0  # factor-wise averaging is not the mean of the products


def _sent_product(base: dict[str, torch.Tensor], name: str, client: dict[str, torch.Tensor]) -> Any:
    rank = client[f"{PREFIX}.{name}.lora_A.weight"].shape[0]
    b = base[f"{PREFIX}.{name}.lora_B.weight"][:, :rank]
    a = base[f"{PREFIX}.{name}.lora_A.weight"][:rank]
    return b @ a


def test_zero_padded_round_at_equal_ranks_is_fedavg_of_the_factors() -> None:
    base = adapter(3, 5)
    clients = [adapter(3, 6), adapter(3, 7), adapter(3, 8)]
    merged, _ = zero_padded_round(base, clients, None, server_lr=1.0)
    for key in base:
        torch.testing.assert_close(merged[key], torch.stack([c[key] for c in clients]).mean(0))


def synthetic_results(rounds: int = 2) -> dict[str, Any]:
    """A saved run in the benchmark's JSON layout, numbers chosen by hand."""
    config = json.loads(json.dumps(asdict(CONFIG)))
    config["rounds"] = rounds

    def history(seen: float, unseen: float) -> list[dict[str, float]]:
        per_task = {task: seen for task in config["seen"]}
        per_task |= {task: unseen for task in config["unseen"]}
        return [dict(per_task, **{"seen-avg": seen, "unseen-avg": unseen})] * rounds

    def row(label: str, ranks: list[int], seen: float, unseen: float) -> dict[str, Any]:
        nodes = {str(n): ranks[(n - 1) % len(ranks)] for n in range(1, 8)}
        errors = [
            {node: (0.1 * r if rank < 16 else 0.0) for node, rank in nodes.items()}
            for r in range(rounds)
        ]
        return {
            "label": label,
            "ranks": ranks,
            "history": history(seen, unseen),
            "trace": {
                "site_ranks": nodes,
                "truncation_errors": errors,
                "merge_errors": [0.01 * (r + 1) for r in range(rounds)],
            },
            "seconds": 123.0,
        }

    return {
        "config": config,
        "machine": "2-vCPU x86_64 VM, no GPU",
        "adapter-bytes-per-rank": {"4": 100, "8": 200, "16": 400},
        "rows": {
            "mixed-svd": row("mixed svd", [4, 8, 16], 0.60, 0.70),
            "r8-svd": row("rank 8 svd", [8], 0.62, 0.69),
            "r16-svd": row("rank 16 svd", [16], 0.65, 0.71),
            "mixed-zero-padding": row("zero pad", [4, 8, 16], 0.55, 0.66),
        },
    }


def test_errors_by_rank_averages_each_rank_per_round() -> None:
    results = synthetic_results(rounds=3)
    by_rank = errors_by_rank(results["rows"]["mixed-svd"])
    assert list(by_rank) == [4, 8, 16]
    assert by_rank[4] == pytest.approx([0.0, 0.1, 0.2])
    assert by_rank[16] == [0.0, 0.0, 0.0]


def test_site_groups_average_the_tasks_of_each_mixed_rank() -> None:
    results = synthetic_results()
    row = results["rows"]["r16-svd"]
    final = dict(row["history"][-1])
    # seen tasks of nodes 1, 4, 7 train rank 4; 2, 5 rank 8; 3, 6 rank 16
    for index, task in enumerate(results["config"]["seen"]):
        final[task] = float(index)
    row["history"] = [final]
    assert rank_quality.by_site_group(results, row) == {
        4: pytest.approx((0 + 3 + 6) / 3),
        8: pytest.approx((1 + 4) / 2),
        16: pytest.approx((2 + 5) / 2),
    }
    assert "| rank 16 svd | 300.0 | 250.0 | 350.0 |" in markdown(results)


def test_comparisons_are_the_final_round_differences() -> None:
    lines = comparisons(synthetic_results())
    assert "mixed svd minus rank 16 svd, final round: seen -5.0 points, unseen -1.0 points." in (
        " ".join(lines)
    )
    assert any("minus zero pad" in line and "seen +5.0" in line for line in lines)
    assert not any("paper-equation" in line for line in lines)  # rows not run are not compared


def test_markdown_tables() -> None:
    text = markdown(synthetic_results(), "python -m benchmarks.rank_quality")
    assert "machine: 2-vCPU x86_64 VM, no GPU" in text
    assert "| mixed svd | 60.0 / 70.0 | 60.0 / 70.0 | 123 s |" in text
    assert "| rank 16 svd | 65.0 / 71.0 | 65.0 / 71.0 | 123 s |" in text
    # truncation errors only for the mixed rows, per rank
    assert "| mixed svd | 4 | 0.00 | 10.00 |" in text
    assert "| rank 8 svd | 8 |" not in text
    assert "| 4 | 100 | 0.25 |" in text
    assert "| zero pad | 1.00 | 2.00 |" in text  # the server's per-round error
    assert "One test example is 1.0 points" in text  # 96 test examples per task


def test_a_finished_run_resumes_without_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = synthetic_results(rounds=CONFIG.rounds)
    results["rows"] = {row.key: results["rows"]["r8-svd"] | {"label": row.label} for row in ROWS}
    (tmp_path / "ranks.json").write_text(json.dumps(results))

    def no_training(config: object) -> None:
        raise AssertionError("a saved row was run again")

    monkeypatch.setattr(rank_quality, "load_workload", no_training)
    out = rank_quality.run(CONFIG, tmp_path, log=lambda _: None)
    assert set(out["rows"]) == {row.key for row in ROWS}


def test_a_saved_run_of_other_sizes_is_refused(tmp_path: Path) -> None:
    results = synthetic_results(rounds=CONFIG.rounds + 1)
    (tmp_path / "ranks.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="other sizes"):
        rank_quality.run(CONFIG, tmp_path, log=lambda _: None)


@pytest.fixture
def tiny_work(tmp_path: Path) -> Iterator[Workload]:
    """A tiny BERT workload (3 clients, 1 round, 8 examples), on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = save_tiny_bert(tmp_path / "tiny-bert")
    lora = LoraSettings(model=str(folder), r=8, alpha=16, target_modules=("query", "value"))
    config = replace(
        CONFIG, seen=("mcid", "sentiment", "stackoverflow"), unseen=(), train_examples=8, rounds=1
    )
    train = TrainSettings(batch_size=8, max_length=16, learning_rate=1e-2)
    work = Workload(config, lora, train, build_lora_model(lora, seed=0))
    for name in config.seen:
        work.test[name] = load_task(name, "test", limit=8, seed=0)
    yield work
    torch.set_num_threads(threads)


@pytest.mark.parametrize("key", ["mixed-svd", "mixed-zero-padding"])
def test_a_mixed_row_trains_each_site_at_its_rank(tiny_work: Workload, key: str) -> None:
    """One real round on a tiny model: every site replies at its own rank (4, 8, 16), each
    site's start is recorded (round 1 starts from the initial global: no error), the server
    (strategy or zero-padding) merges them, and the global is scored at rank 16."""
    row = next(row for row in ROWS if row.key == key)
    history, trace = rank_quality.run_row(tiny_work, row, seed=0, log=lambda _: None)
    assert trace.site_ranks == {"1": 4, "2": 8, "3": 16}
    assert trace.reply_bytes["2"] == 2 * trace.reply_bytes["1"]
    assert trace.reply_bytes["3"] == 4 * trace.reply_bytes["1"]
    assert trace.truncation_errors == [{"1": 0.0, "2": 0.0, "3": 0.0}]
    assert len(trace.merge_errors) == 1 and trace.merge_errors[0] is not None
    assert len(history) == 1 and 0.0 <= history[0]["seen-avg"] <= 1.0
    # the global was built and evaluated at rank 16, the other ranks trained on their models
    assert set(tiny_work.other_ranks) == {4, 16}
