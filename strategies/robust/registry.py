"""The run-config names of the robust options (the registered defences) and their checked
parameters.

Each ``robust-aggregation`` value names a defence registered with
``strategies.robust.stage.register_defence``; the built-ins (``strategies.robust.defences``)
are norm, none, krum, trimmed-mean, median and centered-clip. ``RobustSettings`` validates the
name against the registry and answers what the round runs by asking the defence.

The default, ``"auto"``, is not a defence but a choice made once at start-up
(``RobustSettings.resolve``): centered clipping, which held every adaptive attack measured at
1 hostile site of 4 (docs/failures.md), wherever a round can rewrite the clients' deltas, and
the norm screen alone where it cannot (the sparse uplink, mixed ranks, secure aggregation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from strategies.robust.defences import BUILTIN_DEFENCES, CoordinateClamp
from strategies.robust.stage import Stage, available_defences, get_defence
from workload.config import schema_default

# The built-in names (a defence registered later is accepted too: ``available_defences``).
ROBUST_AGGREGATIONS = BUILTIN_DEFENCES
# The default's value: resolved at start-up to AUTO_DEFENCE, or to AUTO_FALLBACK where a
# coordinate rewrite cannot run (``RobustSettings.resolve``).
AUTO = "auto"
AUTO_DEFENCE = "centered-clip"
AUTO_FALLBACK = "norm"


def aggregation_choices() -> tuple[str, ...]:
    """What ``robust-aggregation`` accepts: "auto", then every registered defence."""
    return (AUTO, *available_defences())


# With the default reject, an outsized update leaves the round and the global moves as the good
# clients alone move it. A clipped update (robust-clip) keeps at most factor x the reference norm;
# averaged with T - 1 good updates whose norms are about the reference and whose directions
# differ (every client a different task), the step is at most about
# (T - 1) / T x (1 + factor / sqrt(T - 1)) times the good clients' own: 5.5 at T = 2 for a factor
# of 10, so the "no more than 10 times as far" holds in both modes. Honest clients whose
# norms differ by up to 10x from the median are not touched.
DEFAULT_NORM_FACTOR = schema_default("robust-norm-factor", float)
# Accepted norms remembered across rounds (about 8 rounds of 8 clients).
DEFAULT_HISTORY = schema_default("robust-history", int)
DEFAULT_TRIM_FRACTION = schema_default("robust-trim-fraction", float)
# Replies a first round (no history) holds back to screen against their own median before it
# streams the rest (``strategies.robust.round_pool``): the lower median of 8 (the 4th smallest)
# stays an honest norm while at most 4 of them are outsized (a quarter of 16 sites, all among
# the first 8, still cannot raise it); it is the diagnostics sample's size, and 8 held adapters
# plus the exact sums (4) and the global stay under 16.
DEFAULT_POOL = schema_default("robust-pool", int)


@dataclass(frozen=True)
class RobustSettings:
    """The robust options of a run (run-config keys ``robust-*``, whose schema holds the
    defaults), checked on construction.

    ``krum_select`` 0 means T - f (every reply but the f assumed malicious).
    """

    aggregation: str = schema_default("robust-aggregation", str)
    norm_factor: float = DEFAULT_NORM_FACTOR
    clip: bool = schema_default("robust-clip", bool)
    history: int = DEFAULT_HISTORY
    krum_malicious: int = schema_default("robust-krum-malicious", int)
    krum_select: int = schema_default("robust-krum-select", int)
    trim_fraction: float = DEFAULT_TRIM_FRACTION
    pool: int = DEFAULT_POOL
    # Set by ``resolve`` when the defence was chosen by "auto": why this one.
    chosen_by_auto: str | None = None

    def __post_init__(self) -> None:
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """Why these settings are invalid (naming the run-config key), or None."""
        known = aggregation_choices()
        if self.aggregation not in known:
            got = self.aggregation
            return f"robust-aggregation must be one of {', '.join(known)}; got {got!r}"
        if not (math.isfinite(self.norm_factor) and self.norm_factor >= 1.0):
            return f"robust-norm-factor must be a finite number >= 1, got {self.norm_factor}"
        if self.history < 0:
            return f"robust-history must be >= 0, got {self.history}"
        if self.pool < 2:
            return f"robust-pool must be >= 2 (a median needs two norms), got {self.pool}"
        if self.krum_malicious < 0 or self.krum_select < 0:
            return "robust-krum-malicious and robust-krum-select must be >= 0"
        if not 0.0 <= self.trim_fraction < 0.5:
            return f"robust-trim-fraction must be in [0, 0.5), got {self.trim_fraction}"
        return None

    def resolve(
        self,
        *,
        uplink: str = "dense",
        mixes_ranks: bool = False,
        secure_aggregation: bool = False,
    ) -> RobustSettings:
        """These settings with "auto" replaced by the defence it stands for here (others are
        returned as they are): centered clipping where the round sees every client's dense
        update at one rank, else the norm screen, with ``chosen_by_auto`` saying why."""
        if self.aggregation != AUTO:
            return self
        blocker = None
        if secure_aggregation:
            blocker = "secure aggregation shows the server only the sum of the updates"
        elif uplink != "dense":
            blocker = f"uplink {uplink!r} sends deltas the clients already pruned"
        elif mixes_ranks:
            blocker = "client-ranks mixes LoRA ranks, whose factors do not line up"
        if blocker is None:
            why = "every client's dense update at one rank reaches the server"
            return replace(self, aggregation=AUTO_DEFENCE, chosen_by_auto=why)
        why = f"centered clipping cannot run here: {blocker}"
        return replace(self, aggregation=AUTO_FALLBACK, chosen_by_auto=why)

    @property
    def defence(self) -> Stage:
        """The registered defence ``aggregation`` names: what the round runs (ValueError for
        an unresolved "auto": ``resolve`` first)."""
        if self.aggregation == AUTO:
            raise ValueError(
                "robust-aggregation 'auto' is chosen at start-up: call RobustSettings.resolve "
                "with the round's uplink, ranks and secure-aggregation setting first"
            )
        return get_defence(self.aggregation)

    @property
    def screens(self) -> bool:
        """Whether the norm screen runs (every built-in but "none")."""
        return self.defence.screens

    @property
    def selects(self) -> bool:
        """Whether a selection stage (multi-Krum) runs."""
        return self.defence.selects

    @property
    def rewrites_coordinates(self) -> bool:
        """Whether a stage rewrites each client's delta from all of them (the coordinate-wise
        clamp or centered clipping): it needs every reply at once and dense deltas of one
        shape."""
        return self.defence.rewrites_coordinates

    @property
    def clips_to_center(self) -> bool:
        """Whether the rewrite is centered clipping (instead of the coordinate-wise clamp)."""
        return self.defence.clips_to_center

    @property
    def trim_fraction_or_median(self) -> float | None:
        """The trim fraction for ``trim_count`` (None: the median)."""
        defence = self.defence
        if isinstance(defence, CoordinateClamp):
            return defence.fraction(self)
        return self.trim_fraction

    def describe(self) -> str:
        """One line for the start-up summary: the screen, then the defence's own clause."""
        clause = self.defence.clause(self)
        name = self.aggregation
        if self.chosen_by_auto is not None:
            name = f"{name} (chosen by 'auto': {self.chosen_by_auto})"
        if not self.screens:
            return f"{name} (no norm screen, {clause or 'no robust stage'})"
        action = "clip" if self.clip else "reject"
        text = f"{name}: norm screen {self.norm_factor:g} x median, {action}"
        return f"{text}; {clause}" if clause else text
