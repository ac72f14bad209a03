"""The site-state store: safetensors only, atomic writes, and a logged fresh start (never an
exception) for a missing, corrupt or mismatched file."""

from __future__ import annotations

import logging
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from client.site_state import SITE_STATE_FILE, load_site_state, save_site_state, site_state_path

KEY_B = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"
KEY_STEP = "optimizer.step"


def own_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A site's B (fp32, 6 x 2) and an integer optimiser counter."""
    generator = torch.Generator().manual_seed(seed)
    return {
        KEY_B: torch.randn(6, 2, generator=generator),
        KEY_STEP: torch.tensor([3 + seed], dtype=torch.int64),
    }


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


@pytest.fixture
def warnings_logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Flower's log records from INFO up (its logger propagates to caplog's)."""
    caplog.set_level(logging.INFO, logger="flwr")
    return caplog


def warning_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_round_trip_keeps_keys_values_and_dtypes(tmp_path: Path) -> None:
    tensors = own_tensors()
    path = save_site_state(tmp_path / "site", tensors)  # the folder is created
    assert path == tmp_path / "site" / SITE_STATE_FILE
    loaded = load_site_state(tmp_path / "site", shapes(tensors))
    assert loaded is not None
    assert list(loaded) == list(tensors)  # the expected order
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key
    # Without expected shapes the file is taken as it is.
    again = load_site_state(tmp_path / "site")
    assert again is not None
    assert list(again) == sorted(tensors)
    reordered = load_site_state(tmp_path / "site", dict(reversed(shapes(tensors).items())))
    assert reordered is not None
    assert list(reordered) == list(reversed(tensors))
    assert torch.equal(again[KEY_B], tensors[KEY_B])


def test_the_file_is_safetensors_not_pickle(tmp_path: Path) -> None:
    path = save_site_state(tmp_path, own_tensors())
    raw = path.read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    assert raw[8 : 8 + 1] == b"{"  # a JSON header, as safetensors writes it
    assert b'"format":"pt"' in raw[8 : 8 + header_length]
    with pytest.raises(pickle.UnpicklingError):
        pickle.loads(raw)


def test_a_second_save_replaces_the_first_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    save_site_state(tmp_path, own_tensors(0))
    save_site_state(tmp_path, own_tensors(1))
    loaded = load_site_state(tmp_path)
    assert loaded is not None
    assert torch.equal(loaded[KEY_B], own_tensors(1)[KEY_B])
    assert sorted(p.name for p in tmp_path.iterdir()) == [SITE_STATE_FILE]


def test_a_missing_file_is_a_fresh_start(
    tmp_path: Path, warnings_logged: pytest.LogCaptureFixture
) -> None:
    assert load_site_state(tmp_path / "never-written") is None
    assert not warning_text(warnings_logged)  # a new site is not a problem
    assert "no saved state" in warnings_logged.text


def test_a_failed_write_leaves_the_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = own_tensors(0)
    path = save_site_state(tmp_path, old)
    before = path.read_bytes()

    def failing_replace(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        save_site_state(tmp_path, own_tensors(1))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [SITE_STATE_FILE]  # temp removed
    monkeypatch.undo()
    loaded = load_site_state(tmp_path, shapes(old))
    assert loaded is not None
    assert torch.equal(loaded[KEY_B], old[KEY_B])


def test_a_write_interrupted_midway_leaves_the_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new bytes go to a temporary file first: a crash while writing never touches the
    old file."""
    path = save_site_state(tmp_path, own_tensors(0))
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        save_site_state(tmp_path, own_tensors(1))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [SITE_STATE_FILE]


def test_non_finite_tensors_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = save_site_state(tmp_path, own_tensors(0))
    before = path.read_bytes()
    bad = own_tensors(1)
    bad[KEY_B][0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"site state key '{KEY_B}': holds NaN"):
        save_site_state(tmp_path, bad)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda raw: raw[: len(raw) // 2], "cannot be read as safetensors"),  # truncated
        (lambda raw: raw[:5], "cannot be read as safetensors"),  # shorter than the header size
        (lambda raw: b"", "cannot be read as safetensors"),  # empty
        (lambda raw: pickle.dumps({"x": [1, 2]}), "cannot be read as safetensors"),  # pickle
        (lambda raw: b"\xff" * 8 + raw[8:], "cannot be read as safetensors"),  # header size
        (lambda raw: raw[:8] + b"[" + raw[9:], "cannot be read as safetensors"),  # header JSON
    ],
)
def test_a_corrupt_file_is_a_logged_fresh_start(
    tmp_path: Path,
    warnings_logged: pytest.LogCaptureFixture,
    corrupt: object,
    reason: str,
) -> None:
    path = save_site_state(tmp_path, own_tensors())
    assert callable(corrupt)
    path.write_bytes(corrupt(path.read_bytes()))
    assert load_site_state(tmp_path, shapes(own_tensors())) is None
    text = warning_text(warnings_logged)
    assert str(path) in text
    assert reason in text
    assert "starting fresh" in text


def test_an_unreadable_path_is_a_logged_fresh_start(
    tmp_path: Path, warnings_logged: pytest.LogCaptureFixture
) -> None:
    site_state_path(tmp_path).mkdir()  # a folder where the file should be
    assert load_site_state(tmp_path) is None
    assert str(site_state_path(tmp_path)) in warning_text(warnings_logged)


def test_non_finite_values_in_the_file_are_a_logged_fresh_start(
    tmp_path: Path, warnings_logged: pytest.LogCaptureFixture
) -> None:
    from safetensors.torch import save_file

    tensors = own_tensors()
    tensors[KEY_B][1, 1] = float("inf")
    save_file(tensors, str(site_state_path(tmp_path)))  # written by someone else
    assert load_site_state(tmp_path, shapes(tensors)) is None
    text = warning_text(warnings_logged)
    assert f"key '{KEY_B}' holds NaN or infinite values" in text
    assert str(site_state_path(tmp_path)) in text


@pytest.mark.parametrize(
    ("expected", "reason"),
    [
        ({KEY_B: (6, 4), KEY_STEP: (1,)}, rf"key '{KEY_B}' has shape \(6, 2\), expected \(6, 4\)"),
        ({KEY_B: (6, 2), KEY_STEP: (1,), "other": (2,)}, r"lacks 1 of the 3 expected .*'other'"),
        ({KEY_B: (6, 2)}, rf"holds 1 tensor\(s\) not expected, first '{KEY_STEP}'"),
    ],
)
def test_other_keys_or_shapes_than_expected_are_a_logged_fresh_start(
    tmp_path: Path,
    warnings_logged: pytest.LogCaptureFixture,
    expected: dict[str, tuple[int, ...]],
    reason: str,
) -> None:
    save_site_state(tmp_path, own_tensors())
    assert load_site_state(tmp_path, expected) is None
    text = warning_text(warnings_logged)
    assert str(site_state_path(tmp_path)) in text
    assert re.search(reason, text), text
    # The file is kept (a later run with the right shapes can still use it).
    assert load_site_state(tmp_path, shapes(own_tensors())) is not None


def test_the_name_can_be_chosen_per_state(tmp_path: Path) -> None:
    save_site_state(tmp_path, own_tensors(0), name="b.safetensors")
    save_site_state(tmp_path, own_tensors(1), name="optimizer.safetensors")
    first = load_site_state(tmp_path, name="b.safetensors")
    second = load_site_state(tmp_path, name="optimizer.safetensors")
    assert first is not None
    assert second is not None
    assert not torch.equal(first[KEY_B], second[KEY_B])
    assert os.path.exists(tmp_path / "b.safetensors")
