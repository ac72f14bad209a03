"""The sparse uplink codec: exact round trips, the smaller position encoding, every refusal."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.sparse_codec import (
    BITMASK_SUFFIX,
    GAPS_SUFFIX,
    VALUES_SUFFIX,
    bitmask_num_bytes,
    check_wire_keys,
    decode_scale,
    decode_tensor,
    decode_update,
    encode_tensor,
    encode_update,
    encoded_num_bytes,
)
from strategies.merging import MergeInputError
from strategies.merging.decomposed import prune_adapter
from strategies.merging.robustmerge import RobustMerge

A = "base_model.model.layer.0.query.lora_A.weight"
B = "base_model.model.layer.0.query.lora_B.weight"
MODULE = "base_model.model.layer.0.query.weight"
SCALE = MODULE + "::scale"


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32)


def round_trip(tensor: torch.Tensor) -> torch.Tensor:
    encoded = encode_tensor(tensor)
    return decode_tensor(
        encoded.values, encoded.positions, encoded.encoding, tuple(tensor.shape), key="t"
    )


def assert_decodes_to(decoded: torch.Tensor, tensor: torch.Tensor) -> None:
    """Bit for bit the tensor, except that -0.0 comes back as +0.0."""
    assert decoded.dtype == torch.float32 and decoded.shape == tensor.shape
    want = torch.where(tensor == 0, torch.zeros_like(tensor), tensor)
    assert torch.equal(bits(decoded), bits(want))


shapes = st.lists(st.integers(1, 24), min_size=1, max_size=3).map(tuple)


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    keep_ratio=st.floats(0.01, 1.0),
    levels=st.sampled_from([3, 1000]),  # few levels: many ties and zeros
    seed=st.integers(0, 2**16),
)
def test_round_trip_of_pruned_tensors_is_exact(
    shape: tuple[int, ...], keep_ratio: float, levels: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.randint(-levels, levels + 1, shape, generator=generator).float() / 7
    method = RobustMerge(keep_ratio=keep_ratio)
    key = "m.lora_B.weight"
    pruned, _ = prune_adapter(
        {key: tensor.reshape(-1, 1), "m.lora_A.weight": torch.ones(1, 2)}, method
    )
    for candidate in (tensor, pruned[key].reshape(shape)):
        assert_decodes_to(round_trip(candidate), candidate)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 5000), count=st.integers(0, 60), seed=st.integers(0, 2**16))
def test_sparse_tensors_round_trip_through_either_encoding(
    size: int, count: int, seed: int
) -> None:
    generator = torch.Generator().manual_seed(seed)
    tensor = torch.zeros(size)
    where = torch.randperm(size, generator=generator)[: min(count, size)]
    tensor[where] = torch.randn(where.numel(), generator=generator)
    encoded = encode_tensor(tensor)
    gaps = np.diff(np.sort(where.numpy()), prepend=-1) - 1
    gap_bytes = where.numel() + int((gaps // 255).sum())
    assert encoded.positions.numel() == min(bitmask_num_bytes(size), gap_bytes)
    assert encoded.encoding == ("bitmask" if bitmask_num_bytes(size) <= gap_bytes else "gaps")
    assert_decodes_to(round_trip(tensor), tensor)


def test_negative_zero_and_kept_zeros_are_not_sent() -> None:
    tensor = torch.tensor([-0.0, 0.0, 1.5, -2.0, -0.0])
    encoded = encode_tensor(tensor)
    assert encoded.values.tolist() == [1.5, -2.0]
    assert_decodes_to(round_trip(tensor), tensor)


def test_bitmask_wins_at_keep_ratio_two_tenths_and_gaps_when_sparser() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(8, 384, generator=generator)
    pruned, _ = prune_adapter({A: a, B: torch.randn(384, 8, generator=generator)}, RobustMerge())
    encoded = encode_tensor(pruned[A])
    assert encoded.encoding == "bitmask"
    assert encoded.positions.numel() == 384  # 3072 / 8
    assert encoded.values.numel() == 3072 - math.floor(3072 * 0.8) + 1  # n - k + 1, no ties
    sparse, _ = prune_adapter({A: a, B: pruned[B]}, RobustMerge(keep_ratio=0.05))
    assert encode_tensor(sparse[A]).encoding == "gaps"


@pytest.mark.parametrize(
    ("gap", "expected"),
    [(0, [0]), (254, [254]), (255, [255, 0]), (256, [255, 1]), (510, [255, 255, 0])],
)
def test_gap_escapes(gap: int, expected: list[int]) -> None:
    tensor = torch.zeros(3000)
    tensor[gap] = 1.0
    encoded = encode_tensor(tensor)
    assert encoded.encoding == "gaps"
    assert encoded.positions.tolist() == expected
    assert_decodes_to(round_trip(tensor), tensor)


def test_update_round_trip_and_byte_count() -> None:
    generator = torch.Generator().manual_seed(1)
    delta = {
        A: torch.randn(4, 40, generator=generator),
        B: torch.randn(30, 4, generator=generator),
        "base_model.model.classifier.modules_to_save.weight": torch.randn(5, generator=generator),
    }
    pruned, scales = prune_adapter(delta, RobustMerge())
    wire = encode_update(pruned, scales)
    assert set(wire) == {
        A + VALUES_SUFFIX,
        A + BITMASK_SUFFIX,
        B + VALUES_SUFFIX,
        B + BITMASK_SUFFIX,
        "base_model.model.classifier.modules_to_save.weight" + VALUES_SUFFIX,
        "base_model.model.classifier.modules_to_save.weight" + BITMASK_SUFFIX,
        SCALE,
    }
    assert encoded_num_bytes(wire) == sum(v.numel() * v.element_size() for v in wire.values())
    tensors, got_scales = decode_update(wire, {k: tuple(v.shape) for k, v in delta.items()})
    for key in delta:
        assert_decodes_to(tensors[key], pruned[key])
    assert torch.equal(got_scales[MODULE], scales[MODULE])


# --- refusals -------------------------------------------------------------------------------

SHAPE = (4, 9)  # 36 entries: 5 bitmask bytes, the last with 4 padding bits


def good_parts(encoding: str = "bitmask") -> dict[str, Any]:
    """Values 1, -2, 3 at flat positions 0, 21, 35 of a 4 x 9 tensor, in either encoding."""
    positions = {
        "gaps": np.array([0, 20, 13], dtype=np.uint8),  # gaps 0, 20, 13
        # bit 0 of byte 0, bit 5 of byte 2, bit 3 of byte 4
        "bitmask": np.array([0x01, 0, 0x20, 0, 0x08], dtype=np.uint8),
    }[encoding]
    values = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    return {"values": values, "positions": positions, "encoding": encoding}


@pytest.mark.parametrize("encoding", ["bitmask", "gaps"])
def test_hand_built_parts_decode(encoding: str) -> None:
    parts = good_parts(encoding)
    decoded = decode_tensor(parts["values"], parts["positions"], encoding, SHAPE, key="t")
    assert decoded.reshape(-1).nonzero().flatten().tolist() == [0, 21, 35]
    assert decoded.reshape(-1)[[0, 21, 35]].tolist() == [1.0, -2.0, 3.0]


def _edit(**changes: Any) -> Callable[[str], dict[str, Any]]:
    def make(encoding: str) -> dict[str, Any]:
        return {**good_parts(encoding), **changes}

    return make


TENSOR_CASES: dict[str, tuple[str, Callable[[str], dict[str, Any]], str]] = {
    "values float64": ("bitmask", _edit(values=np.ones(3)), "must be float32, got float64"),
    "values float16 tensor": (
        "bitmask",
        _edit(values=torch.ones(3, dtype=torch.float16)),
        "must be float32, got float16",
    ),
    "values bf16 tensor": (
        "bitmask",
        _edit(values=torch.ones(3, dtype=torch.bfloat16)),
        "must be float32",
    ),
    "values 2-D": (
        "bitmask",
        _edit(values=np.ones((3, 1), dtype=np.float32)),
        "one-dimensional",
    ),
    "values NaN": (
        "bitmask",
        _edit(values=np.array([1, np.nan, 2], dtype=np.float32)),
        "non-finite",
    ),
    "values Inf": (
        "gaps",
        _edit(values=np.array([1, 2, -np.inf], dtype=np.float32)),
        "non-finite",
    ),
    "too few values (bitmask)": (
        "bitmask",
        _edit(values=np.ones(2, dtype=np.float32)),
        "marks 3 positions but 2 values",
    ),
    "too many values (gaps)": (
        "gaps",
        _edit(values=np.ones(4, dtype=np.float32)),
        "encode 3 positions but 4 values",
    ),
    "bitmask int32": (
        "bitmask",
        _edit(positions=np.zeros(5, dtype=np.int32)),
        "must be uint8, got int32",
    ),
    "bitmask too short": (
        "bitmask",
        _edit(positions=np.zeros(4, dtype=np.uint8)),
        "bitmask has 4 bytes",
    ),
    "bitmask padding bits (out of range)": (
        "bitmask",
        lambda e: {
            **good_parts(e),
            "positions": np.array([1, 0, 0x20, 0, 0x08 | 0x80], dtype=np.uint8),
        },
        "padding bits",
    ),
    "gaps position out of range": (
        "gaps",
        _edit(positions=np.array([0, 20, 14], dtype=np.uint8)),
        "position 36 is out of range",
    ),
    "gaps ending in an escape": (
        "gaps",
        _edit(positions=np.array([0, 20, 13, 255], dtype=np.uint8)),
        "escape byte",
    ),
    "gaps uint16": (
        "gaps",
        _edit(positions=np.array([0, 20, 13], dtype=np.uint16)),
        "must be uint8, got uint16",
    ),
    "unknown encoding": ("bitmask", _edit(encoding="indices"), "unknown position encoding"),
}


@pytest.mark.parametrize("case", sorted(TENSOR_CASES))
def test_bad_tensor_parts_are_refused_with_key_and_reason(case: str) -> None:
    encoding, make, reason = TENSOR_CASES[case]
    parts = make(encoding)
    with pytest.raises(MergeInputError, match="key 'w") as caught:
        decode_tensor(parts["values"], parts["positions"], parts["encoding"], SHAPE, key="w")
    assert reason in caught.value.reason


def test_unsorted_or_repeated_positions_cannot_be_expressed() -> None:
    """Gaps are non-negative offsets and a bitmask has one bit per entry: positions decode
    strictly increasing from any byte string."""
    for raw in ([5, 0, 0, 3], [0, 0, 0], [255, 1, 2]):
        positions = np.array(raw, dtype=np.uint8)
        values = np.ones(len([b for b in raw if b != 255]), dtype=np.float32)
        decoded = decode_tensor(values, positions, "gaps", (600,), key="t")
        assert int((decoded != 0).sum()) == values.size


def scale_cases() -> dict[str, tuple[Any, str]]:
    return {
        "wrong length": (np.ones(3, dtype=np.float32), "3 entries; the module's rank is 4"),
        "2-D": (np.ones((4, 1), dtype=np.float32), "one-dimensional"),
        "float64": (np.ones(4), "must be float32"),
        "below 1": (np.array([1, 1, 0.5, 2], dtype=np.float32), "below 1"),
        "NaN": (np.array([1, np.nan, 1, 1], dtype=np.float32), "non-finite"),
        "Inf": (np.array([1, np.inf, 1, 1], dtype=np.float32), "non-finite"),
    }


@pytest.mark.parametrize("case", sorted(scale_cases()))
def test_bad_scales_are_refused(case: str) -> None:
    value, reason = scale_cases()[case]
    with pytest.raises(MergeInputError, match="::scale") as caught:
        decode_scale(value, 4, module=MODULE)
    assert reason in caught.value.reason


WIRE_SHAPES = {A: (4, 10), B: (6, 4)}


def good_wire() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    delta = {key: torch.randn(shape, generator=generator) for key, shape in WIRE_SHAPES.items()}
    return encode_update(*prune_adapter(delta, RobustMerge()))


KEY_CASES: dict[str, tuple[Callable[[dict[str, torch.Tensor]], None], str, str]] = {
    "missing values": (lambda w: w.pop(A + VALUES_SUFFIX), A + VALUES_SUFFIX, "no kept values"),
    "no positions": (lambda w: w.pop(B + BITMASK_SUFFIX), B, "got 0"),
    "both encodings": (
        lambda w: w.update({A + GAPS_SUFFIX: torch.zeros(1, dtype=torch.uint8)}),
        A,
        "got 2",
    ),
    "missing scale": (lambda w: w.pop(SCALE), SCALE, "no scale vector"),
    "extra key": (
        lambda w: w.update({"base_model.model.layer.0.query.weight": torch.zeros(4)}),
        "base_model.model.layer.0.query.weight",
        "unexpected array",
    ),
}


@pytest.mark.parametrize("case", sorted(KEY_CASES))
def test_wrong_wire_keys_are_refused(case: str) -> None:
    corrupt, key, reason = KEY_CASES[case]
    wire = good_wire()
    check_wire_keys(wire, WIRE_SHAPES)
    corrupt(wire)
    with pytest.raises(MergeInputError) as caught:
        decode_update(wire, WIRE_SHAPES)
    assert caught.value.key == key
    assert reason in caught.value.reason
