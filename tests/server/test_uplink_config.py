"""Run config ``uplink`` reaches the strategy; sparse with another merge is refused at start."""

from __future__ import annotations

import pytest

from server.app import build_merge_strategy
from server.config import ConfigError, ServerSettings


def test_uplink_reaches_the_strategy() -> None:
    settings = ServerSettings.from_run_config({"uplink": "sparse", "merge-device": "cpu"})
    strategy = build_merge_strategy(settings)
    assert strategy.settings.uplink == "sparse"
    assert strategy.settings.sparse_method is not None
    assert strategy.settings.sparse_method.keep_ratio == settings.keep_ratio
    assert build_merge_strategy(ServerSettings.from_run_config({})).settings.sparse_method is None


def test_sparse_uplink_with_another_merge_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs merge-method 'robustmerge'"):
        ServerSettings.from_run_config(
            {"uplink": "sparse", "merge-method": "ties", "merge-device": "cpu"}
        )
