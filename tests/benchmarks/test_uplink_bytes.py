"""The uplink byte measurement runs and meets its target (random delta: no training)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.uplink_bytes import main


def test_sparse_uplink_is_under_thirty_percent_of_dense(tmp_path: Path) -> None:
    output = tmp_path / "uplink_bytes.md"
    assert main(["--random-delta", "--output", str(output)]) == 0
    text = output.read_text()
    assert "| dense fp32 | 24 | 294,912 | 100.0% |" in text
    assert "| dense fp16 | 24 | 147,456 | 50.0% |" in text
    assert "Target: sparse <= 30% of dense fp32 (ArrayRecord bytes): met" in text
