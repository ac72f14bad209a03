"""The sparse uplink's wire codec: one client's pruned LoRA delta and scale vectors as small arrays.

A client that prunes its own delta (spec steps 1-2, ``strategies.merging.decomposed``) sends, per
tensor of n entries with m nonzero entries after pruning:

- ``<key>::values``: float32 (m,), the nonzero entries in row-major order;
- their positions, whichever of two encodings is smaller (the bitmask on a tie):
  ``<key>::bitmask``: uint8 (ceil(n / 8),), bit i (``np.packbits`` little bit order: bit i is
  ``(byte[i // 8] >> (i % 8)) & 1``) set when entry i is sent, padding bits zero; or
  ``<key>::gaps``: uint8, the gaps g_j = p_j - p_{j-1} - 1 (p_{-1} = -1) between the sent
  positions, each written as floor(g / 255) escape bytes 255 followed by one byte g mod 255.
  Position j is then (the sum of all bytes up to and including gap j's last byte) + j, so
  decoding is one cumulative sum. The gaps cost m + sum_j floor(g_j / 255) bytes: about m when
  the sent entries are spread out, so they win below about one entry in eight and the bitmask
  wins above (keep ratio 0.2: 0.125 n bytes of bitmask against 0.2 n of gaps);
- ``<module>::scale``: float32 (r,), the module's s~ (``decomposed.scale_key``).

Entries pruned to zero, and kept entries that are exactly zero, are not sent: a zero adds
nothing to the merge's sums. A pruned negative entry is -0.0 in the dense path and decodes as
+0.0; the two compare equal (``torch.equal``) and give the same merged values.

Neither encoding can express an unsorted or repeated position; everything else a client can get
wrong (a missing or extra key, a dtype or length, a count that disagrees with the values, a
position past the end, padding bits, non-finite values, a scale that is misshapen, non-finite or
below 1) raises ``MergeInputError`` naming the key and the reason. No Flower import: the client
and the server share this module, and the tests use it alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from strategies.merging.decomposed import SCALE_SUFFIX, scale_key
from strategies.merging.errors import MergeInputError
from strategies.merging.lora_keys import parse_layout

VALUES_SUFFIX = "::values"
BITMASK_SUFFIX = "::bitmask"
GAPS_SUFFIX = "::gaps"
ESCAPE = 255

Encoding = Literal["bitmask", "gaps"]
ENCODING_SUFFIXES: dict[Encoding, str] = {"bitmask": BITMASK_SUFFIX, "gaps": GAPS_SUFFIX}
# torch dtypes that have a NumPy counterpart (bf16 has none: it is refused, never converted)
_TORCH_TO_NUMPY = frozenset(
    {
        torch.float16,
        torch.float32,
        torch.float64,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.bool,
    }
)


@dataclass(frozen=True)
class EncodedTensor:
    """One pruned tensor on the wire: its nonzero values and their positions.

    ``values``: float32 (m,); ``positions``: uint8, a bitmask or escaped gaps (``encoding``).
    """

    values: torch.Tensor
    positions: torch.Tensor
    encoding: Encoding

    @property
    def num_bytes(self) -> int:
        """Payload bytes: 4 m for the values plus the position bytes."""
        return self.values.numel() * 4 + self.positions.numel()


def bitmask_num_bytes(num_entries: int) -> int:
    """Bytes of the bitmask of a tensor with ``num_entries`` entries: ceil(n / 8)."""
    return (num_entries + 7) // 8


def gaps_num_bytes(positions: npt.NDArray[np.int64]) -> int:
    """Bytes of the escaped gaps of sorted, distinct ``positions``: m + sum floor(g / 255)."""
    gaps = np.diff(positions, prepend=-1) - 1
    return int(positions.size + (gaps // ESCAPE).sum())


def encode_tensor(tensor: torch.Tensor) -> EncodedTensor:
    """The nonzero entries of ``tensor`` (any shape, cast to float32) and the smaller encoding
    of their positions."""
    flat = tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    sent = (flat != 0).numpy()
    positions = np.flatnonzero(sent)
    values = flat[torch.from_numpy(positions)].clone()
    if bitmask_num_bytes(flat.numel()) <= gaps_num_bytes(positions):
        packed = np.packbits(sent, bitorder="little")
        return EncodedTensor(values, torch.from_numpy(packed), "bitmask")
    return EncodedTensor(values, torch.from_numpy(_encode_gaps(positions)), "gaps")


def _encode_gaps(positions: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    gaps = np.diff(positions, prepend=-1) - 1
    escapes = gaps // ESCAPE
    encoded = np.full(int(positions.size + escapes.sum()), ESCAPE, dtype=np.uint8)
    encoded[np.cumsum(escapes + 1) - 1] = (gaps % ESCAPE).astype(np.uint8)
    return encoded


def decode_tensor(
    values: Any,
    positions: Any,
    encoding: str,
    shape: tuple[int, ...],
    *,
    key: str = "",
) -> torch.Tensor:
    """The dense float32 tensor of ``shape``: ``values`` at the encoded positions, zeros elsewhere.

    ``values`` and ``positions`` are NumPy arrays or torch tensors as received; each is checked
    (dtype, dimensions, lengths, range, finiteness) and a MergeInputError names ``key`` and what
    is wrong.
    """
    num_entries = math.prod(shape)
    sent = _array(values, np.float32, key + VALUES_SUFFIX, "the kept values")
    if encoding == "bitmask":
        where = _bitmask_positions(positions, num_entries, sent.size, key)
    elif encoding == "gaps":
        where = _gap_positions(positions, num_entries, sent.size, key)
    else:
        raise MergeInputError(f"unknown position encoding {encoding!r}", key=key)
    if not bool(np.isfinite(sent).all()):
        bad = int((~np.isfinite(sent)).sum())
        raise MergeInputError(
            f"{bad} non-finite value(s) (NaN or Inf) of {sent.size}", key=key + VALUES_SUFFIX
        )
    dense = np.zeros(num_entries, dtype=np.float32)
    dense[where] = sent
    return torch.from_numpy(dense).reshape(shape)


def _array(value: Any, dtype: type[np.generic], key: str, what: str) -> npt.NDArray[Any]:
    """A 1-D array of exactly ``dtype`` (no conversion: a wrong dtype is the sender's error)."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _TORCH_TO_NUMPY:
            raise MergeInputError(
                f"{what} must be {np.dtype(dtype).name}, got {value.dtype}", key=key
            )
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype != np.dtype(dtype):
        raise MergeInputError(
            f"{what} must be {np.dtype(dtype).name}, got {array.dtype.name}", key=key
        )
    if array.ndim != 1:
        raise MergeInputError(
            f"{what} must be one-dimensional, got shape {tuple(array.shape)}", key=key
        )
    return array


def _bitmask_positions(
    positions: Any, num_entries: int, count: int, key: str
) -> npt.NDArray[np.int64]:
    wire_key = key + BITMASK_SUFFIX
    mask = _array(positions, np.uint8, wire_key, "the bitmask")
    expected = bitmask_num_bytes(num_entries)
    if mask.size != expected:
        raise MergeInputError(
            f"bitmask has {mask.size} bytes; a tensor of {num_entries} entries needs {expected}",
            key=wire_key,
        )
    bits = np.unpackbits(mask, bitorder="little")
    if bits[num_entries:].any():
        raise MergeInputError(
            f"bitmask sets padding bits past entry {num_entries} (position out of range)",
            key=wire_key,
        )
    where = np.flatnonzero(bits[:num_entries])
    if where.size != count:
        raise MergeInputError(
            f"bitmask marks {where.size} positions but {count} values were sent", key=wire_key
        )
    return where


def _gap_positions(positions: Any, num_entries: int, count: int, key: str) -> npt.NDArray[np.int64]:
    wire_key = key + GAPS_SUFFIX
    encoded = _array(positions, np.uint8, wire_key, "the gaps").astype(np.int64)
    if encoded.size and encoded[-1] == ESCAPE:
        raise MergeInputError(
            "gaps end with an escape byte 255 (a gap without its final byte)", key=wire_key
        )
    ends = np.flatnonzero(encoded != ESCAPE)
    if ends.size != count:
        raise MergeInputError(
            f"gaps encode {ends.size} positions but {count} values were sent", key=wire_key
        )
    where = np.cumsum(encoded)[ends] + np.arange(count, dtype=np.int64)
    if where.size and where[-1] >= num_entries:
        raise MergeInputError(
            f"position {int(where[-1])} is out of range for a tensor of {num_entries} entries",
            key=wire_key,
        )
    return where


def encode_update(
    pruned: Mapping[str, torch.Tensor], scales: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The flat wire arrays of one client's pruned tensors and s~ (keyed by module name).

    Ready for ``flwr.app.ArrayRecord``: contiguous CPU tensors, float32 values and scales,
    uint8 positions.
    """
    wire: dict[str, torch.Tensor] = {}
    for key, tensor in pruned.items():
        encoded = encode_tensor(tensor)
        wire[key + VALUES_SUFFIX] = encoded.values
        wire[key + ENCODING_SUFFIXES[encoded.encoding]] = encoded.positions
    for module, scale in scales.items():
        wire[scale_key(module)] = (
            scale.detach().to(device="cpu", dtype=torch.float32).reshape(-1).contiguous()
        )
    return wire


def check_wire_keys(
    keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Encoding]:
    """Each tensor key's encoding, after checking the wire keys are exactly what ``shapes`` needs:
    per tensor ``::values`` and one of ``::bitmask`` / ``::gaps``, per LoRA module ``::scale``.
    """
    present = set(keys)
    expected_scales = {scale_key(m.name) for m in parse_layout(shapes).modules}
    encodings: dict[str, Encoding] = {}
    for key in shapes:
        if key + VALUES_SUFFIX not in present:
            raise MergeInputError("no kept values were sent", key=key + VALUES_SUFFIX)
        found = [e for e, suffix in ENCODING_SUFFIXES.items() if key + suffix in present]
        if len(found) != 1:
            raise MergeInputError(
                f"expected exactly one of {BITMASK_SUFFIX!r} and {GAPS_SUFFIX!r} for the "
                f"positions, got {len(found)}",
                key=key,
            )
        encodings[key] = found[0]
    missing = sorted(expected_scales - present)
    if missing:
        raise MergeInputError("no scale vector was sent for this module", key=missing[0])
    known = expected_scales | {key + VALUES_SUFFIX for key in shapes}
    known |= {key + ENCODING_SUFFIXES[e] for key, e in encodings.items()}
    extra = sorted(present - known)
    if extra:
        raise MergeInputError(
            f"unexpected array ({len(extra)} in all); a sparse reply holds only "
            "'<key>::values', '<key>::bitmask' or '<key>::gaps', and '<module>::scale'",
            key=extra[0],
        )
    return encodings


def decode_scale(value: Any, rank: int, *, module: str) -> torch.Tensor:
    """A module's s~ as float32 (rank,): finite and >= 1 (s = total / kept mass is never below)."""
    key = scale_key(module)
    array = _array(value, np.float32, key, "the scale vector")
    if array.size != rank:
        raise MergeInputError(
            f"scale vector has {array.size} entries; the module's rank is {rank}", key=key
        )
    if not bool(np.isfinite(array).all()):
        raise MergeInputError("scale vector has non-finite entries (NaN or Inf)", key=key)
    if bool((array < 1).any()):
        raise MergeInputError(
            f"scale vector has entries below 1 (min {float(array.min())!r}); s~ >= 1 always",
            key=key,
        )
    return torch.from_numpy(array.copy())


def decode_update(
    wire: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The dense pruned tensors (keys and shapes of ``shapes``) and the s~ per module name."""
    encodings = check_wire_keys(wire.keys(), shapes)
    tensors = {
        key: decode_tensor(
            wire[key + VALUES_SUFFIX],
            wire[key + ENCODING_SUFFIXES[encodings[key]]],
            encodings[key],
            tuple(shape),
            key=key,
        )
        for key, shape in shapes.items()
    }
    scales = {
        m.name: decode_scale(wire[scale_key(m.name)], shapes[m.a_key][0], module=m.name)
        for m in parse_layout(shapes).modules
    }
    return tensors, scales


def encoded_num_bytes(wire: Mapping[str, torch.Tensor]) -> int:
    """Payload bytes of the wire arrays (no keys or array headers)."""
    return sum(value.numel() * value.element_size() for value in wire.values())


def is_wire_key(key: str) -> bool:
    """True for a key of the sparse wire form (it carries one of the ``::`` suffixes)."""
    return key.endswith((VALUES_SUFFIX, BITMASK_SUFFIX, GAPS_SUFFIX, SCALE_SUFFIX))
