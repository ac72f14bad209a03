"""A site's own data file: the documented JSONL and CSV schemas, and clear errors for bad files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from workload.tasks import load_data_file


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n", encoding="utf-8")
    return path


def test_jsonl(tmp_path: Path) -> None:
    records = [
        {"text": "where is my new card", "label": "card_arrival", "id": 1},
        {"text": "I want my money back", "label": "request_refund"},
        {"text": "card still not here", "label": "card_arrival"},
    ]
    data = load_data_file(write_jsonl(tmp_path / "site.jsonl", records))
    assert data.name == "site"
    assert data.texts == ["where is my new card", "I want my money back", "card still not here"]
    assert data.label_names == ["card arrival", "request refund"]
    assert data.labels == [0, 1, 0]


def test_jsonl_blank_lines_and_integer_labels_sorted_numerically(tmp_path: Path) -> None:
    path = tmp_path / "site.jsonl"
    path.write_text(
        '{"text": "a", "label": 10}\n\n{"text": "b", "label": 2}\n   \n{"text": "c", "label": 2}\n',
        encoding="utf-8",
    )
    data = load_data_file(path)
    assert data.label_names == ["2", "10"]
    assert data.labels == [1, 0, 0]


def test_csv_with_extra_columns_and_quoted_fields(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    path.write_text(
        'id,label,text\n1,SportsNews,"goal, then another goal"\n2,weather,"rain\ntomorrow"\n',
        encoding="utf-8",
    )
    data = load_data_file(path)
    assert data.texts == ["goal, then another goal", "rain tomorrow"]
    assert data.label_names == ["sports news", "weather"]
    assert data.labels == [0, 1]


def test_colliding_readable_names_keep_the_raw_labels(tmp_path: Path) -> None:
    records = [{"text": "x", "label": "a_b"}, {"text": "y", "label": "a-b"}]
    data = load_data_file(write_jsonl(tmp_path / "site.jsonl", records))
    assert data.label_names == ["a-b", "a_b"]


def test_limit_is_balanced_and_seeded(tmp_path: Path) -> None:
    records = [{"text": f"text {i}", "label": "ab"[i % 4 == 0]} for i in range(40)]
    path = write_jsonl(tmp_path / "site.jsonl", records)
    data = load_data_file(path, limit=10, seed=1)
    assert Counter(data.labels) == {0: 5, 1: 5}
    assert load_data_file(path, limit=10, seed=1) == data


def test_changed_file_is_read_again(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "site.jsonl", [{"text": "a", "label": "x"}])
    assert load_data_file(path).texts == ["a"]
    write_jsonl(path, [{"text": "a", "label": "x"}, {"text": "bb", "label": "y"}])
    assert load_data_file(path).texts == ["a", "bb"]


BAD_JSONL = [
    ('{"text": "ok", "label": "x"}\n{"text": "broken", \n', r"line 2: not valid JSON"),
    ('["text", "label"]\n', r"line 1: expected a JSON object"),
    ('{"text": "ok", "label": "x"}\n{"text": "no label"}\n', r"line 2: missing field 'label'"),
    ('{"label": "x"}\n', r"line 1: missing field 'text'"),
    ('{"text": "", "label": "x"}\n', r"line 1: 'text' must be a non-empty string"),
    ('{"text": 5, "label": "x"}\n', r"line 1: 'text' must be a non-empty string"),
    ('{"text": "ok", "label": true}\n', r"line 1: 'label' must be a string or an integer"),
    ('{"text": "ok", "label": 1.5}\n', r"line 1: 'label' must be a string or an integer"),
    ('{"text": "ok", "label": " "}\n', r"line 1: 'label' must not be empty"),
    ("\n\n", r"holds no examples"),
]


@pytest.mark.parametrize(("content", "message"), BAD_JSONL)
def test_bad_jsonl(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        load_data_file(path)
    assert "bad.jsonl" in str(caught.value)


BAD_CSV = [
    ("", r"is empty"),
    ("text,category\nhello,x\n", r"line 1: the header lacks the column 'label'"),
    ("text,label\nhello,x\nhello,x,extra\n", r"line 3: expected 2 fields"),
    ("text,label\n,x\n", r"line 2: 'text' must be a non-empty string"),
    ("text,label\n", r"holds no examples"),
]


@pytest.mark.parametrize(("content", "message"), BAD_CSV)
def test_bad_csv(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        load_data_file(path)
    assert "bad.csv" in str(caught.value)


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"nowhere\.jsonl.*does not exist"):
        load_data_file(tmp_path / "nowhere.jsonl")


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "site.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ValueError, match=r"site\.parquet.*unsupported suffix"):
        load_data_file(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncafé,x\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv.*not valid UTF-8"):
        load_data_file(path)
