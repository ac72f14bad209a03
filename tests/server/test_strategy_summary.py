"""The strategy's start-up summary says how the merge weights clients: Flower's FedAvg line
"Weighted by: 'num-examples'" alone read as if weight-by-examples were on."""

from __future__ import annotations

import logging

import pytest

from protocol import wire
from server.app import build_merge_strategy
from server.config import ServerSettings


def _summary(caplog: pytest.LogCaptureFixture, run_config: dict[str, object]) -> str:
    strategy = build_merge_strategy(ServerSettings.from_run_config(run_config))
    flower = logging.getLogger("flwr")
    flower.addHandler(caplog.handler)
    try:
        strategy.summary()
    finally:
        flower.removeHandler(caplog.handler)
    assert strategy.weighted_by_key == wire.NUM_EXAMPLES  # replies are still read by it
    # the handler may see each record twice (its own and the root's, where flwr propagates)
    lines = {
        record.getMessage() for record in caplog.records if "Weighted by" in record.getMessage()
    }
    assert len(lines) == 1, caplog.text
    return lines.pop()


def test_equal_weights_are_not_reported_as_weighted_by_examples(
    caplog: pytest.LogCaptureFixture,
) -> None:
    line = _summary(caplog, {"weight-by-examples": False})
    assert "Weighted by: 'equal in the merge (weight-by-examples = false)" in line, line


@pytest.mark.parametrize(
    "run_config", [{"weight-by-examples": True}, {"merge-method": "fedavg"}], ids=["on", "fedavg"]
)
def test_example_weighting_is_reported_as_flower_does(
    caplog: pytest.LogCaptureFixture, run_config: dict[str, object]
) -> None:
    assert _summary(caplog, run_config).endswith("Weighted by: 'num-examples'")
