"""The default workload's tasks: every task and split loads, labels are readable and leak-free."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from workload.tasks import (
    SPLITS,
    TASK_NAMES,
    TaskData,
    balanced_subset,
    load_task,
    readable_label,
    split_holdout,
)

READABLE = re.compile(r"^[a-z0-9']+( [a-z0-9']+)*$")


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("task", TASK_NAMES)
def test_every_task_and_split_loads(task: str, split: str) -> None:
    data = load_task(task, split)
    assert data.name == task
    assert len(data.texts) == len(data.labels) > 0
    assert all(isinstance(text, str) and text and text == text.strip() for text in data.texts)
    assert all(0 <= label < len(data.label_names) for label in data.labels)
    # Train covers every class (label ids are shared by all splits, so dev may lack one).
    if split == "train":
        assert set(data.labels) == set(range(len(data.label_names)))


@pytest.mark.parametrize("task", TASK_NAMES)
def test_label_names_are_readable_unique_and_shared_by_splits(task: str) -> None:
    names = [load_task(task, split).label_names for split in SPLITS]
    assert names[0] == names[1] == names[2]
    assert len(set(names[0])) == len(names[0]) >= 3
    unreadable = [name for name in names[0] if not READABLE.match(name)]
    assert not unreadable, f"{task}: label names not readable: {unreadable}"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("card_arrival", "card arrival"),
        ("Refund_not_showing_up", "refund not showing up"),
        ("reverted_card_payment?", "reverted card payment"),
        ("NCAATeamSeason", "ncaa team season"),
        ("AcademicJournal", "academic journal"),
        ("Business & Finance", "business and finance"),
        ("visual-studio", "visual studio"),
        ("comp.sys.mac.hardware", "comp sys mac hardware"),
        ("  what is corona ", "what is corona"),
    ],
)
def test_readable_label(raw: str, expected: str) -> None:
    assert readable_label(raw) == expected


def test_readable_label_word_rewrites() -> None:
    words = {"iot": "smart home", "hue": "", "lightdim": "light dim"}
    assert readable_label("iot_hue_lightdim", words) == "smart home light dim"


def test_coded_labels_get_hand_written_names() -> None:
    assert "smart home light dim" in load_task("hwu64", "dev").label_names
    assert "mac hardware" in load_task("20ng", "dev").label_names
    assert "physician" in load_task("dbpedia", "dev").label_names
    assert "paid time off balance" in load_task("clinc150", "dev").label_names


@pytest.mark.parametrize("split", SPLITS)
def test_20ng_texts_do_not_name_their_newsgroup_up_front(split: str) -> None:
    data = load_task("20ng", split)
    assert not [text for text in data.texts if text.lower().startswith("newsgroup")]
    assert not [text for text in data.texts if text.lower().startswith("document_id")]
    assert not [text for text in data.texts if re.search(r"Newsgroups:\s*[a-z]+\.", text)]


def test_yahoo_and_dbpedia_escapes_are_undone() -> None:
    for task in ("yahoo", "dbpedia"):
        texts = load_task(task, "dev").texts
        assert not [text for text in texts if "\\n" in text or '\\"' in text]


def test_sentiment_splits_are_disjoint_and_about_80_10_10() -> None:
    texts = {split: set(load_task("sentiment", split).texts) for split in SPLITS}
    assert not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test"]
    assert not texts["dev"] & texts["test"]
    total = sum(len(part) for part in texts.values())
    assert 0.77 < len(texts["train"]) / total < 0.83
    assert load_task("sentiment", "train").label_names == ["negative", "neutral", "positive"]


@pytest.mark.parametrize(("task", "limit"), [("banking77", 512), ("sentiment", 512), ("mcid", 50)])
def test_limit_is_class_balanced(task: str, limit: int) -> None:
    data = load_task(task, "train", limit=limit, seed=3)
    counts = Counter(data.labels)
    assert len(data.texts) == limit
    assert len(counts) == min(limit, len(data.label_names))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_limit_is_seeded() -> None:
    first = load_task("banking77", "train", limit=64, seed=1)
    again = load_task("banking77", "train", limit=64, seed=1)
    other = load_task("banking77", "train", limit=64, seed=2)
    assert first == again
    assert first.texts != other.texts


def test_limit_when_a_class_runs_out() -> None:
    data = TaskData("toy", ["a1", "b1", "b2", "b3", "b4"], [0, 1, 1, 1, 1], ["a", "b"])
    subset = balanced_subset(data, 4, seed=0)
    assert Counter(subset.labels) == {0: 1, 1: 3}


def test_limit_at_least_the_split_keeps_everything_in_order() -> None:
    full = load_task("mcid", "dev")
    assert load_task("mcid", "dev", limit=10_000, seed=5) == full


@pytest.mark.parametrize("limit", [0, -3, True, 2.5])
def test_bad_limit(limit: object) -> None:
    with pytest.raises(ValueError, match="limit"):
        load_task("mcid", "dev", limit=limit)  # type: ignore[arg-type]


def test_unknown_task_or_split_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'trec'.*banking77.*sentiment"):
        load_task("trec", "train")
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*train, dev, test"):
        load_task("mcid", "validation")


def test_callers_get_fresh_lists() -> None:
    data = load_task("mcid", "dev")
    data.texts.clear()
    data.label_names.append("extra")
    again = load_task("mcid", "dev")
    assert again.texts
    assert "extra" not in again.label_names


def test_split_holdout_is_a_fixed_partition() -> None:
    data = load_task("mcid", "train")
    train, dev = split_holdout(data)
    again_train, again_dev = split_holdout(data)
    assert (train, dev) == (again_train, again_dev)
    assert len(dev.texts) == round(0.1 * len(data.texts))
    assert len(train.texts) + len(dev.texts) == len(data.texts)
    assert Counter(train.texts) + Counter(dev.texts) == Counter(data.texts)
    assert dev.label_names == train.label_names == data.label_names


def test_split_holdout_needs_two_examples() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        split_holdout(TaskData("one", ["a"], [0], ["x"]))
