"""A real `flwr run` simulation of the causal-LM kind: a tiny LLaMA built offline, 2 clients
with their own JSONL (run-config ``data-path`` with ``{partition-id}``), 2 rounds.

Checks that a site's `flwr run . -c 'task="causal-lm" model=...'` works end to end: the run
finishes, the server-side perplexity on a held-out file goes down on a task the clients can
learn, and the merged adapter loads with PeftModel.from_pretrained on the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.integration.simulation import run_simulation
from tests.workload.tiny_llama import save_tiny_llama, write_echo_jsonl


@pytest.mark.integration
def test_causal_lm_simulation_learns_and_writes_loadable_adapter(tmp_path: Path) -> None:
    model_dir = save_tiny_llama(tmp_path / "tiny-llama")
    data = tmp_path / "data"
    data.mkdir()
    for site in (0, 1):
        write_echo_jsonl(data / f"site-{site}.jsonl", 60, seed=site)
    server_eval = write_echo_jsonl(data / "server-eval.jsonl", 20, seed=99)
    out = tmp_path / "run"
    overrides = (
        f'task="causal-lm" model="{model_dir}" target-modules="auto" lora-r=4 lora-alpha=8 '
        f"num-server-rounds=2 local-epochs=3 learning-rate=0.03 batch-size=8 max-length=64 "
        f"data-path='{data}/site-{{partition-id}}.jsonl' server-eval-data='{server_eval}' "
        f"output-dir='{out}'"
    )
    returncode, log = run_simulation(tmp_path, overrides, timeout=300)
    assert returncode == 0, log[-4000:]
    assert "Final adapter" in log, log[-4000:]

    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [entry["server-round"] for entry in rounds] == [0, 1, 2]
    for entry in rounds[1:]:
        assert entry["train"]["clients-accepted"] == 2, entry
    losses = [entry["server-eval"]["eval-loss"] for entry in rounds]
    print("server eval-loss per round:", losses)
    assert losses[2] < losses[0] - 0.5, losses

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from strategies.adapter_io.reading import read_adapter_dir
    from workload.model import get_lora_state

    config = json.loads((out / "final" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = PeftModel.from_pretrained(base, out / "final")
    saved = read_adapter_dir(out / "final").tensors
    state = get_lora_state(loaded)
    assert set(state) == set(saved)
    for key, value in saved.items():
        assert torch.equal(state[key], value), key
