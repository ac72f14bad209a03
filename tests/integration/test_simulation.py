"""One real `flwr run` simulation through the README's wrapper: 2 clients, 2 short rounds.

Checks what a newcomer gets: a finished run, per-round checkpoints, metrics.json, the plot, and a
final adapter that PeftModel.from_pretrained loads on the embedded MiniLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.simulation import audit_verify, run_simulation


@pytest.mark.integration
def test_two_client_simulation_writes_loadable_adapter_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = (
        f"num-server-rounds=2 train-examples=32 eval-examples=32 max-length=32 "
        f"seen-tasks='banking77,sentiment' unseen-tasks='mcid' output-dir='{out}'"
    )
    returncode, log = run_simulation(tmp_path, overrides)
    assert returncode == 0, log[-4000:]
    assert "Final adapter" in log, log[-4000:]

    metrics = json.loads((out / "metrics.json").read_text())
    rounds = metrics["rounds"]
    assert [entry["server-round"] for entry in rounds] == [0, 1, 2]
    for entry in rounds[1:]:
        assert entry["train"]["clients-accepted"] == 2
        assert entry["train"]["clients-rejected"] == 0
        assert 0.0 <= entry["server-eval"]["seen-accuracy"] <= 1.0
        assert "mcid-accuracy" in entry["server-eval"]
    assert (out / "accuracy.png").stat().st_size > 0
    # the default "auto" defence, resolved: centered clipping on the dense uplink at one rank
    defence = "centered-clip (chosen by 'auto': every client's dense update at one rank reaches"
    assert metrics["run"]["robust-defence"].startswith(defence)
    assert f"The defence that ran: {defence}" in (out / "final" / "README.md").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001", "round-0002"]
    verified = audit_verify(out)
    assert verified.returncode == 0, verified.stderr
    assert "4 records, 2 rounds" in verified.stdout and "4 accepted, 0 rejected" in verified.stdout

    from peft import PeftModel
    from transformers import AutoModel

    from strategies.adapter_io.reading import read_adapter_dir
    from workload.model import LoraSettings, get_lora_state, resolve_model_path

    base = AutoModel.from_pretrained(resolve_model_path(LoraSettings().model))
    loaded = PeftModel.from_pretrained(base, out / "final")
    saved = read_adapter_dir(out / "final").tensors
    state = get_lora_state(loaded)
    assert set(state) == set(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
    assert any(not torch.all(value == 0) for key, value in saved.items() if "lora_B" in key)
