"""Writing PEFT adapter folders atomically (adapter_io.writing, adapter_io.atomic)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from strategies.adapter_io import atomic
from strategies.adapter_io.config import adapter_config_for
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from strategies.adapter_io.reading import read_adapter_dir
from strategies.adapter_io.writing import write_adapter_dir
from tests.strategies.conftest import PeftFolders, synthetic_config, synthetic_tensors


def test_written_folder_loads_in_peft_with_equal_weights(
    peft_folders: PeftFolders, tmp_path: Path
) -> None:
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict

    source = read_adapter_dir(peft_folders.adapters[1])
    tensors = {key: value * 3 for key, value in source.tensors.items()}
    config = adapter_config_for(str(peft_folders.base), 4, 8, ["value", "query"])
    out = write_adapter_dir(tmp_path / "written", tensors, config)

    assert PeftConfig.from_pretrained(str(out)).r == 4
    model = PeftModel.from_pretrained(peft_folders.load_base(), out)
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor), key


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    tensors = synthetic_tensors(0)
    key = next(iter(tensors))
    tensors[key] = tensors[key].t().contiguous().t()  # non-contiguous view
    shared = torch.arange(6.0)
    tensors["extra.first"] = shared[:3]  # two views of one storage
    tensors["extra.second"] = shared[3:]
    out = write_adapter_dir(
        tmp_path / "out",
        tensors,
        synthetic_config(),
        extra_files={"notes.txt": "hello", "blob.bin": b"\x00\x01"},
    )
    folder = read_adapter_dir(out)
    assert folder.tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(folder.tensors[name], tensor), name
    assert folder.config == synthetic_config()
    with safe_open(out / ADAPTER_WEIGHTS, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    assert (out / "notes.txt").read_text() == "hello"
    assert (out / "blob.bin").read_bytes() == b"\x00\x01"
    assert _leftovers(tmp_path) == []


def test_write_refuses_existing_target_without_overwrite(tmp_path: Path) -> None:
    out = write_adapter_dir(tmp_path / "out", synthetic_tensors(0), synthetic_config())
    with pytest.raises(AdapterFileError, match="already exists"):
        write_adapter_dir(out, synthetic_tensors(1), synthetic_config())
    kept = read_adapter_dir(out).tensors
    for key, tensor in synthetic_tensors(0).items():
        assert torch.equal(kept[key], tensor), key


def test_overwrite_replaces_the_folder(tmp_path: Path) -> None:
    out = write_adapter_dir(
        tmp_path / "out", synthetic_tensors(0), synthetic_config(), extra_files={"old.txt": "x"}
    )
    write_adapter_dir(out, synthetic_tensors(1), synthetic_config(r=4), overwrite=True)
    folder = read_adapter_dir(out)
    for key, tensor in synthetic_tensors(1).items():
        assert torch.equal(folder.tensors[key], tensor)
    assert not (out / "old.txt").exists()
    assert _leftovers(tmp_path) == []


def test_overwrite_refuses_a_folder_that_is_not_an_adapter(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(AdapterFileError, match="does not look like an adapter folder"):
        write_adapter_dir(precious, synthetic_tensors(0), synthetic_config(), overwrite=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(AdapterFileError, match="not a folder"):
        write_adapter_dir(a_file, synthetic_tensors(0), synthetic_config(), overwrite=True)


def test_a_crash_while_writing_leaves_no_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(file: Path, data: bytes) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic, "write_file", crash)
    with pytest.raises(OSError, match="No space"):
        write_adapter_dir(tmp_path / "out", synthetic_tensors(0), synthetic_config())
    assert list(tmp_path.iterdir()) == []


def test_a_failed_swap_restores_the_old_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = write_adapter_dir(tmp_path / "out", synthetic_tensors(0), synthetic_config())
    real_rename = os.rename
    calls: list[str] = []

    def flaky_rename(source: Any, destination: Any) -> None:
        calls.append(str(source))
        if len(calls) == 2:  # the old folder went away; moving the new one in fails
            raise OSError(5, "I/O error")
        real_rename(source, destination)

    monkeypatch.setattr(os, "rename", flaky_rename)
    with pytest.raises(OSError, match="I/O error"):
        write_adapter_dir(out, synthetic_tensors(1), synthetic_config(), overwrite=True)
    monkeypatch.undo()
    key = next(iter(synthetic_tensors(0)))
    assert torch.equal(read_adapter_dir(out).tensors[key], synthetic_tensors(0)[key])
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"../escape.txt": "x"}, "plain file name"),
        ({"": "x"}, "plain file name"),
        ({ADAPTER_CONFIG: "{}"}, "plain file name"),
        ({"ok.txt": 3}, "must be str or bytes"),
    ],
)
def test_write_refuses_bad_extra_files(tmp_path: Path, extra: Any, match: str) -> None:
    with pytest.raises(AdapterFileError, match=match):
        write_adapter_dir(
            tmp_path / "out", synthetic_tensors(0), synthetic_config(), extra_files=extra
        )
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_unserialisable_config_and_non_tensors(tmp_path: Path) -> None:
    with pytest.raises(AdapterFileError, match="cannot be written as JSON"):
        write_adapter_dir(tmp_path / "a", synthetic_tensors(0), {"alpha": float("nan")})
    with pytest.raises(AdapterFileError, match=r"expected str -> torch\.Tensor"):
        write_adapter_dir(tmp_path / "b", {"k": [1.0]}, synthetic_config())  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def _leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders left beside a target."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
