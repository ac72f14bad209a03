"""The scale benchmark (issue 15 part 4): its replies, its measurements, its files, its resume.

Runs on tiny shapes (a few hundred KB per adapter) so the module stays under 45 s: two list
rounds and two strategy-mode rounds (scale_modes: one buffered and spilling, one streamed) in
fresh subprocesses, everything else in-process.
Whether the stream's memory stays flat is the strategy's business and is not asserted here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import scale, scale_modes
from benchmarks.merge_speed import _status_kib
from benchmarks.scale import (
    FLOWER,
    LIST,
    ROUND1,
    STREAM,
    Config,
    ReplyFeed,
    Shape,
    build_global,
    build_reply,
    update_norm_of,
)

TINY = Shape(layers=1, hidden=64, rank=4)
QUICK = Shape(layers=2, hidden=256, rank=16)


def _tensors(message: Any) -> dict[str, torch.Tensor]:
    return dict(message.content.array_records["arrays"].to_torch_state_dict())


def test_full_shape_is_llama_7b_rank_16() -> None:
    """32 layers of q, k, v, o (4096 -> 4096) and gate, up (4096 -> 11008), down (11008 ->
    4096), rank 16, float32: the ~160 MB per reply the issue speaks of, under PEFT's keys."""
    shape = Shape()
    per_layer = 4 * 16 * (4096 + 4096) + 3 * 16 * (4096 + 11008)
    assert shape.adapter_bytes == 32 * per_layer * 4
    keys = [key for key, _ in shape.tensors()]
    assert len(keys) == 32 * 7 * 2
    assert "base_model.model.model.layers.31.mlp.down_proj.lora_B.weight" in keys
    assert dict(shape.tensors())["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] == (
        16,
        11008,
    )


def test_replies_are_deterministic_per_node_and_close_to_the_global() -> None:
    """A node's reply is the same every time, another node's differs, and its update norm is
    what N(0, NOISE_STD^2) noise on every entry gives (sqrt(n) x std, within 2%)."""
    global_adapter = build_global(TINY, seed=0)
    first, again, other = (build_reply(global_adapter, node, 0) for node in (1, 1, 2))
    assert first.metadata.src_node_id == 1
    for key, value in _tensors(first).items():
        assert torch.equal(value, _tensors(again)[key])
        assert not torch.equal(value, _tensors(other)[key])
    entries = sum(value.numel() for value in global_adapter.values())
    norm = update_norm_of(global_adapter, 1, 0)
    assert norm == pytest.approx(scale.NOISE_STD * math.sqrt(entries), rel=0.02)
    delta = sum(
        float((value - global_adapter[key]).double().square().sum())
        for key, value in _tensors(first).items()
    )
    assert norm == pytest.approx(math.sqrt(delta), rel=1e-9)


def test_feed_builds_each_reply_only_when_asked() -> None:
    """The stream builds lazily, counts what it handed over and notes its StopIteration."""
    built: list[int] = []

    def make(node: int) -> int:
        built.append(node)
        return node * 10

    feed = ReplyFeed(make, [1, 2, 3])
    stream = feed.stream()
    assert built == []
    assert next(stream) == 10
    assert (built, feed.handed, feed.exhausted_at) == ([1], 1, None)
    assert list(stream) == [20, 30]
    assert feed.handed == 3
    assert feed.exhausted_at is not None


@pytest.mark.parametrize(
    ("mode", "server_round", "history"), [(STREAM, 2, 4), (ROUND1, 1, 0), (FLOWER, 1, 0)]
)
def test_measure_in_process(mode: str, server_round: int, history: int) -> None:
    """One round of each kind runs and reports consistent fields: every reply handed over and
    accepted, the stream's tail inside the round, the build time left out of "strategy"."""
    result = scale.measure(Config(mode, 3, TINY, threads=1), cap=None)
    assert result["status"] == "ok"
    assert (result["server-round"], result["screen-history"]) == (server_round, history)
    assert (result["replies-handed"], result["accepted"], result["rejected"]) == (3, 3, 0)
    assert result["peak-rss-growth-mb"] >= 0
    assert result["peak-rss-growth-adapters"] == pytest.approx(
        result["peak-rss-growth-mb"] * scale.MB / TINY.adapter_bytes
    )
    assert 0 <= result["last-reply-to-return-seconds"] <= result["round-seconds"]
    if mode == FLOWER:
        assert result["strategy-seconds"] == result["round-seconds"]
        assert "norm-bound" not in result
    else:
        assert result["strategy-seconds"] == pytest.approx(
            result["round-seconds"] - result["reply-build-seconds"]
        )
        # Three replies are enough for a bound of their own, history or not.
        assert result["norm-bound"] > 0


def test_quick_list_rounds_end_to_end(tmp_path: Path) -> None:
    """``--quick`` list rounds in fresh subprocesses: json, markdown and plot written, and the
    list's peak grows with T by at least half an adapter per extra reply (it holds them all)."""
    argv = ["--quick", "--modes", LIST, "--clients", "2", "8", "--threads", "1"]
    assert scale.main([*argv, "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "scale-quick.json").read_text())
    assert data["shape"]["adapter-bytes"] == QUICK.adapter_bytes
    assert data["settings"]["allocator"] == scale.PROBE_ENV
    rows = data["results"]
    assert sorted(rows) == ["list T=2", "list T=8"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["rss-method"].startswith("VmHWM reset")
        for field in ("round-seconds", "strategy-seconds", "last-reply-to-return-seconds"):
            assert row[field] >= 0
    small, large = rows["list T=2"], rows["list T=8"]
    assert large["peak-rss-growth-adapters"] - small["peak-rss-growth-adapters"] >= 0.5 * 6
    markdown = (tmp_path / "scale-quick.md").read_text()
    assert "| 8 | list | 2 (history) |" in markdown
    assert (tmp_path / "scale-quick.png").read_bytes()[:4] == b"\x89PNG"


def test_watchdog_aborts_once_rss_grows_past_the_cap() -> None:
    """The watchdog reports "aborted" with how many replies were out once RSS exceeds the cap
    (here: a baseline 64 MiB below the current RSS, a 1 MiB cap); below the cap it stays quiet."""
    feed = ReplyFeed(lambda node: node, [1, 2, 3])
    next(feed.stream())
    current = _status_kib("VmRSS")
    assert current is not None
    config = Config(LIST, 3, TINY)
    quiet: list[Mapping[str, Any]] = []
    calm = scale.Watchdog(config, feed, current, cap=1 << 30, abort=quiet.append)
    calm.start()
    time.sleep(0.1)
    calm.stop()
    assert quiet == []
    fired: list[Mapping[str, Any]] = []
    watchdog = scale.Watchdog(config, feed, current - 64 * 1024, cap=1 << 20, abort=fired.append)
    watchdog.start()
    watchdog.thread.join(timeout=5)
    watchdog.stop()
    assert len(fired) == 1
    assert fired[0]["status"] == "aborted"
    assert fired[0]["replies-handed-at-abort"] == 1
    assert "grew past the cap" in fired[0]["reason"]


def _row(mode: str, clients: int, adapters: float, **extra: Any) -> dict[str, Any]:
    return {
        "mode": mode,
        "clients": clients,
        "status": "ok",
        "server-round": 2,
        "peak-rss-growth-mb": adapters * 10,
        "peak-rss-growth-adapters": adapters,
        "round-seconds": 2.0,
        "strategy-seconds": 1.5,
        "last-reply-to-return-seconds": 0.25,
        "accepted": clients,
        **extra,
    }


def test_markdown_reports_ratios_target_and_skips() -> None:
    """The table, the side-by-side ratios and the reading are computed from the rows."""
    rows = {
        "stream T=16": _row(STREAM, 16, 3.0),
        "list T=16": _row(LIST, 16, 18.0),
        "flower-fedavg T=16": _row(FLOWER, 16, 9.0),
        "stream T=1024": _row(STREAM, 1024, 6.5),
        "list T=1024": {"mode": LIST, "clients": 1024, "status": "skipped", "reason": "too big"},
    }
    data = {"shape": scale.shape_record(QUICK), "results": rows, "machine": scale.machine()}
    markdown = scale.render_markdown(data)
    assert "| 16 | 3.0 | 18.0 | 9.0 | 6.0x | 3.0x |" in markdown
    assert "| 1024 | 6.5 | skipped | - | - | - |" in markdown
    assert "met: peak growth at T = 1024 is +3.5 adapters from T = 16" in markdown
    assert "list at T = 1024: skipped (too big)" in markdown
    rows["stream T=1024"] = _row(STREAM, 1024, 7.5)
    assert "not met: peak growth at T = 1024 is +4.5" in scale.render_markdown(data)
    rows["stream T=1024"] = {"mode": STREAM, "clients": 1024, "status": "aborted", "reason": "x"}
    assert "not met: the stream at T = 1024 did not finish (x)" in scale.render_markdown(data)


def _fake_probe(calls: list[str]) -> Any:
    def probe(config: Config, cap: int, timeout: float) -> dict[str, Any]:
        calls.append(config.name)
        return _row(config.mode, config.clients, float(config.clients))

    return probe


def test_resume_skips_configs_already_in_the_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second run probes only what the json lacks; --fresh probes everything again; a json of
    another shape is refused rather than mixed."""
    calls: list[str] = []
    monkeypatch.setattr(scale, "run_probe", _fake_probe(calls))
    out = ["--output-dir", str(tmp_path), "--quick", "--modes", LIST]
    scale.main([*out, "--clients", "2"])
    assert calls == ["list T=2"]
    scale.main([*out, "--clients", "2", "8"])
    assert calls == ["list T=2", "list T=8"]
    rows = json.loads((tmp_path / "scale-quick.json").read_text())["results"]
    assert sorted(rows) == ["list T=2", "list T=8"]
    scale.main([*out, "--clients", "2", "8", "--fresh"])
    assert calls[2:] == ["list T=2", "list T=8"]
    with pytest.raises(SystemExit, match="another shape"):
        scale.main([*out, "--clients", "2", "--hidden", "512"])


def test_list_modes_over_the_cap_are_skipped_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list round predicted above the cap is recorded as skipped with the reason; a stream
    round is still run (measured, the watchdog guards it)."""
    calls: list[str] = []
    monkeypatch.setattr(scale, "run_probe", _fake_probe(calls))
    argv = ["--quick", "--clients", "64", "--cap-gib", "0.01", "--output-dir", str(tmp_path)]
    scale.main(argv)
    rows = json.loads((tmp_path / "scale-quick.json").read_text())["results"]
    assert calls == ["stream T=64", "stream-round1 T=64"]
    for name in ("list T=64", "flower-fedavg T=64"):
        assert rows[name]["status"] == "skipped"
        assert "exceeds the cap of 0.0 GiB" in rows[name]["reason"]


def test_simulation_rounds_from_metrics_and_client_logs() -> None:
    """Per-round overhead from metrics.json and the clients' log lines."""
    log = "\n".join(
        [
            "(ClientAppActor pid=1) INFO : client: round 1, sentiment, 8 examples, "
            "train-loss 1.3789, 0.5 s",
            "(ClientAppActor pid=2) INFO : client: round 1, hwu64, 8 examples, "
            "train-loss 2.1, 1.5 s",
            "INFO : round 1: merged 2 replies (0 rejected) in 0.019s",
        ]
    )
    assert scale.client_train_seconds(log) == {1: 2.0}
    metrics = {
        "rounds": [
            {"server-round": 0, "server-eval": {}},
            {
                "server-round": 1,
                "seconds": 5.0,
                "clients-sampled": 2,
                "train": {"clients-accepted": 2},
                "merge": {"merge-seconds": 0.2},
            },
        ]
    }
    (row,) = scale.simulation_rounds(metrics, scale.client_train_seconds(log), actors=2)
    assert row["seconds-per-client"] == pytest.approx(2.5)
    assert row["merge-seconds-per-client"] == pytest.approx(0.1)
    assert row["rest-per-client-seconds"] == pytest.approx((5.0 - 0.2 - 1.0) / 2)


def test_strategy_modes_round_with_spill_and_stream(tmp_path: Path) -> None:
    """``--modes svd fedavg``: a buffered round (svd, buffer-replies 2 of 5 replies: 3 spilled
    to the probe's temporary folder) and a streamed one (fedavg, round 2), in a fresh
    subprocess each; rows under "strategy-modes" with positive numbers, the table in the
    markdown, the existing rows untouched, and a second run resumes (probes nothing)."""
    argv = ["--quick", "--layers", "1", "--hidden", "64", "--clients", "5", "--threads", "1"]
    argv += ["--modes", "svd", "fedavg", "--rounds", "2", "--buffer", "2"]
    argv += ["--output-dir", str(tmp_path)]
    assert scale.main(argv) == 0
    data = json.loads((tmp_path / "scale-quick.json").read_text())
    assert data["results"] == {}
    assert data["settings"]["buffer-replies"] == 2
    rows = data[scale_modes.RESULTS_KEY]
    assert sorted(rows) == ["fedavg round 2 T=5", "svd round 2 T=5"]
    for row in rows.values():
        assert row["status"] == "ok", row
        assert (row["server-round"], row["screen-history"]) == (2, scale.HISTORY_REPLIES)
        assert (row["replies-handed"], row["accepted"], row["rejected"]) == (5, 5, 0)
        assert row["peak-rss-growth-mb"] >= 0
        for field in ("round-seconds", "strategy-seconds", "stacked-module-mb"):
            assert row[field] > 0
    buffered, streamed = rows["svd round 2 T=5"], rows["fedavg round 2 T=5"]
    assert (buffered["streamed"], buffered["spilled"]) == (False, 3)
    assert (streamed["streamed"], streamed["spilled"]) == (True, 0)
    assert streamed["fold-seconds"] > 0
    markdown = (tmp_path / "scale-quick.md").read_text()
    assert "## Every aggregation mode, round 1 and round 2" in markdown
    assert "| svd | 5 | 2 |" in markdown and "| buffered | 3 |" in markdown
    assert "| fedavg | 5 | 2 |" in markdown and "| streamed | 0 |" in markdown
    assert "Not measured yet" in markdown and "svd round 1 T=5" in markdown
    before = (tmp_path / "scale-quick.json").read_text()
    assert scale.main(argv) == 0
    again = json.loads((tmp_path / "scale-quick.json").read_text())
    assert again[scale_modes.RESULTS_KEY] == json.loads(before)[scale_modes.RESULTS_KEY]


def test_strategy_modes_cover_every_aggregation_path() -> None:
    """Every configuration builds a FedRobustMerge; the grid is mode x T x round."""
    for mode in scale_modes.MODES:
        scale_modes.strategy_kwargs(mode, 16, None)
    args = scale.parse_args(["--quick", "--modes", "all", "--clients", "4", "16"])
    planned = scale_modes.plan(args, QUICK)
    assert len(planned) == len(scale_modes.MODES) * 2 * 2
    assert planned[0].name == "default round 2 T=4"
    assert scale.plan(args, QUICK)[0].name == "stream T=4"
