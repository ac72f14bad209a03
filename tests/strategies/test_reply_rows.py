"""Reading a reply's key in pieces of rows (what a defence's stage does, so that its working set
stays flat in the number of replies): from the wire bytes, from a spilled file, through the
lazy rewrites, and stacked over a round's replies."""

from __future__ import annotations

import importlib
import io
import pkgutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common.constant import SType
from hypothesis import given, settings
from hypothesis import strategies as st

import strategies
import strategies.reply_checks as reply_checks
from strategies.reply_checks import AcceptedReply, decode_float32, decode_float32_rows
from strategies.reply_spill import ReplySpill
from strategies.robust_replies import ReplyDeltas, RewrittenReply


def _record(values: np.ndarray) -> ArrayRecord:
    return ArrayRecord({"w": Array(values)})


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=3),
    dtype=st.sampled_from(["<f4", ">f4", "<f2", "<f8"]),
    fortran=st.booleans(),
    start=st.integers(min_value=0, max_value=5),
    length=st.integers(min_value=1, max_value=5),
)
def test_rows_decode_to_the_whole_decode_sliced(
    shape: list[int], dtype: str, fortran: bool, start: int, length: int
) -> None:
    rng = np.random.default_rng(sum(shape) + start)
    values = rng.standard_normal(shape).astype(dtype)
    if fortran:
        values = np.asfortranarray(values)
    arrays = _record(values)
    rows = slice(min(start, shape[0] - 1), min(start, shape[0] - 1) + length)
    got = decode_float32_rows(arrays, "w", rows)
    want = decode_float32(arrays, "w")[rows]
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(decode_float32_rows(arrays, "w", ...), decode_float32(arrays, "w"))
    got.add_(1.0)  # a writable copy, not a view on the wire bytes
    assert torch.equal(decode_float32(arrays, "w")[rows], want)


def _reply(node: int, values: dict[str, torch.Tensor]) -> AcceptedReply:
    arrays = ArrayRecord({key: Array(value.numpy()) for key, value in values.items()})
    return AcceptedReply(node, arrays, 4, 0, RecordDict())


def test_a_spilled_reply_reads_rows_from_its_file(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    values = {
        "w": torch.randn(9, 4, generator=generator),
        "s": torch.randn((), generator=generator),
    }
    with ReplySpill(1, tmp_path) as spill:
        spill.keep(_reply(1, values))  # the first stays in memory
        spilled = spill.keep(_reply(2, values))
        assert spilled.backing is not None
        assert torch.equal(spilled.tensor_rows("w", slice(2, 5)), values["w"][2:5])
        assert torch.equal(spilled.tensor_rows("w", ...), values["w"])
        assert torch.equal(spilled.tensor_rows("s", ...), values["s"])
        with pytest.raises(KeyError):
            spilled.tensor_rows("missing", slice(0, 1))


def test_every_reply_kind_that_rewrites_tensor_rewrites_its_rows() -> None:
    """A subclass that changes what ``tensor`` answers and not ``tensor_rows`` would hand a
    stage the wire bytes instead of its own values."""
    for module in pkgutil.walk_packages(strategies.__path__, "strategies."):
        importlib.import_module(module.name)
    pending, kinds = list(AcceptedReply.__subclasses__()), []
    while pending:
        kind = pending.pop()
        kinds.append(kind)
        pending.extend(kind.__subclasses__())
    assert kinds  # at least the rewritten and the sparse replies
    for kind in kinds:
        if kind.tensor is not AcceptedReply.tensor:
            assert kind.tensor_rows is not AcceptedReply.tensor_rows, kind.__name__


def test_round_stacks_in_pieces_equal_the_whole_stack(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(10, 3, generator=generator), "s": torch.randn((), generator=generator)}
    replies = []
    with ReplySpill(2, tmp_path) as spill:
        for node in range(1, 6):
            values = {k: v + torch.randn(v.shape, generator=generator) for k, v in base.items()}
            replies.append(spill.keep(_reply(node, values)))
        replies[0] = RewrittenReply.of(replies[0], base, scale=0.5)
        assert sum(reply.backing is not None for reply in replies) == 3
        whole = {k: torch.stack([r.tensor(k) - base[k] for r in replies]) for k in base}
        # 5 replies x 3 float32 = 60 bytes a row: pieces of 2 rows under a 130-byte budget
        deltas = ReplyDeltas(replies, base, budget=130)
        pieces = list(deltas.stacks("w"))
        assert [piece.shape for piece in pieces] == [(5, 2, 3)] * 5
        assert torch.equal(torch.cat(pieces, dim=1), whole["w"])
        (scalar,) = deltas.stacks("s")
        assert torch.equal(scalar, whole["s"])
        assert len(list(ReplyDeltas(replies, base).stacks("w"))) == 1  # the default: one piece


def _npy(values: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    stream = io.BytesIO()
    np.lib.format.write_array(stream, values, version=version)
    return stream.getvalue()


def _raw_record(values: np.ndarray, data: bytes) -> ArrayRecord:
    array = Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=SType.NUMPY, data=data)
    return ArrayRecord({"w": array})


@pytest.fixture
def whole_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every whole-array decode ``decode_float32_rows`` falls back to, by key."""
    calls: list[str] = []

    def counted(arrays: ArrayRecord, key: str) -> torch.Tensor:
        calls.append(key)
        return decode_float32(arrays, key)

    monkeypatch.setattr(reply_checks, "decode_float32", counted)
    return calls


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_a_c_ordered_array_is_read_in_place_not_decoded_whole(
    whole_decodes: list[str], version: tuple[int, int]
) -> None:
    """The formats Flower writes (NumPy 1.0; 2.0 for long headers) are read from the wire bytes,
    only the asked rows copied; trailing bytes after the array are not read as values."""
    values = np.arange(24, dtype="<f4").reshape(6, 4) / 7
    for data in (_npy(values, version), _npy(values, version) + b"\0" * 16):
        got = decode_float32_rows(_raw_record(values, data), "w", slice(1, 4))
        assert torch.equal(got, torch.from_numpy(values[1:4].copy()))
    assert whole_decodes == []


def test_what_cannot_be_read_in_place_is_decoded_whole(whole_decodes: list[str]) -> None:
    """All rows, a Fortran-ordered array, a header of format 3.0 and bytes that are not NumPy's
    format fall back to the whole decode (sliced), with the same values."""
    values = np.arange(12, dtype="<f4").reshape(4, 3) / 3
    fortran = np.asfortranarray(values)
    cases = [
        (_raw_record(values, _npy(values)), ...),
        (_raw_record(fortran, _npy(fortran)), slice(1, 3)),
        (_raw_record(values, _npy(values, (3, 0))), slice(0, 2)),
    ]
    for arrays, rows in cases:
        assert torch.equal(
            decode_float32_rows(arrays, "w", rows), decode_float32(arrays, "w")[rows]
        )
    assert whole_decodes == ["w", "w", "w"]
    garbage = _raw_record(values, b"not an npy header at all")
    with pytest.raises(ValueError):
        decode_float32_rows(garbage, "w", slice(0, 1))  # the whole decode's own refusal
    assert whole_decodes == ["w"] * 4
