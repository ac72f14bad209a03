"""Real `flwr run` simulations of the privacy and communication modes (2 short rounds each).

Each mode must finish, account its traffic in metrics.json, and show its mechanism at work in
the run's log (Flower's client-side clipping, the server's noise) or in the bytes (sparse).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.simulation import run_simulation

SMALL = (
    "num-server-rounds=2 train-examples=32 eval-examples=32 max-length=32 "
    "seen-tasks='banking77,sentiment' unseen-tasks='mcid'"
)
MODES = {
    "dp-client-clipping": (
        "dp='client-clipping' dp-clipping-norm=0.05 dp-noise-multiplier=0.1",
        "fixedclipping_mod: parameters are clipped",
    ),
    "dp-server-clipping": (
        "dp='server-clipping' dp-clipping-norm=0.05 dp-noise-multiplier=0.1",
        "central DP noise",
    ),
    "sparse": ("uplink='sparse'", None),
}


@pytest.mark.integration
@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_runs_end_to_end_and_accounts_its_traffic(tmp_path: Path, mode: str) -> None:
    extra, marker = MODES[mode]
    out = tmp_path / "run"
    returncode, log = run_simulation(tmp_path, f"{SMALL} {extra} output-dir='{out}'")
    assert returncode == 0, log[-4000:]
    assert "Final adapter" in log, log[-4000:]
    if marker is not None:
        assert marker in log, log[-4000:]
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [entry["server-round"] for entry in rounds] == [0, 1, 2]
    previous = 0
    for entry in rounds[1:]:
        assert entry["train"]["clients-accepted"] == 2, entry
        traffic = entry["communication"]
        assert traffic["uplink"] == ("sparse" if mode == "sparse" else "dense")
        down = list(traffic["train-down-bytes"].values())
        up = list(traffic["train-up-bytes"].values())
        assert len(down) == len(up) == 2
        if mode == "sparse":
            assert max(up) < 0.35 * min(down), traffic
        else:
            assert up == down, traffic  # dense replies carry the adapter's own tensors
        assert traffic["cumulative-bytes"] == previous + traffic["round-bytes"]
        previous = traffic["cumulative-bytes"]
    if mode.startswith("dp-"):
        epsilons = [entry["train"]["dp-epsilon"] for entry in rounds[1:]]
        assert 0 < epsilons[0] < epsilons[1], epsilons  # cumulative over released adapters
