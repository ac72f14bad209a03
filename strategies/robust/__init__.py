"""Byzantine-robust stages for federated rounds: pure tensor math, no Flower.

- ``norm_screen``: the default screen, an update norm against a robust reference (the median of
  this round's norms and earlier rounds' accepted norms) times a factor.
- ``krum``: multi-Krum selection, the replies whose updates lie closest to the others.
- ``coordinatewise``: each client's delta clamped, coordinate by coordinate, to the range the
  coordinate-wise median or trimmed mean trusts (so any merge method can follow).
- ``centered_clip``: each client's delta pulled to within a robust radius of the coordinate-wise
  median (a candidate default against adaptive attackers).
- ``round_pool``: which pool of norms judged a reply (a first round's held-back replies, this
  round's, earlier rounds'), in the words the rejection reasons and the audit record use.
- ``stage``: what a defence (a ``robust-aggregation`` value) does in a round, the ``Stage``
  it subclasses, and the registry (``register_defence``, ``available_defences``).
- ``defences``: the built-in defences, each a registered ``Stage``.
- ``registry``: the robust run-config options, checked (``RobustSettings``).

The strategy (``strategies.fed_robustmerge``) applies them to replies; these modules only see
tensors and floats.
"""

from strategies.robust.centered_clip import (
    DEFAULT_CENTER_RADIUS,
    center_scales,
    clip_toward,
    coordinate_median,
)
from strategies.robust.coordinatewise import clamp_to_range, trim_count, trimmed_range
from strategies.robust.krum import multikrum_select, pairwise_squared_distances
from strategies.robust.norm_screen import NormBound, clip_scale, lower_median, norm_bound
from strategies.robust.registry import (
    AUTO,
    DEFAULT_HISTORY,
    DEFAULT_NORM_FACTOR,
    DEFAULT_POOL,
    ROBUST_AGGREGATIONS,
    RobustSettings,
    aggregation_choices,
)
from strategies.robust.round_pool import pool_label
from strategies.robust.stage import (
    STACK_BYTES,
    Deltas,
    Rewrite,
    Rewrites,
    Rows,
    Stage,
    available_defences,
    get_defence,
    register_defence,
    row_pieces,
)

__all__ = [
    "AUTO",
    "DEFAULT_CENTER_RADIUS",
    "DEFAULT_HISTORY",
    "DEFAULT_NORM_FACTOR",
    "DEFAULT_POOL",
    "ROBUST_AGGREGATIONS",
    "STACK_BYTES",
    "Deltas",
    "NormBound",
    "Rewrite",
    "Rewrites",
    "RobustSettings",
    "Rows",
    "Stage",
    "aggregation_choices",
    "available_defences",
    "center_scales",
    "clamp_to_range",
    "clip_scale",
    "clip_toward",
    "coordinate_median",
    "get_defence",
    "lower_median",
    "multikrum_select",
    "norm_bound",
    "pairwise_squared_distances",
    "pool_label",
    "register_defence",
    "row_pieces",
    "trim_count",
    "trimmed_range",
]
