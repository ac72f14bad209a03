"""Every measured figure in README.md and docs/*.md has a source (issue 29, item 3).

Three guards:

- **Per section.** A Markdown section (the text under one heading) that states a measured
  figure (a decimal percentage, an ``N x faster``-style ratio, a time in s / ms, a size in
  MB / MiB / GiB / GB, or a table row of decimal numbers) names where it comes from: a
  ``benchmarks/results/`` file, a benchmark script or a test, or says plainly that the figure is
  ``not reproducible`` / ``not measured``. Sections whose figures are arithmetic rather than
  measurements are listed in ``DERIVED`` with the reason.
- **Cited paths exist.** Every ``benchmarks/...`` or ``tests/...py`` path a page names is on disk.
- **Headline figures match their source.** ``FIGURES`` pins the README's figures (and the ones
  the docs repeat) to the text of the result file that produced them, so a rerun that changes
  a result without the docs (or the reverse) fails here.

And the DARE text: no page says dare's drop is seeded by the client's position (the round form
seeds it by the content of each client's own tensor, ``drop_each_by_content``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FIGURE = re.compile(
    r"\d+\.\d+ ?%"  # a decimal percentage
    r"|\d+(?:\.\d+)? ?x (?:faster|slower|less|more)\b"  # 2.45x faster
    r"|\d+(?:\.\d+)? times (?:faster|slower)\b"
    r"|\b\d+(?:\.\d+)? ?(?:ms|MB|MiB|GiB|GB)\b"  # sizes and milliseconds
    r"|\b\d+\.\d+ s\b"  # seconds with a decimal
    r"|^\|(?:[^|\n]*\|)*\s*\d+\.\d+\s*\|(?:[^|\n]*\|)*\s*\d+\.\d+\s*\|",  # a table row, 2 decimals
    re.MULTILINE,
)
SOURCE = re.compile(
    r"benchmarks/results/[\w.{},-]+|benchmarks/\w+\.(?:py|sh)|python -m benchmarks\.\w+"
    r"|tests/[\w/]+\.py|not reproducible|not measured"
)
PATH = re.compile(
    r"(?:benchmarks|tests)/[\w/.-]*\.(?:md|json|png|py|sh)|benchmarks/results/[\w.-]+\{[\w,]+\}"
)

# (page, heading) -> why its figures need no result file: they are arithmetic, not measured.
DERIVED = {
    ("docs/algorithm.md", "Step 1: prune"): "the kept fraction follows from rho (arithmetic)",
}

# (page, figure as the page states it, result file, text that file must contain)
FIGURES = [
    (
        "README.md",
        "12 adapters",
        "benchmarks/results/scale.md",
        "| 1024 | stream | 2 (history) | 120.9 | 12.1 |",
    ),
    (
        "README.md",
        "took 141",
        "benchmarks/results/scale.md",
        "| 128 | list | 2 (history) | 1406.0 | 140.7 |",
    ),
    (
        "README.md",
        "27 % of the dense bytes",
        "benchmarks/results/uplink_bytes.md",
        "| 81,740 | 27.3% |",
    ),
    (
        "docs/index.md",
        "27 % of the dense bytes",
        "benchmarks/results/uplink_bytes.md",
        "| 81,740 | 27.3% |",
    ),
    ("docs/privacy.md", "**27.3 %**", "benchmarks/results/uplink_bytes.md", "| 81,740 | 27.3% |"),
    ("README.md", "61.5 % seen accuracy", "benchmarks/results/ranks.md", "| 61.5 / 68.8 | 456 s |"),
    (
        "README.md",
        "63.7 % with every site at 16",
        "benchmarks/results/ranks.md",
        "| 63.7 / 69.8 | 456 s |",
    ),
    ("README.md", "59.5 % with HetLoRA", "benchmarks/results/ranks.md", "| 59.5 / 69.8 | 346 s |"),
    (
        "README.md",
        "| 64.7 | 65.9 | 65.3 |",
        "benchmarks/results/quality.md",
        "| fedavg (FedIT) | 3 | 64.7 |",
    ),
    (
        "README.md",
        "65.0 (+0.3 [-0.9, +1.6])",
        "benchmarks/results/quality.md",
        "| 3 | 65.0 | +0.3 [-0.9, +1.6] |",
    ),
    (
        "README.md",
        "64.4 (-1.5 [-2.0, -1.0]) loss",
        "benchmarks/results/quality.md",
        "| 3 | 64.4 | -1.5 [-2.0, -1.0] | loss |",
    ),
    (
        "README.md",
        "62.7 (-3.2 [-4.3, -2.2]) loss",
        "benchmarks/results/quality.md",
        "| 3 | 62.7 | -3.2 [-4.3, -2.2] | loss |",
    ),
    (
        "docs/speed.md",
        "| 1.06 s | 2.59 s | 0.60 s | 2.45x faster |",
        "benchmarks/results/merge_speed_cpu.md",
        "2.45x faster",
    ),
    (
        "docs/speed.md",
        "| 1.10 s | 4.52 s | 0.57 s | 4.11x faster |",
        "benchmarks/results/merge_speed_cpu.md",
        "4.11x faster",
    ),
    (
        "docs/strategy.md",
        "| 128 | 12.1 | 140.7 | 131.7 |",
        "benchmarks/results/scale.md",
        "| 128 | 12.1 | 140.7 | 131.7 |",
    ),
    (
        "docs/failures.md",
        "seen 12.2 % and 8.6 %",
        "benchmarks/results/attacks.md",
        "| scaled-x1000 | 8.6 / 5.2 (-56.0)",
    ),
    ("docs/failures.md", "2,441 MiB", "benchmarks/results/strategy_memory_cpu.md", "| 2441 |"),
    (
        "README.md",
        "66.0 % to 18.0 % (-48.0 [-54.0, -43.5], 3 seeds)",
        "benchmarks/results/attacks-adaptive.md",
        "| 1-of-4 | norm | under-bound-reversed | norm/none | 3 | 18.0 (-48.0 [-54.0, -43.5])",
    ),
    (
        "README.md",
        "9.5 adapters of peak memory at 16 replies,",
        "benchmarks/results/scale.md",
        "| default | 16 | 1 | 95.2 | 9.5 |",
    ),
    (
        "README.md",
        "10.1 at 128)",
        "benchmarks/results/scale.md",
        "| default | 128 | 1 | 100.7 | 10.1 |",
    ),
    (
        "README.md",
        "shared-a +7.0 [+4.6, +9.7] points after round 1",
        "benchmarks/results/personalization.md",
        "| 1 | shared-a (FedSA-LoRA, fedavg A) | 2 | 0.701 | +0.070 [+0.046, +0.097] | win |",
    ),
]


def _rel(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def _sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of each section (level 1-3; a level-4 heading stays in its parent),
    fenced code blocks left out."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    parts = re.split(r"^#{1,3} +(.+)$", text, flags=re.MULTILINE)
    sections = [("", parts[0])]
    sections += [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]
    return sections


def _expand(path: str) -> list[str]:
    match = re.match(r"(.*)\{([\w,]+)\}$", path)
    if match is None:
        return [path]
    return [match.group(1) + ext for ext in match.group(2).split(",")]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_measured_figure_has_a_source(page: Path) -> None:
    unsourced = []
    for heading, body in _sections(page.read_text()):
        figures = FIGURE.findall(body)
        if not figures or (_rel(page), heading) in DERIVED or SOURCE.search(body):
            continue
        unsourced.append(f"{heading or '(top)'}: {figures[:3]}")
    assert not unsourced, (
        f"{_rel(page)}: sections with measured figures and no source (name the "
        f"benchmarks/results file or test, or say 'not reproducible'): {unsourced}"
    )


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_cited_sources_exist(page: Path) -> None:
    cited = {p for raw in PATH.findall(page.read_text()) for p in _expand(raw)}
    missing = sorted(p for p in cited if not (ROOT / p).exists())
    assert not missing, f"{_rel(page)} cites files that are not in the repository: {missing}"


@pytest.mark.parametrize(("page", "figure", "source", "evidence"), FIGURES)
def test_headline_figures_match_their_source(
    page: str, figure: str, source: str, evidence: str
) -> None:
    assert figure in (ROOT / page).read_text(), f"{page} no longer states {figure!r}"
    assert evidence in (ROOT / source).read_text(), (
        f"{source} no longer holds {evidence!r}, which {page}'s {figure!r} comes from"
    )


def test_derived_sections_exist() -> None:
    """The allow-list names live sections only, so it cannot outlive the text it excuses."""
    stale = [
        key
        for key in DERIVED
        if key[1] not in {heading for heading, _ in _sections((ROOT / key[0]).read_text())}
    ]
    assert not stale, f"DERIVED names sections that no longer exist: {stale}"


def test_dare_seeding_text_matches_the_code() -> None:
    code = (ROOT / "strategies" / "merging" / "dare.py").read_text()
    assert "drop_each_by_content(a_stack" in code, "dare's round form no longer seeds by content"
    position = re.compile(r"seeded by (?:the client's|its) position", re.IGNORECASE)
    for page in PAGES:
        for line in page.read_text().splitlines():
            if "dare" in line.lower() or "drop" in line.lower():
                assert not position.search(line), f"{_rel(page)}: {line.strip()}"
    algorithm = (ROOT / "docs" / "algorithm.md").read_text()
    strategy = (ROOT / "docs" / "strategy.md").read_text()
    assert "digest of the content of its\nown tensor" in algorithm
    assert "a digest of that client's own tensor" in strategy
