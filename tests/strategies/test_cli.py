"""The robustmerge-fl command line: real PEFT round trip, and one clean line for every bad input."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from strategies import cli, cli_commands, merge_lora
from strategies.adapter_io.layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LEGACY_WEIGHTS
from strategies.adapter_io.reading import read_adapter_dir
from strategies.cli_merge_checks import merge_error_message
from strategies.merging import available_methods
from tests.strategies.conftest import (
    PeftFolders,
    SyntheticFactory,
    synthetic_config,
    synthetic_tensors,
)

REPO = Path(__file__).resolve().parents[2]


def _inputs(folders: tuple[Path, ...] | list[Path]) -> list[dict[str, torch.Tensor]]:
    return [read_adapter_dir(folder).tensors for folder in folders]


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), f"{key}: CLI output differs from merge_lora"


# ------------------------------------------------------------------------------------------
# Success


def test_cli_output_loads_in_peft_and_equals_merge_lora(
    peft_folders: PeftFolders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    out = tmp_path / "merged"
    argv = ["merge", *map(str, peft_folders.adapters), "--out", str(out), "--device", "cpu"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.count("\n") == 1
    assert captured.out.startswith("merged 3 adapter(s) with robustmerge (paper-exact) into")

    expected = merge_lora(_inputs(peft_folders.adapters), device="cpu")
    model = PeftModel.from_pretrained(peft_folders.load_base(), out)
    _assert_same(get_peft_model_state_dict(model), expected)
    assert json.loads((out / ADAPTER_CONFIG).read_text()) == json.loads(
        (peft_folders.adapters[0] / ADAPTER_CONFIG).read_text()
    )

    report = json.loads((out / cli.REPORT_FILE).read_text())
    assert report["method"] == "robustmerge"
    assert report["hyperparameters"]["keep_ratio"] == 0.2
    assert report["hyperparameters"]["fuse_weight"] == 2.0
    assert report["hyperparameters_given"] == {}
    assert report["weights"] is None
    assert report["device"] == "cpu"
    assert report["relative_error"] is None
    assert report["robustmerge_fl_version"] == "0.1.0"
    assert report["seconds"] >= 0
    assert [item["label"] for item in report["inputs"]] == ["client-0", "client-1", "client-2"]
    for item, folder in zip(report["inputs"], peft_folders.adapters, strict=True):
        digest = hashlib.sha256((folder / ADAPTER_WEIGHTS).read_bytes()).hexdigest()
        assert item["sha256"] == digest
        assert item["weights_file"] == ADAPTER_WEIGHTS


def test_cli_as_a_subprocess_matches_in_process(peft_folders: PeftFolders, tmp_path: Path) -> None:
    out = tmp_path / "merged"
    options = ["--keep-ratio", "0.5", "--fuse-weight", "1,2,3", "--weights", "10,20,30"]
    adapters = [str(path) for path in peft_folders.adapters]
    command = [sys.executable, "-m", "strategies.cli", "merge", *adapters, "--out", str(out)]
    done = subprocess.run(
        [*command, "--device", "cpu", *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert len(done.stdout.splitlines()) == 1
    expected = merge_lora(
        _inputs(peft_folders.adapters),
        weights=[10, 20, 30],
        device="cpu",
        keep_ratio=0.5,
        fuse_weight=(1.0, 2.0, 3.0),
    )
    _assert_same(read_adapter_dir(out).tensors, expected)
    report = json.loads((out / cli.REPORT_FILE).read_text())
    assert report["hyperparameters_given"] == {"keep_ratio": 0.5, "fuse_weight": [1.0, 2.0, 3.0]}
    assert report["weights"] == [10.0, 20.0, 30.0]


@pytest.mark.parametrize(
    ("options", "method", "hyperparameters"),
    [
        (["--method", "fedavg"], "fedavg", {}),
        (["--mode", "paper-equation", "--scale-quantile", "0.5"], "robustmerge",
         {"mode": "paper-equation", "scale_quantile": 0.5}),
        (["--method", "ties", "--keep-ratio", "0.3", "--fuse-weight", "1.5"], "ties",
         {"keep_ratio": 0.3, "fuse_weight": 1.5}),
    ],
)  # fmt: skip
def test_cli_passes_only_given_hyperparameters(
    synthetic_adapter: SyntheticFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    method: str,
    hyperparameters: dict[str, Any],
) -> None:
    folders = [synthetic_adapter(f"c{seed}", seed=seed) for seed in range(3)]
    out = tmp_path / "out"
    assert cli.main(["merge", *map(str, folders), "--out", str(out), *options]) == 0
    expected = merge_lora(_inputs(folders), method, **hyperparameters)
    _assert_same(read_adapter_dir(out).tensors, expected)
    report = json.loads((out / cli.REPORT_FILE).read_text())
    assert report["method"] == method
    if hyperparameters.get("mode") == "paper-equation":
        assert 0 < report["relative_error"] < 1
        assert len(report["relative_errors"]) == 4  # one per LoRA module


def test_cli_reads_a_legacy_bin(synthetic_adapter: SyntheticFactory, tmp_path: Path) -> None:
    first = synthetic_adapter("first", seed=0)
    legacy = synthetic_adapter("legacy", seed=1)
    (legacy / ADAPTER_WEIGHTS).unlink()
    torch.save(synthetic_tensors(1), legacy / LEGACY_WEIGHTS)
    out = tmp_path / "out"
    assert cli.main(["merge", str(first), str(legacy), "--out", str(out)]) == 0
    report = json.loads((out / cli.REPORT_FILE).read_text())
    assert report["inputs"][1]["weights_file"] == LEGACY_WEIGHTS
    expected = merge_lora([synthetic_tensors(0), synthetic_tensors(1)])
    _assert_same(read_adapter_dir(out).tensors, expected)


def test_overwrite_replaces_an_earlier_output(
    synthetic_adapter: SyntheticFactory, tmp_path: Path
) -> None:
    folders = [str(synthetic_adapter(f"c{seed}", seed=seed)) for seed in range(2)]
    out = str(tmp_path / "out")
    assert cli.main(["merge", *folders, "--out", out, "--method", "fedavg"]) == 0
    assert cli.main(["merge", *folders, "--out", out, "--overwrite"]) == 0
    assert json.loads((Path(out) / cli.REPORT_FILE).read_text())["method"] == "robustmerge"


def test_large_merges_report_progress_on_stderr(
    synthetic_adapter: SyntheticFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_commands, "PROGRESS_ABOVE_PARAMETERS", 10)
    folders = [str(synthetic_adapter(f"c{seed}", seed=seed)) for seed in range(2)]
    assert cli.main(["merge", *folders, "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "robustmerge-fl: merged 1/4 modules"
    assert lines[-1] == "robustmerge-fl: merged 4/4 modules"


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "merge" in capsys.readouterr().out
    assert cli.main(["merge", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--out", "--keep-ratio", "--scale-quantile", "--fuse-weight", "--weights"):
        assert flag in text
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "robustmerge-fl 0.1.0"


# ------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, no traceback, no output folder

Setup = Callable[[SyntheticFactory, Path], list[str]]


def _three(make: SyntheticFactory) -> list[str]:
    return [str(make(f"c{seed}", seed=seed)) for seed in range(3)]


def _with_odd_one(**options: Any) -> Setup:
    def setup(make: SyntheticFactory, tmp: Path) -> list[str]:
        return [str(make("c0", seed=0)), str(make("odd", seed=1, **options))]

    return setup


def _with_config(change: dict[str, Any]) -> Setup:
    def setup(make: SyntheticFactory, tmp: Path) -> list[str]:
        return [str(make("c0")), str(make("odd", config={**synthetic_config(), **change}))]

    return setup


def _with_tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Setup:
    def setup(make: SyntheticFactory, tmp: Path) -> list[str]:
        tensors = synthetic_tensors(1)
        change(tensors)
        return [str(make("c0")), str(make("odd", tensors=tensors))]

    return setup


def _with_file(name: str, content: bytes | None) -> Setup:
    def setup(make: SyntheticFactory, tmp: Path) -> list[str]:
        odd = make("odd", seed=1)
        if content is None:
            (odd / name).unlink()
        else:
            (odd / name).write_bytes(content)
        return [str(make("c0")), str(odd)]

    return setup


def _plain(options: list[str]) -> tuple[Setup, list[str]]:
    return (lambda make, tmp: _three(make)), options


A0 = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"


def _drop_key(tensors: dict[str, torch.Tensor]) -> None:
    del tensors["base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"]


def _add_nan(tensors: dict[str, torch.Tensor]) -> None:
    tensors[A0][1, 2] = float("nan")


BAD_INPUTS: dict[str, tuple[Setup, list[str], str]] = {
    "rank": (_with_odd_one(r=8), [], r"adapter folder '.*odd'.*r is 8 but .*'.*c0' has 4"),
    "alpha": (_with_odd_one(lora_alpha=32), [], r"odd.*lora_alpha is 32 but .*c0' has 8"),
    "targets": (
        _with_odd_one(targets=("query", "key")),
        [],
        r"odd.*target_modules is \['query', 'key'\] but",
    ),
    "base model": (_with_odd_one(base="bert-large"), [], r"base_model_name_or_path is 'bert-l"),
    "missing key": (_with_tensors(_drop_key), [], r"odd.*layer\.1\.attention\.self\.value\.lora_B"),
    "nan": (_with_tensors(_add_nan), [], r"adapter folder 'odd', key '.*query\.lora_A.*NaN"),
    "no config": (_with_file(ADAPTER_CONFIG, None), [], r"odd', adapter_config\.json: missing"),
    "no weights": (_with_file(ADAPTER_WEIGHTS, None), [], r"odd', adapter_model\.safetensors: m"),
    "garbled json": (_with_file(ADAPTER_CONFIG, b'{"r": 4,'), [], r"odd'.*not valid JSON"),
    "r as string": (_with_config({"r": "4"}), [], r"odd'.*field 'r' must be an integer > 0"),
    "targets as number": (_with_config({"target_modules": 5}), [], "field 'target_modules'"),
    "truncated weights": (
        _with_file(ADAPTER_WEIGHTS, b"\x10\x00"),
        [],
        r"odd'.*header too small \(the file is 2 bytes",
    ),
    "weights count": (*_plain(["--weights", "1,2"]), "--weights has 2 entries but 3 adapter"),
    "negative weight": (*_plain(["--weights", "1,-2,3"]), "entry 2 is -2; weights must be >= 0"),
    "zero weights": (*_plain(["--weights", "0,0,0"]), "--weights sum to zero"),
    "weights syntax": (*_plain(["--weights", "1;2;3"]), "argument --weights: expected comma-sep"),
    "weights nan": (*_plain(["--weights", "1,nan,2"]), "argument --weights: expected comma-sep"),
    "keep ratio high": (*_plain(["--keep-ratio", "1.5"]), r"--keep-ratio must be in \(0, 1\]"),
    "keep ratio zero": (*_plain(["--keep-ratio", "0"]), r"--keep-ratio must be in \(0, 1\]"),
    "keep ratio text": (*_plain(["--keep-ratio", "lots"]), "--keep-ratio: expected a number"),
    "scale quantile": (*_plain(["--scale-quantile", "1"]), r"--scale-quantile must be in \[0, 1\)"),
    "fuse weight count": (*_plain(["--fuse-weight", "1,2"]), "--fuse-weight has 2 entries but 3"),
    "mode": (*_plain(["--mode", "paper-ish"]), "--mode must be one of paper-exact, paper-equation"),
    "unknown method": (
        *_plain(["--method", "magic"]),
        re.escape("unknown merge method 'magic'; known methods: " + ", ".join(available_methods())),
    ),
    "flag for other method": (
        *_plain(["--method", "fedavg", "--keep-ratio", "0.3"]),
        re.escape("--keep-ratio does not apply to method 'fedavg' (it takes no hyperparameters)"),
    ),
    "device": (*_plain(["--device", "tpu"]), "expected auto, cpu, cuda or cuda:N, got 'tpu'"),
    "missing folder": (
        lambda make, tmp: [str(make("c0")), str(tmp / "nowhere")],
        [],
        r"nowhere': no such folder",
    ),
    "no subcommand": (lambda make, tmp: [], ["--out", "x"], "invalid choice|required"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_status_2(
    case: str,
    synthetic_adapter: SyntheticFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    setup, options, pattern = BAD_INPUTS[case]
    folders = setup(synthetic_adapter, tmp_path)
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = (["merge", *folders, "--out", str(out)] if folders else []) + options
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    _assert_one_error_line(captured.err, pattern)
    assert captured.out == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp folders either


def test_existing_out_is_refused_and_kept(
    synthetic_adapter: SyntheticFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = _three(synthetic_adapter)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["merge", *folders, "--out", str(out)]) == 2
    _assert_one_error_line(capsys.readouterr().err, "already exists .*pass --overwrite")
    assert cli.main(["merge", *folders, "--out", str(out), "--overwrite"]) == 2
    _assert_one_error_line(capsys.readouterr().err, "does not look like an adapter folder")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_out_under_a_file_is_refused_before_merging(
    synthetic_adapter: SyntheticFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = _three(synthetic_adapter)
    (tmp_path / "file").write_text("x")
    assert cli.main(["merge", *folders, "--out", str(tmp_path / "file" / "sub" / "out")]) == 2
    _assert_one_error_line(capsys.readouterr().err, "cannot be created: '.*file' is not a folder")


def test_out_may_not_be_an_input(
    synthetic_adapter: SyntheticFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = _three(synthetic_adapter)
    assert cli.main(["merge", *folders, "--out", folders[1], "--overwrite"]) == 2
    _assert_one_error_line(capsys.readouterr().err, "is also an input folder")
    assert read_adapter_dir(folders[1]).tensors.keys() == synthetic_tensors(1).keys()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present, so --device cuda works")
def test_cuda_without_a_gpu_is_refused_before_reading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["merge", str(tmp_path / "a"), "--out", str(tmp_path / "o"), "--device", "cuda"]
    assert cli.main(argv) == 2
    _assert_one_error_line(capsys.readouterr().err, "CUDA is not available")


def test_merge_engine_errors_name_the_folder_not_the_index() -> None:
    from strategies.merging import MergeInputError

    error = MergeInputError("weight must be a finite number >= 0, got -1.0", adapter=1)
    assert merge_error_message(error, ["a", "b"]).startswith("adapter folder 'b': weight")
    keyed = MergeInputError("bad", adapter="a", key="k")
    assert merge_error_message(keyed, ["a"]) == "adapter folder 'a', key 'k': bad"


def test_bad_input_in_a_subprocess_prints_no_traceback(
    synthetic_adapter: SyntheticFactory, tmp_path: Path
) -> None:
    odd = synthetic_adapter("odd")
    (odd / ADAPTER_WEIGHTS).write_bytes(b"\xff" * 64)
    script = Path(sys.executable).with_name("robustmerge-fl")  # the installed console script
    program = [str(script)] if script.exists() else [sys.executable, "-m", "strategies.cli"]
    done = subprocess.run(
        [*program, "merge", str(odd), "--out", str(tmp_path / "o")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    _assert_one_error_line(done.stderr, "header length field says")
    assert not (tmp_path / "o").exists()


def _assert_one_error_line(stderr: str, pattern: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("robustmerge-fl: error: "), stderr
    assert "Traceback" not in stderr
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


def test_warns_when_adapters_share_their_initial_a(
    synthetic_adapter: SyntheticFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shared = synthetic_tensors(0)
    folders = []
    for seed in (1, 2, 3):
        moved = {
            key: value + (0.01 if "lora_A" in key else 1.0) * synthetic_tensors(seed)[key]
            for key, value in shared.items()
        }
        folders.append(str(synthetic_adapter(f"s{seed}", tensors=moved)))
    assert cli.main(["merge", *folders, "--out", str(tmp_path / "a")]) == 0
    warning = capsys.readouterr().err
    assert "warning: the adapters' A factors are nearly the same" in warning
    assert "6 times one adapter's" in warning  # lambda 2 x 3 adapters
    # paper-equation applies lambda once: no warning; independent adapters: no warning
    assert (
        cli.main(["merge", *folders, "--out", str(tmp_path / "b"), "--mode", "paper-equation"]) == 0
    )
    independent = [str(synthetic_adapter(f"i{seed}", seed=seed)) for seed in (1, 2, 3)]
    assert cli.main(["merge", *independent, "--out", str(tmp_path / "c")]) == 0
    assert "warning" not in capsys.readouterr().err
