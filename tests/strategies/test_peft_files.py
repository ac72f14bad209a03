"""Reading, checking and atomically writing PEFT adapter folders (strategies.peft_files)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from strategies import peft_files
from strategies.peft_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LEGACY_WEIGHTS,
    AdapterFileError,
    AdapterFolder,
    adapter_config_for,
    check_compatible,
    read_adapter_dir,
    write_adapter_dir,
)
from tests.strategies.conftest import (
    PeftFolders,
    SyntheticFactory,
    synthetic_config,
    synthetic_tensors,
    write_synthetic_adapter,
)


class NotATensor:
    """A picklable object that the weights-only unpickler must refuse."""

    def __init__(self) -> None:
        self.payload = "anything"


# ------------------------------------------------------------------------------------------
# Real PEFT folders


def test_reads_a_folder_saved_by_peft(peft_folders: PeftFolders) -> None:
    folder = read_adapter_dir(peft_folders.adapters[0])
    assert folder.config["peft_type"] == "LORA"
    assert folder.config["r"] == 4
    assert sorted(folder.config["target_modules"]) == ["query", "value"]
    assert folder.weights_file == peft_folders.adapters[0] / ADAPTER_WEIGHTS
    assert len(folder.tensors) == 8  # 2 layers x (query, value) x (A, B)
    a_key = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
    assert folder.tensors[a_key].shape == (4, 32)
    assert all(t.abs().sum() > 0 for t in folder.tensors.values())  # B was randomised too


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


def test_adapter_config_for_is_json_and_sorted() -> None:
    config = adapter_config_for(None, 8, 16.0, ["value", "query", "key"], lora_dropout=0.1)
    assert json.loads(json.dumps(config)) == config
    assert config["peft_type"] == "LORA"
    assert config["target_modules"] == ["key", "query", "value"]
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16.0, 0.1)
    assert config["base_model_name_or_path"] is None
    assert config["inference_mode"] is True


def test_adapter_config_for_reports_peft_refusal() -> None:
    with pytest.raises(ValueError, match=r"peft\.LoraConfig refused these settings: .*DoRA"):
        adapter_config_for("m", 4, 8, ["query"], use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="unexpected keyword argument 'not_a_field'"):
        adapter_config_for("m", 4, 8, ["query"], not_a_field=1)


# ------------------------------------------------------------------------------------------
# Writing


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

    monkeypatch.setattr(peft_files, "_write_file", crash)
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


# ------------------------------------------------------------------------------------------
# Legacy .bin


def test_bin_is_read_with_weights_only(synthetic_adapter: SyntheticFactory) -> None:
    folder = synthetic_adapter("legacy")
    tensors = synthetic_tensors(3)
    (folder / ADAPTER_WEIGHTS).unlink()
    torch.save(tensors, folder / LEGACY_WEIGHTS)
    loaded = read_adapter_dir(folder)
    assert loaded.weights_file == folder / LEGACY_WEIGHTS
    for key, tensor in tensors.items():
        assert torch.equal(loaded.tensors[key], tensor)


def test_safetensors_wins_over_bin(synthetic_adapter: SyntheticFactory) -> None:
    folder = synthetic_adapter("both", seed=5)
    (folder / LEGACY_WEIGHTS).write_bytes(b"not even a pickle")
    loaded = read_adapter_dir(folder)
    assert loaded.weights_file == folder / ADAPTER_WEIGHTS


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"w": torch.ones(2), "evil": NotATensor()}, "weights_only=True"),
        ({"w": torch.ones(2), "count": 3}, "holds int, not a tensor"),
        ([torch.ones(2)], "must hold a dict of tensors"),
        ({1: torch.ones(2)}, "is not a string"),
    ],
)
def test_bin_with_non_tensors_is_refused(
    synthetic_adapter: SyntheticFactory, content: object, match: str
) -> None:
    folder = synthetic_adapter("legacy")
    (folder / ADAPTER_WEIGHTS).unlink()
    torch.save(content, folder / LEGACY_WEIGHTS)
    with pytest.raises(AdapterFileError, match=match) as caught:
        read_adapter_dir(folder)
    assert caught.value.file == LEGACY_WEIGHTS
    assert "weights_only=False" not in str(caught.value)


def test_garbage_bin_is_refused(synthetic_adapter: SyntheticFactory) -> None:
    folder = synthetic_adapter("legacy")
    (folder / ADAPTER_WEIGHTS).unlink()
    (folder / LEGACY_WEIGHTS).write_bytes(b"\x80\x04garbage")
    with pytest.raises(AdapterFileError, match=LEGACY_WEIGHTS):
        read_adapter_dir(folder)


# ------------------------------------------------------------------------------------------
# Bad folders, configs and headers


def test_missing_folder_and_files(tmp_path: Path, synthetic_adapter: SyntheticFactory) -> None:
    with pytest.raises(AdapterFileError, match="no such folder"):
        read_adapter_dir(tmp_path / "nope")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(AdapterFileError, match="not a folder"):
        read_adapter_dir(tmp_path / "plain")
    no_config = synthetic_adapter("no-config")
    (no_config / ADAPTER_CONFIG).unlink()
    with pytest.raises(AdapterFileError, match=f"{ADAPTER_CONFIG}: missing"):
        read_adapter_dir(no_config)
    no_weights = synthetic_adapter("no-weights")
    (no_weights / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterFileError, match=f"{ADAPTER_WEIGHTS}: missing") as caught:
        read_adapter_dir(no_weights)
    assert caught.value.folder == no_weights


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"peft_type": "IA3"}, "'peft_type' must be \"LORA\""),
        ({"r": "4"}, "'r' must be an integer > 0, got '4' \\(string\\)"),
        ({"r": 0}, "'r' must be an integer > 0"),
        ({"r": 4.0}, "'r' must be an integer > 0"),
        ({"r": True}, "'r' must be an integer > 0"),
        ({"lora_alpha": "8"}, "'lora_alpha' must be a finite number"),
        ({"lora_alpha": None}, "'lora_alpha' must be a finite number"),
        ({"target_modules": 3}, "'target_modules' must be a string or a list of strings"),
        ({"target_modules": ["query", 1]}, "'target_modules' must be a string or a list"),
        ({"base_model_name_or_path": 7}, "'base_model_name_or_path' must be a string or null"),
        ({"r": None}, "'r' must be an integer > 0, got None"),
    ],
)
def test_wrong_typed_config_fields(
    synthetic_adapter: SyntheticFactory, change: dict[str, Any], match: str
) -> None:
    folder = synthetic_adapter("bad", config={**synthetic_config(), **change})
    with pytest.raises(AdapterFileError, match=match) as caught:
        read_adapter_dir(folder)
    assert caught.value.file == ADAPTER_CONFIG
    assert str(folder) in str(caught.value)


def test_missing_config_field_says_missing(synthetic_adapter: SyntheticFactory) -> None:
    config = synthetic_config()
    del config["lora_alpha"]
    folder = synthetic_adapter("bad", config=config)
    with pytest.raises(AdapterFileError, match="'lora_alpha' must be a finite number, got missing"):
        read_adapter_dir(folder)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got array"),
        (b'{"r": 4, "r": 5}', "duplicate key 'r'"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100_000, "not valid JSON"),
        (b'{"peft_type": "LORA", "r": 4, "lora_alpha": Infinity}', "'lora_alpha' must be a fin"),
    ],
)
def test_garbled_config(synthetic_adapter: SyntheticFactory, text: bytes, match: str) -> None:
    folder = synthetic_adapter("bad")
    (folder / ADAPTER_CONFIG).write_bytes(text)
    with pytest.raises(AdapterFileError, match=match):
        read_adapter_dir(folder)


def test_oversized_config_is_refused_unread(
    synthetic_adapter: SyntheticFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peft_files, "MAX_CONFIG_BYTES", 100)
    folder = synthetic_adapter("big", config={**synthetic_config(), "pad": "x" * 200})
    with pytest.raises(AdapterFileError, match="more than the 100 accepted"):
        read_adapter_dir(folder)


def _safetensors_bytes(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "truncated"),
        (b"\x01\x02\x03", "truncated"),
        (struct.pack("<Q", 2**63) + b"{}", "header length field says .* more than"),
        (struct.pack("<Q", 4096) + b"{}", "but the file has only 2 after it"),
        (struct.pack("<Q", 4) + b"\xff\xff\xff\xff", "header is not UTF-8"),
        (struct.pack("<Q", 4) + b"nope", "header is not valid JSON"),
        (_safetensors_bytes([1, 2]), "header must be a JSON object, got array"),
        (_safetensors_bytes({"w": 3}), "tensor 'w': header entry must be an object"),
        (
            _safetensors_bytes({"w": {"dtype": "F31", "shape": [1], "data_offsets": [0, 4]}}),
            "unknown dtype 'F31'",
        ),
        (
            _safetensors_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}),
            "shape must be a list of integers >= 0",
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
        (_safetensors_bytes({"__metadata__": {"format": 1}}), "must map strings to strings"),
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


# ------------------------------------------------------------------------------------------
# Compatibility


def _folder(path: str, **options: Any) -> AdapterFolder:
    """An in-memory AdapterFolder: ``tensors``/``seed`` make the tensors, the rest the config."""
    tensors = options.pop("tensors", None)
    seed = options.pop("seed", 0)
    if tensors is None:
        tensors = synthetic_tensors(
            seed, r=options.get("r", 4), targets=options.get("targets", ("query", "value"))
        )
    return AdapterFolder(path=Path(path), tensors=tensors, config=synthetic_config(**options))


def test_compatible_adapters_pass_with_reordered_targets() -> None:
    check_compatible(
        [
            _folder("a", seed=0),
            _folder("b", seed=1, targets=("value", "query")),
            _folder("c", seed=2, lora_alpha=8.0),
        ]
    )
    check_compatible([])
    check_compatible([_folder("only")])


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (_folder("b", r=8), "r is 8 but adapter folder 'a' has 4"),
        (_folder("b", lora_alpha=16), "lora_alpha is 16 but adapter folder 'a' has 8"),
        (
            _folder("b", targets=("query", "key")),
            r"target_modules is \['query', 'key'\] but adapter folder 'a' has \['query', 'value'\]",
        ),
        (
            _folder("b", base="other-bert"),
            "base_model_name_or_path is 'other-bert' but adapter folder 'a' has 'tiny-bert'",
        ),
    ],
)
def test_incompatible_configs_name_both_folders(other: AdapterFolder, match: str) -> None:
    with pytest.raises(AdapterFileError, match=match) as caught:
        check_compatible([_folder("a"), other])
    assert caught.value.folder == Path("b")
    assert caught.value.file == ADAPTER_CONFIG


def test_rslora_mismatch_is_incompatible() -> None:
    other = _folder("b")
    other.config["use_rslora"] = True
    with pytest.raises(AdapterFileError, match="use_rslora is True but adapter folder 'a' has"):
        check_compatible([_folder("a"), other])


def test_key_and_shape_mismatches() -> None:
    first = _folder("a")
    key = next(iter(first.tensors))
    missing = _folder("b", tensors={k: v for k, v in first.tensors.items() if k != key})
    with pytest.raises(AdapterFileError, match=f"key '{key}' is missing but present in"):
        check_compatible([first, missing])
    extra = _folder("b", tensors={**first.tensors, "bonus.weight": torch.zeros(1)})
    with pytest.raises(
        AdapterFileError, match=r"key 'bonus\.weight' is absent from adapter folder"
    ):
        check_compatible([first, extra])
    reshaped = _folder("b", tensors={**first.tensors, key: torch.zeros(4, 9)})
    with pytest.raises(AdapterFileError, match=r"has shape \(4, 9\) but adapter folder 'a' has"):
        check_compatible([first, reshaped])


def test_reading_a_synthetic_folder_twice_is_stable(tmp_path: Path) -> None:
    folder = write_synthetic_adapter(tmp_path / "x", seed=9)
    first, second = read_adapter_dir(folder), read_adapter_dir(folder)
    check_compatible([first, second])
    for key, tensor in first.tensors.items():
        assert torch.equal(second.tensors[key], tensor)


def _leftovers(parent: Path) -> list[str]:
    """Hidden temporary folders left beside a target."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
