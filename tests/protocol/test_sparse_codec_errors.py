"""The sparse codec's refusals, each reason and key whole, and its byte counts by hand (issue 29:
the mutation run of ``protocol.sparse_codec`` found the codec's error texts, the scale's lower
bound of exactly 1 and the gap byte count held by no test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protocol.sparse_codec import (
    BITMASK_SUFFIX,
    GAPS_SUFFIX,
    VALUES_SUFFIX,
    _encode_gaps,
    check_wire_keys,
    decode_scale,
    decode_tensor,
    decode_update,
    encode_tensor,
    encode_update,
    gaps_num_bytes,
    is_wire_key,
)
from strategies.merging import MergeInputError
from strategies.merging.decomposed import scale_key

A = "base_model.model.layer.0.query.lora_A.weight"
B = "base_model.model.layer.0.query.lora_B.weight"
MODULE = "base_model.model.layer.0.query.weight"
SHAPES = {A: (2, 3), B: (3, 2)}


def refused(call: object, *args: object, **kwargs: object) -> MergeInputError:
    with pytest.raises(MergeInputError) as caught:
        call(*args, **kwargs)  # type: ignore[operator]
    return caught.value


@pytest.mark.parametrize(
    ("positions", "encoding", "what", "suffix"),
    [
        (np.zeros(1, dtype=np.int32), "bitmask", "the bitmask", BITMASK_SUFFIX),
        (np.zeros(1, dtype=np.int32), "gaps", "the gaps", GAPS_SUFFIX),
    ],
)
def test_wrong_position_dtypes_name_the_part(
    positions: np.ndarray, encoding: str, what: str, suffix: str
) -> None:
    error = refused(decode_tensor, np.ones(1, np.float32), positions, encoding, (6,), key="k")
    assert (error.reason, error.key) == (f"{what} must be uint8, got int32", "k" + suffix)


def test_wrong_value_and_scale_dtypes_name_the_part() -> None:
    error = refused(
        decode_tensor, np.ones(1, np.float64), np.ones(1, np.uint8), "bitmask", (6,), key="k"
    )
    assert (error.reason, error.key) == (
        "the kept values must be float32, got float64",
        "k" + VALUES_SUFFIX,
    )
    error = refused(decode_scale, np.ones(2, np.float64), 2, module=MODULE)
    assert (error.reason, error.key) == (
        "the scale vector must be float32, got float64",
        scale_key(MODULE),
    )


def test_a_decode_without_a_key_names_the_bare_suffix() -> None:
    error = refused(decode_tensor, np.ones(1, np.float64), np.ones(1, np.uint8), "bitmask", (6,))
    assert error.key == VALUES_SUFFIX


def test_non_finite_values_are_counted() -> None:
    values = np.array([1.0, np.nan, np.inf], dtype=np.float32)
    positions = np.array([0b0000_0111], dtype=np.uint8)
    error = refused(decode_tensor, values, positions, "bitmask", (6,), key="k")
    assert (error.reason, error.key) == (
        "2 non-finite value(s) (NaN or Inf) of 3",
        "k" + VALUES_SUFFIX,
    )


def test_gaps_ending_in_an_escape_byte_are_named() -> None:
    error = refused(
        decode_tensor, np.ones(1, np.float32), np.array([255], np.uint8), "gaps", (600,), key="k"
    )
    assert (error.reason, error.key) == (
        "gaps end with an escape byte 255 (a gap without its final byte)",
        "k" + GAPS_SUFFIX,
    )


def test_a_scale_of_exactly_one_is_accepted_and_non_finite_ones_are_named() -> None:
    ones = decode_scale(np.ones(2, np.float32), 2, module=MODULE)
    assert ones.tolist() == [1.0, 1.0]
    assert decode_scale(np.array([1.5, 1.0], np.float32), 2, module=MODULE).tolist() == [1.5, 1.0]
    for bad in (np.nan, np.inf):
        error = refused(decode_scale, np.array([1.0, bad], np.float32), 2, module=MODULE)
        assert (error.reason, error.key) == (
            "scale vector has non-finite entries (NaN or Inf)",
            scale_key(MODULE),
        )


def wire() -> dict[str, torch.Tensor]:
    pruned = {A: torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]), B: torch.eye(3, 2)}
    return encode_update(pruned, {MODULE: torch.tensor([1.5, 1.0])})


def test_missing_and_unexpected_wire_arrays_are_named() -> None:
    sent = wire()
    del sent[A + VALUES_SUFFIX]
    error = refused(check_wire_keys, sent.keys(), SHAPES)
    assert (error.reason, error.key) == ("no kept values were sent", A + VALUES_SUFFIX)
    sent = wire()
    del sent[scale_key(MODULE)]
    error = refused(check_wire_keys, sent.keys(), SHAPES)
    assert (error.reason, error.key) == (
        "no scale vector was sent for this module",
        scale_key(MODULE),
    )
    sent = {**wire(), "stray": torch.zeros(1)}
    error = refused(check_wire_keys, sent.keys(), SHAPES)
    assert (error.reason, error.key) == (
        "unexpected array (1 in all); a sparse reply holds only '<key>::values', "
        "'<key>::bitmask' or '<key>::gaps', and '<module>::scale'",
        "stray",
    )


def test_decode_update_names_the_tensor_at_fault() -> None:
    sent = wire()
    sent[B + VALUES_SUFFIX] = sent[B + VALUES_SUFFIX].double()
    error = refused(decode_update, sent, SHAPES)
    assert error.key == B + VALUES_SUFFIX
    tensors, scales = decode_update(wire(), SHAPES)
    assert tensors[A].tolist() == [[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]
    assert scales[MODULE].tolist() == [1.5, 1.0]


def test_the_encoders_send_float32_from_any_float_input() -> None:
    encoded = encode_tensor(torch.tensor([0.0, 1.5, 0.0, -2.0], dtype=torch.float64))
    assert encoded.values.dtype == torch.float32 and encoded.values.tolist() == [1.5, -2.0]
    sent = encode_update(
        {A: torch.zeros(2, 3, dtype=torch.float16)}, {MODULE: torch.ones(2, dtype=torch.float64)}
    )
    assert sent[A + VALUES_SUFFIX].dtype == torch.float32
    assert sent[scale_key(MODULE)].dtype == torch.float32


@pytest.mark.parametrize(
    ("positions", "expected"),
    [
        ([0], 1),  # gap 0
        ([254], 1),  # gap 254: one byte
        ([255], 2),  # gap 255: an escape byte and a 0
        ([0, 300, 301, 1000], 7),  # gaps 0, 299, 0, 698: 4 bytes + 1 + 2 escapes
        ([200, 401], 2),  # gaps 200, 200: no escape (the fractions 200/255 do not add up to one)
        ([], 0),
    ],
)
def test_gap_bytes_by_hand(positions: list[int], expected: int) -> None:
    array = np.array(positions, dtype=np.int64)
    assert gaps_num_bytes(array) == expected == _encode_gaps(array).size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_encoders_copy_gpu_tensors_to_the_cpu() -> None:
    sent = encode_update(
        {A: torch.eye(2, 3, device="cuda")}, {MODULE: torch.ones(2, device="cuda")}
    )
    assert all(t.device.type == "cpu" for t in sent.values())
    assert encode_tensor(torch.ones(4, device="cuda")).values.device.type == "cpu"


def test_wire_keys_are_told_by_their_suffix() -> None:
    for suffix in (VALUES_SUFFIX, BITMASK_SUFFIX, GAPS_SUFFIX):
        assert is_wire_key(A + suffix)
    assert is_wire_key(scale_key(MODULE))
    assert not is_wire_key(A) and not is_wire_key(A + "::other")
