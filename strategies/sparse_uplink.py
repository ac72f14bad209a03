"""Server side of the sparse uplink (run config ``uplink = "sparse"``): check, decode, merge.

Each client sends its delta already pruned (spec step 1) and its scale vectors s~ (step 2) in the
wire form of ``protocol.sparse_codec``; the server finishes steps 3-4 with
``strategies.merging.decomposed.merge_pruned``. The result is the dense path's (RobustMerge of the
deltas): same masks, same sums, because

- the client's delta is computed as the server computes it (fp32 trained minus fp32 global), and
  ``prune_adapter`` prunes it as RobustMerge prunes that client's slice of the stack;
- the server prunes every decoded LoRA tensor again. For an honest client this changes nothing
  (the k-th smallest |x| of a pruned tensor is its threshold tau, so every sent entry survives);
  a client that sends more than its share of entries loses the excess.

The s~ a client sends cannot be recomputed (it needs the unpruned A); it is checked for shape,
finiteness, s~ >= 1 and, when the merge floors the scales, for the floor's signature (at least
min(floor(r (1 - a)), r - 1) + 1 entries equal to the smallest).

Replies stay in wire form until the merge asks for a module, as for dense replies.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from protocol import wire
from protocol.sparse_codec import (
    ENCODING_SUFFIXES,
    VALUES_SUFFIX,
    Encoding,
    check_wire_keys,
    decode_scale,
    decode_tensor,
    is_wire_key,
)
from strategies.merging import MergeInputError, MergeReport, MergeResult
from strategies.merging.decomposed import merge_pruned, scale_key
from strategies.merging.lora_keys import is_lora_key, parse_layout
from strategies.merging.pruning import prune_by_magnitude, scale_floor_position
from strategies.merging.robustmerge import RobustMerge
from strategies.reply_checks import AcceptedReply, ReplyRejectedError, reply_payload
from strategies.robust import Rows


@dataclass(frozen=True)
class SparseReply(AcceptedReply):
    """An accepted sparse reply: its wire arrays plus what decoding them needs.

    ``delta(key)`` is the client's pruned delta (pruned again on the server); ``tensor(key)``
    the client's adapter as far as the server knows it, global + pruned delta (for the update
    norm bound and the direction diagnostics).
    """

    base: Mapping[str, torch.Tensor]
    encodings: Mapping[str, Encoding]
    scales: Mapping[str, torch.Tensor]
    keep_ratio: float

    def delta(self, key: str) -> torch.Tensor:
        """The decoded delta of ``key``, LoRA factors pruned again (a no-op for honest clients)."""
        decoded = _decode_tensor(self.arrays, key, self.encodings[key], self.base[key].shape)
        if not is_lora_key(key):
            return decoded
        return prune_by_magnitude(decoded.unsqueeze(0), self.keep_ratio)[0]

    def tensor(self, key: str) -> torch.Tensor:
        """Global + pruned delta, float32."""
        return self.base[key] + self.delta(key)

    def tensor_rows(self, key: str, rows: Rows) -> torch.Tensor:
        """``tensor(key)[rows]``."""
        return self.tensor(key)[rows]


class SparseDeltaView(Mapping[str, torch.Tensor]):
    """A sparse reply's pruned deltas, decoded key by key when the merge asks (global key order)."""

    def __init__(self, reply: SparseReply) -> None:
        self.reply = reply

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.reply.base:
            raise KeyError(key)
        return self.reply.delta(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reply.base)

    def __len__(self) -> int:
        return len(self.reply.base)


def check_sparse_train_reply(
    message: Message,
    base: Mapping[str, torch.Tensor],
    method: RobustMerge,
    *,
    arrayrecord_key: str = wire.ARRAYS,
    configrecord_key: str = wire.CONFIG,
    weighted_by_key: str = wire.NUM_EXAMPLES,
    max_num_examples: int = 1_000_000_000,
) -> SparseReply:
    """The reply if it is a well-formed sparse update of ``base``; else ReplyRejectedError."""
    content, arrays, num_examples = reply_payload(
        message, arrayrecord_key, weighted_by_key, max_num_examples
    )
    shapes = {key: tuple(value.shape) for key, value in base.items()}
    _check_privacy(arrays.keys(), shapes)
    config = content.config_records.get(configrecord_key, ConfigRecord())
    if config.get(wire.UPLINK) != wire.SPARSE:
        raise ReplyRejectedError(
            f"this run's uplink is sparse but the reply is not marked "
            f"{wire.UPLINK!r} = 'sparse' in its ConfigRecord {configrecord_key!r} (got "
            f"{config.get(wire.UPLINK)!r}); the server's train instruction asked for it"
        )
    try:
        encodings = check_wire_keys(arrays.keys(), shapes)
        scales = _checked_scales(arrays, base, method)
        for key, shape in shapes.items():
            _decode_tensor(arrays, key, encodings[key], shape)  # validates; decoded again lazily
    except MergeInputError as error:
        raise ReplyRejectedError(str(error)) from None
    return SparseReply(
        node_id=message.metadata.src_node_id,
        arrays=arrays,
        num_examples=num_examples,
        num_bytes=arrays.count_bytes(),
        content=content,
        base=base,
        encodings=encodings,
        scales=scales,
        keep_ratio=method.keep_ratio,
    )


def _check_privacy(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """A key that is neither a wire key of a global tensor nor a module's scale: base weights?"""
    scales = {scale_key(module.name) for module in parse_layout(shapes).modules}
    leaks = sorted(
        key
        for key in keys
        if key not in scales
        and (stem := key.rsplit("::", 1)[0] if is_wire_key(key) else key) not in shapes
        and not is_lora_key(stem)
    )
    if leaks:
        raise ReplyRejectedError(
            f"carries {len(leaks)} non-LoRA array(s), e.g. {leaks[0]!r}: clients must send "
            "LoRA tensors only (possible base-weight leak)",
            privacy=True,
        )


def _checked_scales(
    arrays: ArrayRecord, base: Mapping[str, torch.Tensor], method: RobustMerge
) -> dict[str, torch.Tensor]:
    scales: dict[str, torch.Tensor] = {}
    for module in parse_layout(base).modules:
        rank = base[module.a_key].shape[0]
        scale = decode_scale(_wire(arrays, scale_key(module.name)), rank, module=module.name)
        if method.scale_floor:
            position = scale_floor_position(rank, method.scale_quantile)
            at_floor = int((scale == scale.min()).sum())
            if at_floor < position + 1:
                raise MergeInputError(
                    f"scale vector is not floored: {at_floor} entries equal its minimum, the "
                    f"floor at position {position} makes at least {position + 1} (client and "
                    "server must agree on merge-mode and scale-quantile)",
                    key=scale_key(module.name),
                )
        scales[module.name] = scale
    return scales


def _wire(arrays: ArrayRecord, key: str) -> np.ndarray[Any, Any]:
    """One wire array as sent (its dtype and shape are checked by the codec, not trusted)."""
    try:
        return np.asarray(arrays[key].numpy())
    except (TypeError, ValueError, OSError) as error:
        raise MergeInputError(f"undecodable array ({error})", key=key) from None


def _decode_tensor(
    arrays: ArrayRecord, key: str, encoding: Encoding, shape: Sequence[int]
) -> torch.Tensor:
    return decode_tensor(
        _wire(arrays, key + VALUES_SUFFIX),
        _wire(arrays, key + ENCODING_SUFFIXES[encoding]),
        encoding,
        tuple(shape),
        key=key,
    )


def merge_sparse_replies(
    replies: Sequence[SparseReply],
    method: RobustMerge,
    weights: Sequence[float] | None,
    device: str = "cpu",
) -> MergeResult:
    """Steps 3-4 over the replies' pruned deltas and scales (on ``device``), with a report.

    ``weights`` as ``merge_lora``'s, normalised the same way (float64 sum, then float32).
    The report has no rank-truncation error: ``merge_pruned`` does not return it.
    """
    count = len(replies)
    raw = (
        torch.ones(count, dtype=torch.float64)
        if weights is None
        else torch.tensor(list(weights), dtype=torch.float64)
    )
    normalised = (raw / raw.sum()).to(torch.float32)
    report = MergeReport(method=method.describe(), num_adapters=count, device=device)
    started = time.perf_counter()
    tensors = merge_pruned(
        [SparseDeltaView(reply) for reply in replies],
        [reply.scales for reply in replies],
        method,
        normalised,
        device,
    )
    report.seconds = time.perf_counter() - started
    return MergeResult(tensors=tensors, report=report)
