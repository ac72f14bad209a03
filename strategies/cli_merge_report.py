"""``merge_report.json``: what went into a ``robustmerge-fl merge`` and what came out.

Written next to the merged adapter so it can be traced back to what made it: the inputs with
the sha256 of each weights file, method, hyperparameters (as resolved and as given), weights,
device, time, truncation error and the robustmerge-fl version.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from strategies.adapter_io.layout import AdapterFolder
from strategies.audit import package_version
from strategies.merging import MergeReport

REPORT_FILE = "merge_report.json"


def merge_report(
    folders: Sequence[AdapterFolder],
    labels: Sequence[str],
    method: str,
    given: dict[str, Any],
    weights: Sequence[float] | None,
    merge: MergeReport,
) -> dict[str, Any]:
    """What went into the merge and what came out, for ``merge_report.json``."""
    described = {key: _plain(value) for key, value in merge.method.items() if key != "method"}
    return {
        "robustmerge_fl_version": package_version(),
        "created_unix": time.time(),
        "method": method,
        "hyperparameters": described,
        "hyperparameters_given": {key: _plain(value) for key, value in given.items()},
        "weights": list(weights) if weights is not None else None,
        "device": merge.device,
        "seconds": merge.seconds,
        "relative_error": merge.relative_error,
        "relative_errors": dict(merge.relative_errors),
        "inputs": [
            {
                "label": label,
                "folder": str(folder.path),
                "weights_file": folder.weights_file.name if folder.weights_file else None,
                "sha256": _sha256(folder.weights_file) if folder.weights_file else None,
                "base_model_name_or_path": folder.config.get("base_model_name_or_path"),
            }
            for label, folder in zip(labels, folders, strict=True)
        ],
    }


def _plain(value: object) -> object:
    """A tuple (per-adapter fuse weights) as a list, as JSON writes it anyway."""
    return list(value) if isinstance(value, tuple) else value


def _sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in 1 MiB blocks (weights files can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
