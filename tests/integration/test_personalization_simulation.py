"""Both personalisation modes in a real `flwr run` simulation (issue 27): "shared-a" sites send
only their LoRA A and keep their own B across rounds; "local-finetune" sites score a locally
fine-tuned copy. In both the server logs and records the sites' personalised scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.integration.simulation import run_simulation

SMALL = (
    "train-examples=16 eval-examples=16 max-length=32 "
    "seen-tasks='banking77,sentiment' unseen-tasks='mcid' server-eval=false "
    "fraction-evaluate=1.0 min-evaluate-nodes=2"
)


@pytest.mark.integration
def test_shared_a_sites_keep_their_b_and_send_only_a(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = f"{SMALL} num-server-rounds=2 personalization='shared-a' output-dir='{out}'"
    returncode, log = run_simulation(tmp_path, overrides)
    assert returncode == 0, log[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    rounds = [entry for entry in metrics["rounds"] if "train" in entry]  # round 0: no training
    assert [r["train"]["clients-accepted"] for r in rounds] == [2, 2], log[-4000:]
    # Only A goes up: half of what comes down (MiniLM's A and B have the same size).
    traffic = rounds[-1]["communication"]
    down, up = sum(traffic["train-down-bytes"].values()), sum(traffic["train-up-bytes"].values())
    assert 0.45 < up / down < 0.55, traffic
    final = load_file(str(out / "final" / "adapter_model.safetensors"))
    b_keys = [key for key in final if ".lora_B." in key]
    a_keys = [key for key in final if ".lora_A." in key]
    assert b_keys and a_keys
    # No site's B reached the server: the global B is still PEFT's initial zeros.
    assert all(not final[key].any() for key in b_keys)
    # The evaluation after round 2 scores each site's own B, which trained: the personalised
    # score is the global A with it, next to the global's (A with the zero B).
    evaluated = rounds[-1]["client-eval"]
    assert "personalized-accuracy" in evaluated and "eval-accuracy" in evaluated
    _assert_sites_bracket_the_mean(evaluated)
    assert "global -> " in log and "personalised" in log, log[-4000:]
    assert "shared-a, own B" in log, log[-4000:]


@pytest.mark.integration
def test_local_finetune_sites_report_their_personal_copy(tmp_path: Path) -> None:
    out = tmp_path / "run"
    overrides = (
        f"{SMALL} num-server-rounds=1 personalization='local-finetune' "
        f"personalization-steps=2 output-dir='{out}'"
    )
    returncode, log = run_simulation(tmp_path, overrides)
    assert returncode == 0, log[-4000:]
    evaluated = json.loads((out / "metrics.json").read_text())["rounds"][-1]["client-eval"]
    assert evaluated["personalized-steps"] == 2
    assert "personalized-accuracy" in evaluated
    _assert_sites_bracket_the_mean(evaluated)


def _assert_sites_bracket_the_mean(evaluated: dict[str, object]) -> None:
    """Both sites' own scores are in metrics.json, and their example-weighted mean (the
    round's personalised accuracy) lies between them."""
    sites = evaluated["sites"]
    assert isinstance(sites, dict) and len(sites) == 2, evaluated
    personal = [scores["personalized-accuracy"] for scores in sites.values()]
    assert all("eval-accuracy" in scores for scores in sites.values()), sites
    mean = evaluated["personalized-accuracy"]
    assert isinstance(mean, float)
    assert min(personal) - 1e-9 <= mean <= max(personal) + 1e-9, (mean, sites)
