"""Fuzzing adapter folders: garbled weights and configs, missing files: the reader and CLI hold.

Whatever the bytes, ``read_adapter_dir`` either returns tensors or raises ``AdapterFileError``,
and ``robustmerge-fl merge`` either succeeds or exits 2 with one ``robustmerge-fl: error:`` line
and leaves no output (nor temporary) folder behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from strategies import cli
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LEGACY_WEIGHTS
from strategies.adapter_io.reading import read_adapter_dir
from strategies.adapter_io.safetensors_reading import SAFETENSORS_ITEMSIZE
from tests.strategies.conftest import synthetic_config, synthetic_tensors, write_synthetic_adapter

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID_WEIGHTS = save(synthetic_tensors(1), metadata={"format": "pt"})
HEADER_END = 8 + struct.unpack("<Q", VALID_WEIGHTS[:8])[0]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)

header_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*SAFETENSORS_ITEMSIZE, "F31", "f32", "", "F4"]) | json_values,
        "shape": st.lists(st.integers(-2, 6), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-4, 64), max_size=3) | json_values,
    }
)


def _with_header(header: object, data: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def _flip(positions: list[tuple[int, int]]) -> bytes:
    raw = bytearray(VALID_WEIGHTS)
    for position, value in positions:
        raw[position % len(raw)] = value
    return bytes(raw)


byte_edits = st.tuples(st.integers(0, HEADER_END + 16), st.integers(0, 255))
garbled_weights = st.one_of(
    st.integers(0, len(VALID_WEIGHTS) - 1).map(lambda n: VALID_WEIGHTS[:n]),
    st.lists(byte_edits, min_size=1, max_size=4).map(_flip),
    st.integers(0, 2**64 - 1).map(lambda n: struct.pack("<Q", n) + VALID_WEIGHTS[8:]),
    st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b),
    st.builds(
        _with_header,
        st.dictionaries(st.text(max_size=10), header_entries, max_size=3) | json_values,
        st.binary(max_size=48),
    ),
    st.binary(max_size=200),
)  # fmt: skip

bad_configs = st.one_of(
    json_values.map(lambda value: json.dumps(value).encode()),
    st.builds(
        lambda field, value: json.dumps({**synthetic_config(), field: value}).encode(),
        st.sampled_from(sorted(synthetic_config())),
        json_values,
    ),
    st.sampled_from(sorted(synthetic_config())).map(
        lambda field: json.dumps({k: v for k, v in synthetic_config().items() if k != field})
        .encode()
    ),
    st.binary(max_size=80),
)  # fmt: skip


def _run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def _check_cli(root: Path, folders: list[Path]) -> int:
    """Run a merge of ``folders``; check the all-or-nothing contract; return the status."""
    out = root / "merged"
    before = sorted(p.name for p in root.iterdir())
    status, stdout, stderr = _run_cli(["merge", *map(str, folders), "--out", str(out)])
    if status == 0:
        assert len(stdout.splitlines()) == 1
        assert stderr == ""
        read_adapter_dir(out)
    else:
        assert status == 2, stderr
        lines = stderr.splitlines()
        assert len(lines) == 1, stderr
        assert lines[0].startswith("robustmerge-fl: error: "), stderr
        assert stdout == ""
        assert not out.exists()
        assert sorted(p.name for p in root.iterdir()) == before
    return status


def _read_or_refuse(folder: Path) -> None:
    """Reading gives tensors or an AdapterFileError that names the folder; nothing else."""
    refusal: AdapterFileError | None = None
    try:
        result = read_adapter_dir(folder)
    except AdapterFileError as error:
        refusal = error
    if refusal is not None:
        assert refusal.folder == folder
        assert str(folder) in str(refusal)
        return
    assert result.tensors
    assert all(isinstance(t, torch.Tensor) for t in result.tensors.values())


@FUZZ
@given(raw=garbled_weights)
def test_garbled_safetensors_never_crash_the_reader(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_synthetic_adapter(Path(tmp) / "odd", seed=1)
        (folder / ADAPTER_WEIGHTS).write_bytes(raw)
        _read_or_refuse(folder)


@FUZZ
@given(raw=garbled_weights)
def test_garbled_safetensors_never_crash_the_cli(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        good = write_synthetic_adapter(root / "good", seed=0)
        odd = write_synthetic_adapter(root / "odd", seed=1)
        (odd / ADAPTER_WEIGHTS).write_bytes(raw)
        _check_cli(root, [good, odd])


@FUZZ
@given(text=bad_configs)
def test_wrong_configs_give_one_error(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        good = write_synthetic_adapter(root / "good", seed=0)
        odd = write_synthetic_adapter(root / "odd", seed=1)
        (odd / ADAPTER_CONFIG).write_bytes(text)
        _read_or_refuse(odd)
        if _check_cli(root, [good, odd]) == 0:  # only a config equivalent to the good one
            config = json.loads(text)
            assert config["r"] == 4
            assert config["lora_alpha"] == 8


@settings(max_examples=30, deadline=None)
@given(
    missing=st.sets(st.sampled_from([ADAPTER_CONFIG, ADAPTER_WEIGHTS]), min_size=1),
    as_folder=st.booleans(),
    legacy=st.sampled_from([None, b"", b"\x80\x02}q\x00.", b"garbage"]),
)
def test_folders_missing_a_file_give_one_error(
    missing: set[str], as_folder: bool, legacy: bytes | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        good = write_synthetic_adapter(root / "good", seed=0)
        odd = write_synthetic_adapter(root / "odd", seed=1)
        for name in missing:
            (odd / name).unlink()
            if as_folder:
                (odd / name).mkdir()
        if legacy is not None:
            (odd / LEGACY_WEIGHTS).write_bytes(legacy)
        _read_or_refuse(odd)
        assert _check_cli(root, [good, odd]) == 2
