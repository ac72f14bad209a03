"""What a train reply carries up: the trained LoRA tensors (dense), or the pruned delta (sparse).

Run config ``uplink``:

- ``"dense"`` (default): ``"arrays"`` holds the trained LoRA tensors, fp32, the received keys in
  the received order;
- ``"sparse"``: the client takes its delta exactly as the server would (fp32 trained minus fp32
  global), runs RobustMerge's steps 1-2 on it (``prune_adapter`` with run config
  ``keep-ratio``, ``scale-quantile`` and ``merge-mode``) and sends ``"arrays"`` in the wire form
  of ``strategies.sparse_codec`` (kept values, their positions, each module's s~) plus a
  ConfigRecord ``"config"`` = ``{"uplink": "sparse"}``. About 27 % of the dense bytes at keep
  ratio 0.2 (benchmarks/results/uplink_bytes.md); the server's merge is the dense one's.

Either way only LoRA tensors, or numbers derived from them alone, leave the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord

from strategies import wire
from strategies.merging.decomposed import prune_adapter
from strategies.merging.robustmerge import MODES, RobustMerge
from strategies.sparse_codec import encode_update
from workload.config import read_float, read_str


def read_uplink(run_config: Mapping[str, Any]) -> str:
    """Run config ``uplink``: "dense" or "sparse"."""
    uplink = read_str(run_config, wire.UPLINK, wire.DENSE)
    if uplink not in wire.UPLINKS:
        raise ValueError(f"run-config key 'uplink' must be one of {wire.UPLINKS}; got {uplink!r}")
    return uplink


def pruning_method(run_config: Mapping[str, Any]) -> RobustMerge:
    """The server's RobustMerge steps 1-2 as the run config sets them (merge-method robustmerge).

    ``merge-mode`` decides the scale floor: on in "paper-exact", off in "paper-equation".
    """
    method = read_str(run_config, "merge-method", "robustmerge")
    if method != "robustmerge":
        raise ValueError(
            f"run-config uplink 'sparse' needs merge-method 'robustmerge'; got {method!r}"
        )
    mode = read_str(run_config, "merge-mode", "paper-exact")
    if mode not in MODES:
        raise ValueError(f"run-config key 'merge-mode' must be one of {MODES}; got {mode!r}")
    return RobustMerge(
        keep_ratio=read_float(run_config, "keep-ratio", 0.2, low=0.0, high=1.0, low_open=True),
        scale_quantile=read_float(
            run_config, "scale-quantile", 0.2, low=0.0, high=1.0, high_open=True
        ),
        mode=mode,
    )


def sparse_update(
    trained: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    method: RobustMerge,
) -> dict[str, torch.Tensor]:
    """The wire arrays of the pruned delta trained - global (keys of ``global_state``) and s~."""
    delta = {
        key: trained[key].to(dtype=torch.float32) - value.to(dtype=torch.float32)
        for key, value in global_state.items()
    }
    pruned, scales = prune_adapter(delta, method)
    return {key: value.contiguous() for key, value in encode_update(pruned, scales).items()}


def reply_records(
    trained: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    run_config: Mapping[str, Any],
) -> dict[str, ArrayRecord | ConfigRecord]:
    """The reply's array record (and, for the sparse uplink, its marker), metrics aside."""
    if read_uplink(run_config) == wire.DENSE:
        return {wire.ARRAYS: ArrayRecord({key: trained[key] for key in global_state})}
    update = sparse_update(trained, global_state, pruning_method(run_config))
    return {
        wire.ARRAYS: ArrayRecord(update),
        wire.CONFIG: ConfigRecord({wire.UPLINK: wire.SPARSE}),
    }
