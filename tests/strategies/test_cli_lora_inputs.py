"""Each merge input is checked on its own before merging (adapter_io.lora_content): a folder that
holds no LoRA pairs, or pairs of another rank or module than its config says, is named itself
(first, last or every input), exit 2, no output folder; the CLI's range errors name the flag."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
import torch

from strategies import cli
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterFolder
from strategies.adapter_io.lora_content import check_lora_content
from tests.strategies.conftest import SyntheticFactory, synthetic_config, synthetic_tensors


def _non_lora(seed: int) -> dict[str, torch.Tensor]:
    """What the issue's user merged: an ordinary safetensors file (a classifier, embeddings)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "classifier.weight": torch.randn(4, 8, generator=generator),
        "classifier.bias": torch.randn(4, generator=generator),
    }


def _merge(folders: list[Path], out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``robustmerge-fl merge`` on ``folders``: (exit status, stderr); stdout must stay empty."""
    status = cli.main(["merge", *map(str, folders), "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    if status != 0:
        assert captured.out == ""
    return status, captured.err


def _assert_refused(err: str, folder: Path, out: Path, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"robustmerge-fl: error: adapter folder '{folder}'"), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


NO_PAIRS = r"adapter_model\.safetensors: holds no LoRA A/B pair \(its 2 tensor\(s\): 'classifier"


@pytest.mark.parametrize("position", ["first", "last", "middle"])
def test_a_non_lora_folder_is_named_wherever_it_is_listed(
    position: str,
    synthetic_adapter: SyntheticFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good = [synthetic_adapter(f"good{seed}", seed=seed) for seed in range(2)]
    bad = synthetic_adapter("plain", tensors=_non_lora(0))
    folders = {
        "first": [bad, *good],
        "last": [*good, bad],
        "middle": [good[0], bad, good[1]],
    }[position]
    out = tmp_path / "merged"
    status, err = _merge(folders, out, capsys)
    assert status == 2
    _assert_refused(err, bad, out, NO_PAIRS)


def test_only_non_lora_folders_are_refused_naming_the_first(
    synthetic_adapter: SyntheticFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = [synthetic_adapter(f"plain{seed}", tensors=_non_lora(seed)) for seed in range(2)]
    out = tmp_path / "merged"
    status, err = _merge(folders, out, capsys)
    assert status == 2
    _assert_refused(err, folders[0], out, NO_PAIRS)


def test_factors_of_another_rank_than_the_config_are_refused(
    synthetic_adapter: SyntheticFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # config r = 8, tensors at rank 4, listed first: compared with the good one, the good one
    # would be blamed for "r is 4 but ... has 8".
    odd = synthetic_adapter("odd", tensors=synthetic_tensors(0, r=4), config=synthetic_config(r=8))
    good = synthetic_adapter("good", seed=1, r=8)
    out = tmp_path / "merged"
    status, err = _merge([odd, good], out, capsys)
    assert status == 2
    _assert_refused(
        err,
        odd,
        out,
        r"lora_A\.weight' has shape \(4, 8\), but adapter_config\.json gives this "
        r"module rank 8",
    )


def test_pairs_of_modules_outside_target_modules_are_refused(
    synthetic_adapter: SyntheticFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = synthetic_adapter(
        "odd", tensors=synthetic_tensors(0, targets=("key",)), config=synthetic_config()
    )
    good = synthetic_adapter("good", seed=1)
    out = tmp_path / "merged"
    status, err = _merge([good, odd], out, capsys)
    assert status == 2
    _assert_refused(err, odd, out, r"module 'encoder\.layer\.0\.attention\.self\.key', which")


def test_a_lone_factor_is_refused_in_its_own_folder(
    synthetic_adapter: SyntheticFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tensors = synthetic_tensors(0)
    dropped = "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"
    del tensors[dropped]
    odd = synthetic_adapter("odd", tensors=tensors)
    out = tmp_path / "merged"
    status, err = _merge([odd, synthetic_adapter("good", seed=1)], out, capsys)
    assert status == 2
    _assert_refused(err, odd, out, re.escape(f"has no matching B factor (expected '{dropped}')"))


def test_good_folders_still_merge(
    synthetic_adapter: SyntheticFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = [synthetic_adapter(f"c{seed}", seed=seed) for seed in range(3)]
    status, err = _merge(folders, tmp_path / "merged", capsys)
    assert status == 0, err
    assert (tmp_path / "merged" / ADAPTER_WEIGHTS).is_file()


@pytest.mark.parametrize(
    ("targets", "rank_pattern", "accepted"),
    [
        ("all-linear", {}, True),
        (r".*\.(query|value)", {}, True),
        (r".*\.query", {}, False),
        (["self.query", "value"], {}, True),
        (["query", "value"], {"value": 2}, False),  # value's factors are rank 4, not 2
        (["query", "value"], {"layer.0.attention.self.value": 4, "key": 2}, True),
    ],
)
def test_targets_and_rank_pattern_follow_peft(
    targets: object, rank_pattern: dict[str, int], accepted: bool
) -> None:
    config = {**synthetic_config(), "target_modules": targets, "rank_pattern": rank_pattern}
    folder = AdapterFolder(path=Path("f"), tensors=synthetic_tensors(0), config=config)
    if accepted:
        assert check_lora_content(folder) is folder
    else:
        with pytest.raises(AdapterFileError):
            check_lora_content(folder)


def test_a_broken_target_regex_names_the_config() -> None:
    config = {**synthetic_config(), "target_modules": "(query"}
    folder = AdapterFolder(path=Path("f"), tensors=synthetic_tensors(0), config=config)
    with pytest.raises(AdapterFileError, match="not a valid regular expression") as caught:
        check_lora_content(folder)
    assert caught.value.file == ADAPTER_CONFIG


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--keep-ratio", "1.5"], "--keep-ratio must be in (0, 1], got 1.5"),
        (["--scale-quantile", "-0.1"], "--scale-quantile must be in [0, 1), got -0.1"),
        (["--fuse-weight", "1,inf"], "argument --fuse-weight: expected comma-separated"),
    ],
)
def test_range_errors_name_the_flag(
    options: list[str],
    message: str,
    synthetic_adapter: SyntheticFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folders = [str(synthetic_adapter(f"c{seed}", seed=seed)) for seed in range(2)]
    assert cli.main(["merge", *folders, "--out", str(tmp_path / "m"), *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robustmerge-fl: error: {message}"), err
    assert "keep_ratio" not in err and "scale_quantile" not in err


def test_the_merged_folder_has_the_umask_mode(
    synthetic_adapter: SyntheticFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = [synthetic_adapter(f"c{seed}", seed=seed) for seed in range(2)]
    out = tmp_path / "merged"
    previous = os.umask(0o022)
    try:
        status, err = _merge(folders, out, capsys)
    finally:
        os.umask(previous)
    assert status == 0, err
    assert stat.S_IMODE(out.stat().st_mode) == 0o755  # not tempfile.mkdtemp's 0700
