"""The merge settings a train instruction carries, read back and validated by the client.

A client prunes its delta (sparse uplink, ``client.uplink``) or builds its terms (SecAgg+,
``client.secure_aggregation``) with the server's merge settings, never with its own run config's:
the server writes them with ``protocol.merge_settings.merge_settings`` (keys
``protocol.wire.SPARSE_SETTINGS``). They are read here, above ``workload.config``, because they
are checked against the run-config schema's bounds as any other setting.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from protocol import wire
from strategies.merging.robustmerge import MODES, RobustMerge
from workload.config import ConfigError, Reader


def instructed_method(config: Mapping[str, Any]) -> RobustMerge:
    """The RobustMerge an instruction's config carries (``merge_settings``), validated.

    The server always sends these with a sparse or SecAgg+ train instruction, so their absence
    means a server that does not speak this protocol: refuse rather than guess defaults that
    might differ from the server's merge.
    """
    missing = [key for key in wire.SPARSE_SETTINGS if key not in config]
    if missing:
        raise ConfigError(
            f"the train instruction's config lacks {missing}, the merge settings a client needs "
            "to prune or build its terms as the server merges; is the server older than this "
            "client?"
        )
    reader = Reader(config, "train config")
    return RobustMerge(
        keep_ratio=reader.number(wire.KEEP_RATIO),
        scale_quantile=reader.number(wire.SCALE_QUANTILE),
        fuse_weight=reader.number(wire.FUSE_WEIGHT),
        mode=reader.choice(wire.MERGE_MODE, MODES),
    )
