"""What a train reply carries up: the trained LoRA tensors (dense), or the pruned delta (sparse).

The server decides, in the train instruction's ConfigRecord (``protocol.wire``): ``uplink``

- ``"dense"`` (or absent): ``"arrays"`` holds the trained LoRA tensors, fp32, the received keys
  in the received order;
- ``"sparse"``: the client takes its delta exactly as the server would (fp32 trained minus fp32
  global), runs RobustMerge's steps 1-2 on it (``prune_adapter`` with the instruction's
  ``keep-ratio``, ``scale-quantile`` and ``merge-mode``, which the server always sends with a
  sparse instruction; one that lacks them is refused) and sends ``"arrays"`` in the wire form
  of ``protocol.sparse_codec`` (kept values, their positions, each module's s~) plus a
  ConfigRecord ``"config"`` = ``{"uplink": "sparse"}``. About 27 % of the dense bytes at the
  default keep ratio (benchmarks/results/uplink_bytes.md); the server's merge is the dense one's.

The client's own run config plays no part: the settings it prunes with are the server's.
Either way only LoRA tensors, or numbers derived from them alone, leave the client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord

from client.instruction import instructed_method
from protocol import wire
from protocol.sparse_codec import encode_update
from strategies.merging.decomposed import prune_adapter
from strategies.merging.robustmerge import RobustMerge
from workload.config import Reader


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
    instruction: Mapping[str, Any],
) -> dict[str, ArrayRecord | ConfigRecord]:
    """The reply's array record (and, for the sparse uplink, its marker), metrics aside, as the
    train instruction's config ``instruction`` asks."""
    uplink = Reader(instruction, "train config").choice(wire.UPLINK, default=wire.DENSE)
    if uplink == wire.DENSE:
        return {wire.ARRAYS: ArrayRecord({key: trained[key] for key in global_state})}
    update = sparse_update(trained, global_state, instructed_method(instruction))
    return {
        wire.ARRAYS: ArrayRecord(update),
        wire.CONFIG: ConfigRecord({wire.UPLINK: wire.SPARSE}),
    }
