"""Concatenates docs/parts/*.md (in name order, with the fixed order below first) into README.md."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = [
    "00-head.md",
    "10-run.md",
    "20-strategy.md",
    "30-failures.md",
    "40-engine.md",
    "speed.md",
    "cli.md",
    "client.md",
    "causal-lm.md",
    "deploy.md",
    "privacy.md",
    "quality.md",
    "90-dev.md",
]


def main() -> None:
    """Write README.md."""
    (ROOT / "README.md").write_text(expected_readme())


def render(parts: Path, names: list[str]) -> str:
    """The README text: a generated-file note after the title, then every part."""
    texts = [(parts / name).read_text().strip() for name in names]
    title, _, rest = texts[0].partition("\n")
    note = "<!-- Generated from docs/parts/*.md by scripts/build_readme.py: edit the parts. -->"
    return "\n\n".join([f"{title}\n{note}\n{rest.strip()}", *texts[1:]]) + "\n"


def expected_readme() -> str:
    """What README.md must hold (tests compare)."""
    parts = ROOT / "docs" / "parts"
    names = [name for name in ORDER if (parts / name).exists()]
    names += sorted(p.name for p in parts.glob("*.md") if p.name not in ORDER)
    return render(parts, names)


if __name__ == "__main__":
    main()
