"""The built-in robust defences (run-config ``robust-aggregation``), each a registered ``Stage``.

Every one but "none" runs the norm screen first (cheap, and it needs no tuning); then

- "norm": nothing more;
- "krum": a selection stage, multi-Krum (``strategies.robust.krum``), before the merge;
- "trimmed-mean", "median": each client's delta clamped, coordinate by coordinate, to the range
  the trimmed mean or the median trusts (``strategies.robust.coordinatewise``);
- "centered-clip": each client's delta pulled to within a robust radius of the coordinate-wise
  median (``strategies.robust.centered_clip``); a candidate default against adaptive attackers
  (issue 28), not the default.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from strategies.robust.centered_clip import DEFAULT_CENTER_RADIUS, center_scales, coordinate_median
from strategies.robust.coordinatewise import trim_count, trimmed_range
from strategies.robust.krum import multikrum_select, pairwise_squared_distances
from strategies.robust.stage import (
    Deltas,
    Rewrite,
    Rewrites,
    Stage,
    available_defences,
    joined,
    register_defence,
)

if TYPE_CHECKING:
    from strategies.robust.registry import RobustSettings


@register_defence("norm")
class NormScreen(Stage):
    """The norm screen alone (the default)."""


@register_defence("none")
class NoDefence(Stage):
    """No norm screen, no robust stage."""

    screens = False


@register_defence("krum")
class MultiKrum(Stage):
    """The norm screen, then multi-Krum: the replies whose updates lie closest to the others."""

    selects = True

    def select(self, deltas: Deltas, settings: RobustSettings) -> list[int]:
        """Multi-Krum's picks (``krum_select`` 0: all but ``krum_malicious``), scored on the
        flattened updates."""
        count = deltas.count
        if count <= 1:
            return list(range(count))
        distances = torch.zeros(count, count, dtype=torch.float64)
        for key in deltas.keys:
            for piece in deltas.stacks(key):
                distances += pairwise_squared_distances(piece)
        malicious = settings.krum_malicious
        wanted = settings.krum_select if settings.krum_select > 0 else count - malicious
        return multikrum_select(distances, malicious, wanted)

    def dropped_reason(self, kept: int, total: int) -> str:
        """Names multi-Krum's criterion."""
        return (
            f"multi-Krum kept the {kept} of {total} updates closest to the others "
            f"(robust-aggregation {self.name!r})"
        )

    def clause(self, settings: RobustSettings) -> str:
        """Its f and m."""
        return f"multi-Krum f={settings.krum_malicious} m={settings.krum_select or 'T - f'}"


class CoordinateClamp(Stage):
    """The norm screen, then every delta clamped to the coordinate-wise trimmed range of all of
    them (``median``: the median's range); unchanged when nothing is trimmed (T small)."""

    rewrites_coordinates = True
    median: ClassVar[bool] = False

    def fraction(self, settings: RobustSettings) -> float | None:
        """The trim fraction for ``trim_count`` (None: the median)."""
        return None if self.median else settings.trim_fraction

    def rewrite(self, deltas: Deltas, settings: RobustSettings) -> Rewrites:
        """One clamp for every reply; the share of the clients' coordinates it moved."""
        count = deltas.count
        trim = trim_count(count, self.fraction(settings)) if count else 0
        if trim == 0:
            return Rewrites((None,) * count, 0.0)
        low: dict[str, torch.Tensor] = {}
        high: dict[str, torch.Tensor] = {}
        moved = total = 0
        for key in deltas.keys:
            lows, highs = [], []
            for piece in deltas.stacks(key):
                piece_low, piece_high = trimmed_range(piece, trim)
                moved += int(((piece < piece_low) | (piece > piece_high)).sum())
                total += piece.numel()
                lows.append(piece_low)
                highs.append(piece_high)
            low[key], high[key] = joined(lows), joined(highs)
        clamp = Rewrite(low=low, high=high)
        return Rewrites((clamp,) * count, moved / total if total else 0.0)

    def clause(self, settings: RobustSettings) -> str:
        """Median or the trim fraction."""
        trim = "median" if self.median else f"trim {settings.trim_fraction:g}"
        return f"coordinate-wise clamp ({trim})"


@register_defence("trimmed-mean")
class TrimmedMean(CoordinateClamp):
    """The clamp to the range the trimmed mean trusts (``robust-trim-fraction``)."""


@register_defence("median")
class Median(CoordinateClamp):
    """The clamp to the median's range."""

    median = True


@register_defence("centered-clip")
class CenteredClip(Stage):
    """The norm screen, then every delta pulled to within ``DEFAULT_CENTER_RADIUS`` x the median
    distance of the coordinate-wise median; unchanged for T <= 2."""

    rewrites_coordinates = True
    clips_to_center = True

    def rewrite(self, deltas: Deltas, settings: RobustSettings) -> Rewrites:
        """The pulled-in replies' rewrites; ``clamped_fraction`` is their share."""
        count = deltas.count
        if count <= 2:
            return Rewrites((None,) * count, 0.0)
        center: dict[str, torch.Tensor] = {}
        squared = torch.zeros(count, dtype=torch.float64)
        for key in deltas.keys:
            parts = []
            for piece in deltas.stacks(key):
                piece_center = coordinate_median(piece)
                for row in range(count):  # one reply's offset at a time, not T in float64
                    offset = (piece[row] - piece_center).to(torch.float64)
                    squared[row] += offset.square().sum()
                parts.append(piece_center)
            center[key] = joined(parts)
        scales = center_scales(squared.sqrt().tolist(), DEFAULT_CENTER_RADIUS)
        rewrites = tuple(
            None if scale == 1.0 else Rewrite(scale=scale, center=center) for scale in scales
        )
        return Rewrites(rewrites, sum(scale < 1.0 for scale in scales) / count)

    def clause(self, settings: RobustSettings) -> str:
        """Its radius."""
        return f"centered clip ({DEFAULT_CENTER_RADIUS:g} x median distance to the median)"


# The built-ins' names, in their documented order (what run-config docs list).
BUILTIN_DEFENCES = available_defences()
