"""adapter_config.json: type-checked when read, built from peft.LoraConfig (adapter_io.config)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from strategies.adapter_io import config as adapter_config
from strategies.adapter_io.config import adapter_config_for
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_CONFIG
from strategies.adapter_io.reading import read_adapter_dir
from tests.strategies.conftest import SyntheticFactory, synthetic_config


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
    monkeypatch.setattr(adapter_config, "MAX_CONFIG_BYTES", 100)
    folder = synthetic_adapter("big", config={**synthetic_config(), "pad": "x" * 200})
    with pytest.raises(AdapterFileError, match="more than the 100 accepted"):
        read_adapter_dir(folder)
