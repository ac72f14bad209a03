"""The merge settings a sparse or SecAgg+ train instruction carries (``wire.SPARSE_SETTINGS``).

The server writes them (``merge_settings``) so that a client prunes (sparse uplink) or builds
its terms (SecAgg+) exactly as the server merges; ``client.instruction.instructed_method`` reads
them back and refuses an instruction that lacks any.
"""

from __future__ import annotations

from protocol import wire
from strategies.merging.robustmerge import RobustMerge


def merge_settings(method: RobustMerge) -> dict[str, float | str]:
    """The train-instruction config entries a client needs to prune (sparse uplink) or build its
    terms (SecAgg+) exactly as the server merges: ``wire.SPARSE_SETTINGS``.

    A federated run has one shared fuse weight (run config ``fuse-weight``); per-adapter weights
    belong to offline merges and have no meaning for clients that join and leave.
    """
    if not isinstance(method.fuse_weight, float):
        raise ValueError(f"a federated round needs one fuse weight, got {method.fuse_weight!r}")
    return {
        wire.KEEP_RATIO: method.keep_ratio,
        wire.SCALE_QUANTILE: method.scale_quantile,
        wire.MERGE_MODE: method.mode,
        wire.FUSE_WEIGHT: method.fuse_weight,
    }
