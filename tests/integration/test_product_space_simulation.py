"""Product-space methods in real rounds: each one trains the global (seen accuracy rises).

Before rounds merged true updates, svd and paper-equation multiplied the clients' factor deltas
(dB_t dA_t), which leaves the global where it was when clients move only B (PEFT's zero B makes
that typical early on). Here each product-space method runs 3 rounds of a real `flwr run`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.simulation import run_simulation

METHODS = {
    "svd": "merge-method='svd'",
    "exact-mean": "merge-method='exact-mean'",
    "paper-equation": "merge-method='robustmerge' merge-mode='paper-equation' fuse-weight=1.0",
}


@pytest.mark.integration
@pytest.mark.parametrize("method", sorted(METHODS))
def test_product_space_method_raises_seen_accuracy_over_three_rounds(
    tmp_path: Path, method: str
) -> None:
    out = tmp_path / "run"
    overrides = (
        f"{METHODS[method]} num-server-rounds=3 train-examples=96 eval-examples=96 "
        "max-length=32 learning-rate=0.002 seen-tasks='banking77,sentiment' unseen-tasks='' "
        f"output-dir='{out}'"
    )
    returncode, log = run_simulation(tmp_path, overrides)
    assert returncode == 0, log[-4000:]
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [entry["server-round"] for entry in rounds] == [0, 1, 2, 3]
    seen = [entry["server-eval"]["seen-accuracy"] for entry in rounds]
    assert seen[-1] > seen[0], seen
    for entry in rounds[1:]:
        train = entry["train"]
        assert train["clients-accepted"] == 2
        assert train["merged-update-norm"] > 0
        assert 0.0 <= train["rank-truncation-error"] < 1.0
        assert train["update-truncation-error"] >= 0.0
        assert train["factorwise-gap"] >= 0.0
