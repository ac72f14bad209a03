"""Checks on one client's training reply, each failure a specific, loggable reason.

Flower's own ``validate_message_reply_consistency`` raises on the first inconsistent reply and
ends the ServerApp; a federation of untrusted sites needs each reply judged on its own.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType

from protocol import wire
from protocol.sparse_codec import is_wire_key
from strategies.merging import is_lora_key
from strategies.robust import Rows

ACCEPTED_WIRE_DTYPES = frozenset({"float16", "float32", "float64"})
DEFAULT_MAX_NUM_EXAMPLES = 1_000_000_000


class ReplyRejectedError(ValueError):
    """A reply that must not be merged; ``privacy`` marks replies carrying non-LoRA tensors."""

    def __init__(self, reason: str, *, privacy: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.privacy = privacy


class TensorSource(Protocol):
    """Where an accepted reply's tensors are read from instead of its wire ArrayRecord (a spill
    file, ``strategies.reply_spill``), key by key."""

    @property
    def object_id(self) -> str:
        """The wire ArrayRecord's ``object_id`` (the buffered round's merge order)."""
        ...

    def keys(self) -> list[str]:
        """The wire ArrayRecord's keys, in its order."""
        ...

    def tensor(self, key: str) -> torch.Tensor:
        """The array under ``key`` as ``decode_float32`` gives it."""
        ...

    def tensor_rows(self, key: str, rows: Rows) -> torch.Tensor:
        """``tensor(key)[rows]``, reading only those rows where the source can."""
        ...


@dataclass(frozen=True)
class AcceptedReply:
    """A reply that passed every check: its node, its arrays, its example count.

    The arrays stay in their wire form; ``tensor(key)`` decodes one at a time, so merging T
    replies holds about one module stacked over T in memory, not a decoded copy of every reply.
    With a ``backing`` (a spilled reply) the tensors are read from there and ``arrays`` is empty.
    """

    node_id: int
    arrays: ArrayRecord
    num_examples: int
    num_bytes: int
    content: RecordDict
    # Under personalization "shared-a": the tensors the site kept (every LoRA B), filled in from
    # the global it started from, so the site's update there is zero; and the global's key order.
    filled: Mapping[str, torch.Tensor] = field(default_factory=dict, kw_only=True)
    filled_order: tuple[str, ...] = field(default=(), kw_only=True)
    backing: TensorSource | None = field(default=None, kw_only=True)

    def tensor(self, key: str) -> torch.Tensor:
        """The array under ``key`` as a float32 CPU tensor (checked when the reply was accepted),
        or the global's tensor where the site kept its own."""
        if key in self.filled:
            return self.filled[key]
        if self.backing is not None:
            return self.backing.tensor(key)
        return decode_float32(self.arrays, key)

    def tensor_rows(self, key: str, rows: Rows) -> torch.Tensor:
        """``tensor(key)[rows]`` (rows of the first dimension), decoding only those rows: a
        defence's stage reads every reply's key in pieces of rows (``strategies.robust``).
        Subclasses that override ``tensor`` override this too."""
        if key in self.filled:
            return self.filled[key][rows]
        if self.backing is not None:
            return self.backing.tensor_rows(key, rows)
        return decode_float32_rows(self.arrays, key, rows)

    def array_keys(self) -> list[str]:
        """The keys the reply sent, in its order."""
        return self.backing.keys() if self.backing is not None else list(self.arrays.keys())

    def keys(self) -> list[str]:
        """Every key the merge reads: the reply's, with the filled-in ones in the global's order."""
        return list(self.filled_order) if self.filled else self.array_keys()

    @property
    def object_id(self) -> str:
        """The wire ArrayRecord's content digest (``ArrayRecord.object_id``)."""
        return self.backing.object_id if self.backing is not None else self.arrays.object_id


def reply_payload(
    message: Message, arrayrecord_key: str, weighted_by_key: str, max_num_examples: int
) -> tuple[RecordDict, ArrayRecord, int]:
    """A train reply's content, its non-empty ArrayRecord and its checked num-examples (what
    dense and sparse replies share); ReplyRejectedError for an error reply or a missing part."""
    if message.has_error():
        raise ReplyRejectedError(f"client reported an error: {message.error.reason}")
    content = message.content
    arrays = content.array_records.get(arrayrecord_key)
    if arrays is None:
        raise ReplyRejectedError(f"no ArrayRecord under {arrayrecord_key!r}")
    if len(arrays) == 0:
        raise ReplyRejectedError(f"ArrayRecord {arrayrecord_key!r} is empty")
    num_examples = check_num_examples(content.metric_records, weighted_by_key, max_num_examples)
    return content, arrays, num_examples


def global_rank(global_shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The global adapter's LoRA rank (rows of its first lora_A), None without LoRA factors."""
    for key, shape in global_shapes.items():
        if ".lora_A." in key and is_lora_key(key) and shape:
            return int(shape[0])
    return None


def shapes_at_rank(
    global_shapes: Mapping[str, tuple[int, ...]], rank: int
) -> dict[str, tuple[int, ...]]:
    """The global's shapes at LoRA rank ``rank``: lora_A (rank, d_in), lora_B (d_out, rank),
    every other key unchanged."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, shape in global_shapes.items():
        if is_lora_key(key) and ".lora_A." in key and len(shape) == 2:
            shapes[key] = (rank, shape[1])
        elif is_lora_key(key) and ".lora_B." in key and len(shape) == 2:
            shapes[key] = (shape[0], rank)
        else:
            shapes[key] = tuple(shape)
    return shapes


def declared_rank(content: RecordDict, default: int) -> int:
    """The reply's ``lora-rank`` metric (an integer >= 1), or ``default`` when no MetricRecord
    carries it (a client from before mixed ranks trains the global's rank)."""
    records = [r for r in content.metric_records.values() if wire.LORA_RANK in r]
    if not records:
        return default
    if len(records) > 1:
        raise ReplyRejectedError(f"{len(records)} MetricRecords carry {wire.LORA_RANK!r}")
    value = records[0][wire.LORA_RANK]
    number = float(value) if not isinstance(value, (list, bool)) else math.nan
    if not math.isfinite(number) or number != int(number) or number < 1:
        raise ReplyRejectedError(f"{wire.LORA_RANK} must be an integer >= 1, got {value!r}")
    return int(number)


def check_train_reply(
    message: Message,
    global_shapes: Mapping[str, tuple[int, ...]],
    *,
    arrayrecord_key: str = wire.ARRAYS,
    weighted_by_key: str = wire.NUM_EXAMPLES,
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES,
    other_ranks_refused: str | None = "",
    site_kept: Mapping[str, torch.Tensor] | None = None,
) -> AcceptedReply:
    """The reply's tensors if it is a well-formed LoRA update; else ReplyRejectedError says why.

    The reply's ``lora-rank`` (default: the global's) sets the shapes its LoRA tensors must
    have (``shapes_at_rank``); it may not exceed the global's rank. A rank other than the
    global's is accepted only when ``other_ranks_refused`` is None; otherwise the reply is
    rejected with that reason (default "": this caller takes the global's rank only).

    ``site_kept`` (personalization "shared-a"): the global's tensors that every site keeps as its
    own (``wire.site_keeps``: each LoRA B); the reply must carry every other key and none of
    these, which the accepted reply reads from the global (a zero update).
    """
    content, arrays, num_examples = reply_payload(
        message, arrayrecord_key, weighted_by_key, max_num_examples
    )
    rank_of_global = global_rank(global_shapes)
    if rank_of_global is not None:
        rank = declared_rank(content, rank_of_global)
        if rank > rank_of_global:
            raise ReplyRejectedError(
                f"{wire.LORA_RANK} {rank} is above the global adapter's rank {rank_of_global}: "
                "the server keeps the global at the largest rank in use (run-config "
                "'client-ranks', or 'lora-r'); list this site's rank there or lower its "
                "node-config 'lora-r'"
            )
        if rank != rank_of_global and other_ranks_refused is not None:
            raise ReplyRejectedError(
                f"{wire.LORA_RANK} {rank} differs from the global adapter's rank "
                f"{rank_of_global}" + (f": {other_ranks_refused}" if other_ranks_refused else "")
            )
        global_shapes = shapes_at_rank(global_shapes, rank)
    keys = set(arrays.keys())
    kept = dict(site_kept or {})
    expected = set(global_shapes) - set(kept)
    sent = sorted(keys & set(kept))
    if sent:
        raise ReplyRejectedError(
            f"carries {sent[0]!r}, which a site keeps as its own under run config "
            "personalization = 'shared-a' (it sends the LoRA A factors only): the site must run "
            "with the server's run config"
        )
    sparse = sorted(key for key in keys - expected if is_wire_key(key))
    if sparse:
        raise ReplyRejectedError(
            f"a sparse-uplink reply (e.g. {sparse[0]!r}) but this run's uplink is dense: clients "
            "must read the same run config 'uplink' as the server"
        )
    non_lora = sorted(key for key in keys - expected if not is_lora_key(key))
    if non_lora:
        raise ReplyRejectedError(
            f"carries {len(non_lora)} non-LoRA tensor(s), e.g. {non_lora[0]!r}: clients must send "
            "LoRA tensors only (possible base-weight leak)",
            privacy=True,
        )
    extra = sorted(keys - expected)
    if extra:
        raise ReplyRejectedError(f"unexpected LoRA key {extra[0]!r} (not in the global adapter)")
    missing = sorted(expected - keys)
    if missing:
        raise ReplyRejectedError(f"missing key {missing[0]!r} ({len(missing)} missing in all)")
    for key in sorted(expected):
        values = _decode(arrays, key)
        if values.dtype.name not in ACCEPTED_WIRE_DTYPES:
            raise ReplyRejectedError(
                f"key {key!r}: dtype {values.dtype.name} (expected float16, float32 or float64)"
            )
        if tuple(values.shape) != tuple(global_shapes[key]):
            at_rank = (
                f" at the declared {wire.LORA_RANK} {rank}" if rank_of_global is not None else ""
            )
            raise ReplyRejectedError(
                f"key {key!r}: shape {tuple(values.shape)} (expected "
                f"{tuple(global_shapes[key])}{at_rank})"
            )
        if not bool(np.isfinite(values).all()):
            raise ReplyRejectedError(f"key {key!r}: non-finite values (NaN or Inf)")
    return AcceptedReply(
        node_id=message.metadata.src_node_id,
        arrays=arrays,
        num_examples=num_examples,
        num_bytes=arrays.count_bytes(),
        content=content,
        filled=kept,
        filled_order=tuple(global_shapes) if kept else (),
    )


def reply_rank(reply: AcceptedReply) -> int | None:
    """An accepted reply's LoRA rank (rows of its first lora_A; checked against its declared
    ``lora-rank`` on acceptance), None without LoRA factors or for a sparse-uplink reply
    (whose wire keys are at the global's rank)."""
    for key in reply.array_keys():
        if ".lora_A." in key and is_lora_key(key) and not is_wire_key(key):
            return int(reply.tensor(key).shape[0])
    return None


def decode_float32(arrays: ArrayRecord, key: str) -> torch.Tensor:
    """One array of a record as a float32 CPU tensor."""
    return torch.from_numpy(np.asarray(arrays[key].numpy(), dtype=np.float32).copy())


def decode_float32_rows(arrays: ArrayRecord, key: str, rows: Rows) -> torch.Tensor:
    """Rows ``rows`` of one array of a record as a float32 CPU tensor, equal to
    ``decode_float32(arrays, key)[rows]``. A C-ordered array in NumPy's format 1.0 / 2.0 (what
    Flower writes) is read in place from the wire bytes, so only those rows are copied; anything
    else is decoded whole first."""
    array = arrays[key]
    if rows is ... or array.stype != SType.NUMPY:
        return decode_float32(arrays, key)[rows]
    data = array.data
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            return decode_float32(arrays, key)[rows]
    except ValueError:
        return decode_float32(arrays, key)[rows]
    if fortran or dtype.hasobject or not shape:
        return decode_float32(arrays, key)[rows]
    count = math.prod(shape)
    values = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell()).reshape(shape)
    return torch.from_numpy(np.array(values[rows], dtype=np.float32))


def _decode(arrays: ArrayRecord, key: str) -> np.ndarray:
    """The array's values as sent (the declared dtype and shape are not trusted)."""
    try:
        return np.asarray(arrays[key].numpy())
    except (TypeError, ValueError, OSError) as error:
        raise ReplyRejectedError(f"key {key!r}: undecodable array ({error})") from None


def check_num_examples(
    metric_records: Mapping[str, MetricRecord], weighted_by_key: str, upper: int
) -> int:
    """The reply's example count: one MetricRecord must carry it, as an integer in [1, upper]."""
    records = [record for record in metric_records.values() if weighted_by_key in record]
    if len(records) != 1:
        raise ReplyRejectedError(
            f"expected one MetricRecord with {weighted_by_key!r}, found {len(records)}"
        )
    value = records[0][weighted_by_key]
    if isinstance(value, (list, bool)):
        raise ReplyRejectedError(f"{weighted_by_key} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise ReplyRejectedError(f"{weighted_by_key} must be an integer, got {value!r}")
    if not 0 < number <= upper:
        raise ReplyRejectedError(f"{weighted_by_key} must be in [1, {upper}], got {value!r}")
    return int(number)


def state_dict_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of contiguous fp32 CPU copies (ArrayRecord refuses bf16)."""
    return ArrayRecord(
        {
            key: value.detach().to(device="cpu", dtype=torch.float32).contiguous()
            for key, value in tensors.items()
        }
    )
