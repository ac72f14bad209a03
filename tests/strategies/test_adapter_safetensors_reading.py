"""adapter_model.safetensors: safetensors' refusals name the file, plus the checks it lacks.

(adapter_io.safetensors_reading)
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch

from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_WEIGHTS
from strategies.adapter_io.reading import read_adapter_dir
from tests.strategies.conftest import SyntheticFactory


def _safetensors_bytes(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", r"header too small \(the file is 0 bytes, too short to hold the 8-byte"),
        (b"\x01\x02\x03", r"header too small \(the file is 3 bytes, too short"),
        (
            struct.pack("<Q", 2**63) + b"{}",
            r"header too large \(the file is 10 bytes, "
            r"its header length field says 9223372036854775808\)",
        ),
        (
            struct.pack("<Q", 4096) + b"{}",
            r"invalid header length \(the file is 10 bytes, its header length field says 4096\)",
        ),
        (struct.pack("<Q", 4) + b"\xff\xff\xff\xff", "invalid UTF-8 in header"),
        (
            struct.pack("<Q", 4) + b"nope",
            "invalid JSON in header: expected ident at line 1 column 2",
        ),
        (_safetensors_bytes([1, 2]), "invalid JSON in header: invalid type: sequence, expected"),
        (
            _safetensors_bytes({"w": 3}),
            r"invalid type: integer `3`, expected struct TensorInfo at line 1",
        ),
        (
            _safetensors_bytes({"w": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}),
            "unknown variant `F31`, expected one of `BOOL`",
        ),
        (
            _safetensors_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}),
            "invalid value: integer `-1`, expected usize at line 1",
        ),
        (
            _safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4
            ),
            r"data_offsets \[0, 8\] fall outside the 4 data bytes",
        ),
        (
            _safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4
            ),
            "span 4 bytes but F32 \\[2\\] needs 8",
        ),
        (
            _safetensors_bytes(
                {
                    "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                    "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                },
                b"\0" * 8,
            ),
            "overlaps another tensor",
        ),
        (
            _safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8
            ),
            "leaves a gap",
        ),
        (
            _safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8
            ),
            "cover 4 bytes but the file holds 8",
        ),
        (
            _safetensors_bytes({"__metadata__": {"format": 1}}),
            "invalid JSON in header: invalid type: integer `1`, expected a string",
        ),
        (_safetensors_bytes({}), "holds no tensors"),
    ],
)
def test_bad_safetensors_headers(
    synthetic_adapter: SyntheticFactory, raw: bytes, match: str
) -> None:
    folder = synthetic_adapter("bad")
    (folder / ADAPTER_WEIGHTS).write_bytes(raw)
    with pytest.raises(AdapterFileError, match=match) as caught:
        read_adapter_dir(folder)
    assert caught.value.file == ADAPTER_WEIGHTS
    assert str(folder) in str(caught.value)


def test_a_valid_header_written_by_hand_loads(synthetic_adapter: SyntheticFactory) -> None:
    folder = synthetic_adapter("hand")
    data = struct.pack("<2f", 1.5, -2.0)
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "empty": {"dtype": "F16", "shape": [0, 3], "data_offsets": [8, 8]},
    }
    (folder / ADAPTER_WEIGHTS).write_bytes(_safetensors_bytes(header, data))
    tensors = read_adapter_dir(folder).tensors
    assert torch.equal(tensors["w"], torch.tensor([1.5, -2.0]))
    assert tensors["empty"].shape == (0, 3)


@pytest.mark.parametrize(
    ("dtype", "shape", "size"),
    [("F4", [2], 1), ("F8_E8M0", [1], 1), ("F6_E2M3", [4], 3)],
)
def test_dtypes_safetensors_loads_but_torch_cannot_merge_are_refused(
    synthetic_adapter: SyntheticFactory, dtype: str, shape: list[int], size: int
) -> None:
    # safetensors 0.8 loads F4 (packed, as float4_e2m1fn_x2) and F8_E8M0; F6 it cannot load.
    folder = synthetic_adapter("odd-dtype")
    header = {"w": {"dtype": dtype, "shape": shape, "data_offsets": [0, size]}}
    (folder / ADAPTER_WEIGHTS).write_bytes(_safetensors_bytes(header, b"\0" * size))
    with pytest.raises(AdapterFileError, match=f"tensor 'w': dtype '{dtype}' is not accepted"):
        read_adapter_dir(folder)


def test_a_tensor_named_twice_is_refused(synthetic_adapter: SyntheticFactory) -> None:
    # safetensors accepts this header and keeps the last entry; another reader may keep the first.
    folder = synthetic_adapter("twice")
    entry = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    header = f'{{"w": {entry}, "w": {entry}}}'.encode()
    raw = struct.pack("<Q", len(header)) + header + b"\0" * 4
    (folder / ADAPTER_WEIGHTS).write_bytes(raw)
    with pytest.raises(AdapterFileError, match="header is ambiguous: duplicate key 'w'") as caught:
        read_adapter_dir(folder)
    assert caught.value.file == ADAPTER_WEIGHTS


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_is_refused_as_not_a_regular_file(synthetic_adapter: SyntheticFactory) -> None:
    # The writer end opened here lets open() return; safetensors alone would say "No such device".
    folder = synthetic_adapter("pipe")
    (folder / ADAPTER_WEIGHTS).unlink()
    os.mkfifo(folder / ADAPTER_WEIGHTS)
    descriptor = os.open(folder / ADAPTER_WEIGHTS, os.O_RDWR | os.O_NONBLOCK)  # a writer end
    try:
        with pytest.raises(AdapterFileError, match="is not a regular file"):
            read_adapter_dir(folder)
    finally:
        os.close(descriptor)
