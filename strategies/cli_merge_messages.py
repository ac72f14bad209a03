"""What ``robustmerge-fl merge`` prints while it works: progress lines, the shared-A warning,
and the method's name in the summary line.

Progress and warnings go to stderr, so stdout holds only the one summary line.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

import torch

from strategies.cli_errors import PROG
from strategies.merging.diagnostics import shared_a_similarity
from strategies.merging.method import MergeMethod

SHARED_A_SIMILARITY = 0.9
"""Cosine similarity of the adapters' A factors above which they count as one initialisation."""


def warn_shared_initialisation(
    adapters: Sequence[Mapping[str, torch.Tensor]], method: MergeMethod
) -> None:
    """A stderr warning when ``method`` sums lambda * A over adapters (``sums_scaled_a``) and
    their one initial A will blow up."""
    fuse = method.describe().get("fuse_weight", 1.0)
    weight = max(fuse) if isinstance(fuse, tuple) else fuse
    if not method.sums_scaled_a() or not isinstance(weight, float):
        return
    similarity = shared_a_similarity(adapters)
    if similarity is None or similarity < SHARED_A_SIMILARITY:
        return
    print(
        f"{PROG}: warning: the adapters' A factors are nearly the same (cosine {similarity:.2f}; "
        f"they share an initialisation, as federated clients' do), so the merged A is about "
        f"{weight * len(adapters):.3g} times one adapter's; on such adapters lambda = 2 fell "
        "below zero-shot in our benchmark: consider --fuse-weight 1 or --mode paper-equation "
        "(README: Quality)",
        file=sys.stderr,
        flush=True,
    )


def method_label(described: dict[str, object]) -> str:
    """The method as the summary line names it: ``robustmerge (paper-exact)``, ``ties``."""
    name = str(described.get("method", "?"))
    mode = described.get("mode")
    return f"{name} ({mode})" if mode else name


class MergeProgress:
    """Prints ``robustmerge-fl: merged i/n modules`` about every 10% of a large merge."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        decile = 10 * done // max(total, 1)
        if decile > self.last_decile:
            self.last_decile = decile
            print(f"{PROG}: merged {done}/{total} modules", file=self.stream, flush=True)
