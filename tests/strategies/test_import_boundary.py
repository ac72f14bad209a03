"""The merge math must import without Flower: a fresh interpreter imports it and checks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent(
    """
    import sys

    def flower_modules():
        return sorted(n for n in sys.modules if n == "flwr" or n.startswith("flwr."))

    import strategies.merging
    assert not flower_modules(), f"import strategies.merging loaded {flower_modules()[:5]}"

    import strategies.robust
    assert not flower_modules(), f"import strategies.robust loaded {flower_modules()[:5]}"

    import strategies
    from strategies import MergeInputError, merge_lora, merge_lora_with_report
    assert not flower_modules(), f"import strategies loaded {flower_modules()[:5]}"
    assert "strategies.fed_robustmerge" not in sys.modules, "the Flower strategy was imported"

    import torch
    adapter = {"m.lora_A.weight": torch.ones(1, 2), "m.lora_B.weight": torch.ones(2, 1)}
    merge_lora([adapter, adapter])
    assert not flower_modules(), f"merging loaded {flower_modules()[:5]}"
    print("ok")
    """
)


def test_merge_math_imports_without_flower() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "ok"
