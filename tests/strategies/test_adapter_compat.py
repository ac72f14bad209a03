"""Whether adapters can be merged: configs, keys and shapes agree (adapter_io.compat)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from strategies.adapter_io.compat import check_compatible
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_CONFIG, AdapterFolder
from tests.strategies.conftest import synthetic_config, synthetic_tensors


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
