"""CheckpointStore's promises checked one by one (server.checkpoints): the layout and the exact
state.json, which folders count as rounds, load's exact refusals, the warnings of latest_valid
and of the model-card check, save_final and pruning (docs/development.md, "Mutation testing")."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch

from server.checkpoints import STATE_FILE, CheckpointStore, tensors_checksum
from server.model_card import CARD_FILE
from strategies.adapter_io.config import adapter_config_for
from strategies.adapter_io.errors import AdapterFileError
from strategies.adapter_io.layout import ADAPTER_CONFIG
from strategies.adapter_io.reading import read_adapter_dir
from tests.server.test_checkpoints import adapter, store

CARD = "# Model card\n\nRound 3 of a run, with a non-ASCII letter: é.\n"


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The formatted text of every WARNING record captured."""
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def same_tensors(left: dict[str, torch.Tensor], right: dict[str, torch.Tensor]) -> bool:
    """The same keys with equal tensors."""
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


# --- layout and state.json


def test_default_keep_is_three(tmp_path: Path) -> None:
    """Without ``keep`` the three newest checkpoints stay."""
    checkpoints = CheckpointStore(tmp_path, adapter_config_for("tiny", 4, 8, ["query"]))
    assert checkpoints.keep == 3
    for server_round in range(1, 6):
        checkpoints.save(server_round, adapter(server_round), {})
    assert checkpoints.rounds() == [3, 4, 5]


def test_layout_under_the_run_folder(tmp_path: Path) -> None:
    """run_dir is kept; round 3 is written to run_dir/checkpoints/round-0003."""
    checkpoints = store(tmp_path)
    assert checkpoints.run_dir == tmp_path
    assert checkpoints.checkpoint_dir == tmp_path / "checkpoints"
    expected = tmp_path / "checkpoints" / "round-0003"
    assert checkpoints.round_path(3) == expected
    assert checkpoints.save(3, adapter(3), {}) == expected
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-0003"]
    assert same_tensors(read_adapter_dir(expected).tensors, adapter(3))


def test_state_json_text_is_exact(tmp_path: Path) -> None:
    """state.json is json.dumps(payload, indent=1, sort_keys=True) with format 1 and the round."""
    checkpoints = store(tmp_path)
    state = {"zeta": [1, {"b": 2, "a": 1}], "alpha": "first"}
    path = checkpoints.save(3, adapter(3), state)
    payload = {
        "alpha": "first",
        "format": 1,
        "server-round": 3,
        "tensors-sha256": tensors_checksum(adapter(3)),
        "zeta": [1, {"a": 1, "b": 2}],
    }
    text = (path / STATE_FILE).read_text(encoding="utf-8")
    assert text == json.dumps(payload, indent=1, sort_keys=True)
    assert text.startswith('{\n "alpha": "first",\n "format": 1,\n')
    assert not (path / CARD_FILE).exists()


def test_the_card_and_its_digest_are_saved(tmp_path: Path) -> None:
    """README.md holds the card as UTF-8; state.json its SHA-256, in the exact text."""
    checkpoints = store(tmp_path)
    path = checkpoints.save(3, adapter(3), {"history": [1]}, card=CARD)
    digest = hashlib.sha256(CARD.encode("utf-8")).hexdigest()
    assert (path / CARD_FILE).read_bytes() == CARD.encode("utf-8")
    payload = {
        "format": 1,
        "history": [1],
        "model-card-sha256": digest,
        "server-round": 3,
        "tensors-sha256": tensors_checksum(adapter(3)),
    }
    assert (path / STATE_FILE).read_text(encoding="utf-8") == json.dumps(
        payload, indent=1, sort_keys=True
    )


def test_save_creates_missing_parents(tmp_path: Path) -> None:
    """A run folder whose parents do not exist yet is created."""
    run_dir = tmp_path / "not" / "yet" / "there"
    checkpoints = store(run_dir)
    path = checkpoints.save(1, adapter(1), {})
    assert path == run_dir / "checkpoints" / "round-0001"
    assert checkpoints.load(1).server_round == 1


def test_saving_a_round_again_replaces_it(tmp_path: Path) -> None:
    """A second save of the same round overwrites the first."""
    checkpoints = store(tmp_path)
    checkpoints.save(2, adapter(1), {"try": 1})
    checkpoints.save(2, adapter(2), {"try": 2})
    loaded = checkpoints.load(2)
    assert loaded.state["try"] == 2
    assert same_tensors(loaded.tensors, adapter(2))
    assert checkpoints.rounds() == [2]


@pytest.mark.parametrize("key", ["format", "server-round", "tensors-sha256", "model-card-sha256"])
def test_save_refuses_state_that_would_overwrite_the_stores_keys(tmp_path: Path, key: str) -> None:
    """A caller's state cannot replace the round, format or checksums a resume trusts; nothing is
    written and the earlier checkpoint stays the latest."""
    checkpoints = store(tmp_path)
    checkpoints.save(1, adapter(1), {"history": []})
    with pytest.raises(ValueError) as refused:
        checkpoints.save(2, adapter(2), {"history": [], key: "forged"})
    assert str(refused.value) == (
        f"checkpoint state for round 2 uses the store's own keys ['{key}']"
    )
    assert checkpoints.rounds() == [1]


# --- rounds()


def test_rounds_reads_only_round_folders(tmp_path: Path) -> None:
    """A file named round-0009, other folders and a round past 9999 are read right."""
    checkpoints = store(tmp_path, keep=10)
    checkpoints.save(3, adapter(3), {})
    checkpoints.save(12345, adapter(4), {})
    folder = tmp_path / "checkpoints"
    (folder / "round-0009").write_text("not a folder")
    (folder / "backup12345").mkdir()
    (folder / "round-x123").mkdir()
    (folder / "round-").mkdir()
    (folder / "notes").mkdir()
    assert (folder / "round-12345").is_dir()
    assert checkpoints.rounds() == [3, 12345]
    assert checkpoints.load(12345).server_round == 12345


def test_rounds_without_a_checkpoint_folder(tmp_path: Path) -> None:
    """No checkpoints folder yet: no rounds."""
    assert store(tmp_path).rounds() == []


# --- load()


def saved(tmp_path: Path, server_round: int = 2) -> tuple[CheckpointStore, Path]:
    """A store with one checkpoint of ``server_round`` (no card), and its folder."""
    checkpoints = store(tmp_path)
    return checkpoints, checkpoints.save(server_round, adapter(server_round), {"h": [1]})


def refusal(checkpoints: CheckpointStore, folder: Path, file: str | None) -> str:
    """The reason of load(2)'s AdapterFileError, after checking it names ``folder`` and
    ``file`` and reads as the error's whole message."""
    with pytest.raises(AdapterFileError) as caught:
        checkpoints.load(2)
    assert (caught.value.folder, caught.value.file) == (folder, file)
    where = f"adapter folder '{folder}'" + (f", {file}" if file is not None else "")
    assert str(caught.value) == f"{where}: {caught.value.reason}"
    return caught.value.reason


def test_load_refuses_state_that_is_not_json(tmp_path: Path) -> None:
    """Unparsable state.json: AdapterFileError naming the folder, state.json, the parse error."""
    checkpoints, path = saved(tmp_path)
    (path / STATE_FILE).write_text("not json")
    reason = "unreadable checkpoint state (Expecting value: line 1 column 1 (char 0))"
    assert refusal(checkpoints, path, STATE_FILE) == reason


def test_load_refuses_a_missing_state(tmp_path: Path) -> None:
    """No state.json: the OSError's text in the reason."""
    checkpoints, path = saved(tmp_path)
    (path / STATE_FILE).unlink()
    missing = f"[Errno 2] No such file or directory: '{path / STATE_FILE}'"
    assert refusal(checkpoints, path, STATE_FILE) == f"unreadable checkpoint state ({missing})"


@pytest.mark.parametrize("state", [[1, 2], {"server-round": 7}, "text", None])
def test_load_refuses_state_that_is_not_this_rounds_dict(tmp_path: Path, state: object) -> None:
    """A JSON list, another round's state (checksum right) or a scalar: not round 2's state."""
    checkpoints, path = saved(tmp_path)
    if isinstance(state, dict):
        written = json.loads((path / STATE_FILE).read_text())
        written.update(state)
        state = written
    (path / STATE_FILE).write_text(json.dumps(state))
    assert refusal(checkpoints, path, STATE_FILE) == "state does not describe round 2"


def test_load_refuses_a_checksum_mismatch(tmp_path: Path) -> None:
    """Tensors that do not match the recorded checksum: the folder named, no file."""
    checkpoints, path = saved(tmp_path)
    written = json.loads((path / STATE_FILE).read_text())
    written["tensors-sha256"] = tensors_checksum(adapter(9))
    (path / STATE_FILE).write_text(json.dumps(written))
    assert refusal(checkpoints, path, None) == "tensors do not match the checksum in state.json"


def test_load_returns_the_checkpoint(tmp_path: Path) -> None:
    """A sound checkpoint: its round, tensors, full state and folder."""
    checkpoints, path = saved(tmp_path)
    loaded = checkpoints.load(2)
    assert loaded.server_round == 2
    assert loaded.path == path
    assert same_tensors(loaded.tensors, adapter(2))
    assert loaded.state == {
        "format": 1,
        "h": [1],
        "server-round": 2,
        "tensors-sha256": tensors_checksum(adapter(2)),
    }


# --- latest_valid()


def test_latest_valid_warns_with_the_reason_and_falls_back(
    tmp_path: Path, flower_log: pytest.LogCaptureFixture
) -> None:
    """The skipped checkpoint is logged once, in these words, and the previous one is used."""
    checkpoints = store(tmp_path)
    checkpoints.save(1, adapter(1), {})
    path = checkpoints.save(2, adapter(2), {})
    (path / STATE_FILE).write_text("[]")
    latest = checkpoints.latest_valid()
    assert latest is not None and latest.server_round == 1
    assert warnings_of(flower_log) == [
        "checkpoint of round 2 is unusable, trying the previous one: "
        f"adapter folder '{path}', state.json: state does not describe round 2"
    ]


def test_latest_valid_with_every_checkpoint_unusable(
    tmp_path: Path, flower_log: pytest.LogCaptureFixture
) -> None:
    """All corrupt: None, one warning per round, newest first."""
    checkpoints = store(tmp_path)
    for server_round in (1, 2):
        path = checkpoints.save(server_round, adapter(server_round), {})
        (path / STATE_FILE).write_text("{}")
    assert checkpoints.latest_valid() is None
    assert [text.split(":")[0] for text in warnings_of(flower_log)] == [
        "checkpoint of round 2 is unusable, trying the previous one",
        "checkpoint of round 1 is unusable, trying the previous one",
    ]


# --- the model-card check on load


def test_no_card_digest_means_no_card_check(
    tmp_path: Path, flower_log: pytest.LogCaptureFixture
) -> None:
    """Saved without a card (no digest): no README.md and no warning on load."""
    checkpoints, path = saved(tmp_path)
    assert not (path / CARD_FILE).exists()
    assert checkpoints.load(2).server_round == 2
    assert warnings_of(flower_log) == []


def test_an_intact_card_passes_silently(
    tmp_path: Path, flower_log: pytest.LogCaptureFixture
) -> None:
    """The card as saved: no warning."""
    checkpoints = store(tmp_path)
    checkpoints.save(3, adapter(3), {}, card=CARD)
    loaded = checkpoints.load(3)
    assert loaded.state["model-card-sha256"] == hashlib.sha256(CARD.encode()).hexdigest()
    assert warnings_of(flower_log) == []


def test_an_edited_card_is_reported_and_the_checkpoint_used(
    tmp_path: Path, flower_log: pytest.LogCaptureFixture
) -> None:
    """A card edited after the run: the digest warning naming the card; the checkpoint loads."""
    checkpoints = store(tmp_path)
    path = checkpoints.save(3, adapter(3), {}, card=CARD)
    (path / CARD_FILE).write_text(CARD + "edited\n", encoding="utf-8")
    loaded = checkpoints.load(3)
    assert same_tensors(loaded.tensors, adapter(3))
    assert warnings_of(flower_log) == [
        f"{path / CARD_FILE} does not match the digest in state.json (edited after the run?); "
        "the checkpoint is still used"
    ]


def test_a_deleted_card_is_reported_and_the_checkpoint_used(
    tmp_path: Path, flower_log: pytest.LogCaptureFixture
) -> None:
    """A card deleted after the run: the unreadable warning with the OSError; it loads."""
    checkpoints = store(tmp_path)
    path = checkpoints.save(3, adapter(3), {}, card=CARD)
    card = path / CARD_FILE
    card.unlink()
    assert checkpoints.load(3).server_round == 3
    assert warnings_of(flower_log) == [
        f"{card}: model card unreadable ([Errno 2] No such file or directory: '{card}'); "
        "the checkpoint is still used"
    ]


# --- save_final()


def test_save_final_writes_the_adapter_report_and_card(tmp_path: Path) -> None:
    """final/ holds the adapter, run_report.json (exact JSON text) and the card as README.md."""
    checkpoints = store(tmp_path / "run")
    report = {"zeta": 2, "alpha": {"y": [1, 2], "x": None}}
    path = checkpoints.save_final(adapter(7), report, card=CARD)
    assert path == tmp_path / "run" / "final"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final"]
    text = (path / "run_report.json").read_text(encoding="utf-8")
    assert text == json.dumps(report, indent=1, sort_keys=True)
    assert text.startswith('{\n "alpha": {\n  "x": null,')
    assert (path / CARD_FILE).read_bytes() == CARD.encode("utf-8")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    assert same_tensors(read_adapter_dir(path).tensors, adapter(7))


def test_save_final_without_a_card_and_again(tmp_path: Path) -> None:
    """No card: no README.md; a second save_final replaces the first."""
    checkpoints = store(tmp_path)
    checkpoints.save_final(adapter(1), {"run": 1}, card=CARD)
    path = checkpoints.save_final(adapter(2), {"run": 2})
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [ADAPTER_CONFIG, "adapter_model.safetensors", "run_report.json"]
    )
    assert json.loads((path / "run_report.json").read_text()) == {"run": 2}
    assert same_tensors(read_adapter_dir(path).tensors, adapter(2))


# --- pruning


class Haunted(CheckpointStore):
    """Lists a round 0 whose folder is gone (as if removed by someone else meanwhile)."""

    def rounds(self) -> list[int]:
        return [0, *super().rounds()]


def test_prune_survives_a_round_folder_that_vanished(tmp_path: Path) -> None:
    """Pruning a listed round with no folder does not fail the save."""
    checkpoints = Haunted(tmp_path, adapter_config_for("tiny", 4, 8, ["query"]), keep=1)
    checkpoints.save(1, adapter(1), {})
    checkpoints.save(2, adapter(2), {})
    assert checkpoints.rounds() == [0, 2]
    assert not checkpoints.round_path(1).exists()
