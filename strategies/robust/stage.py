"""What a robust defence (run-config ``robust-aggregation``) does in a round, and the registry
of defences by name.

A defence is a ``Stage`` filed with ``register_defence(name)``. It declares its parts, and the
round (``strategies.robust_stages``) runs the parts it declares, never asking for its name:

- ``screens``: the norm screen (``strategies.robust.norm_screen``) judges each update norm;
- ``selects``: ``select`` keeps some of the screened replies (multi-Krum), before the merge;
- ``rewrites_coordinates``: ``rewrite`` rewrites each client's delta from all of them (the
  coordinate-wise clamp, centered clipping), which needs every reply at once and dense deltas
  of one shape: such a round is buffered, and the sparse uplink, SecAgg+ and mixed ranks refuse
  it.

A stage sees the round's deltas (``Deltas``: one key's deltas stacked over the replies at a
time, in pieces of whole rows bounded in bytes, ``row_pieces``) and answers in positions and
``Rewrite``s, so this package stays pure tensor math.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import TYPE_CHECKING, ClassVar, Protocol, TypeVar

import torch

if TYPE_CHECKING:
    from strategies.robust.registry import RobustSettings

Tensors = Mapping[str, torch.Tensor]
# Which rows of a key a piece holds (``...``: all of it, a 0-dim key included).
Rows = slice | EllipsisType
# A piece of one key stacked over the replies holds at most this many float32 bytes (at least
# one row of the key per reply): the stage's working set stays flat in the number of replies
# instead of growing by one key per reply (issue 25: 1.0 MB a reply at 2 LLaMA-7B layers).
STACK_BYTES = 4 << 20


def row_pieces(shape: Sequence[int], count: int, budget: int = STACK_BYTES) -> list[Rows]:
    """Pieces of whole rows (the first dimension) of a tensor of ``shape`` such that ``count``
    float32 copies of one piece fit in ``budget`` bytes, at least one row a piece, in row
    order; ``[...]`` (all of it) when one piece will do or the tensor has no rows."""
    if not shape or shape[0] == 0:
        return [...]
    row_bytes = 4 * count * int(torch.Size(shape[1:]).numel())
    rows_per_piece = max(1, budget // max(1, row_bytes))
    if rows_per_piece >= shape[0]:
        return [...]
    return [
        slice(start, min(start + rows_per_piece, shape[0]))
        for start in range(0, shape[0], rows_per_piece)
    ]


def joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-piece results of one key (each over a piece's rows) as one tensor of the key."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


class Deltas(Protocol):
    """A round's accepted updates (reply minus the global), as a stage reads them."""

    @property
    def count(self) -> int:
        """How many replies (the stack's first dimension)."""
        ...

    @property
    def keys(self) -> tuple[str, ...]:
        """The global adapter's keys, in its order."""
        ...

    def stacks(self, key: str) -> Iterator[torch.Tensor]:
        """Every reply's delta of ``key``, stacked (count x the tensor's shape), float32, in
        pieces of whole rows of the key (count x rows x ...), in row order (``row_pieces``);
        one piece when it is small."""
        ...


@dataclass(frozen=True)
class Rewrite:
    """How one reply's delta is rewritten: scaled by ``scale`` (toward ``center`` when given:
    center + scale (delta - center)), then clamped key by key to [``low``, ``high``] (when
    given). The reply's node and example count stay."""

    scale: float = 1.0
    low: Tensors | None = None
    high: Tensors | None = None
    center: Tensors | None = None


@dataclass(frozen=True)
class Rewrites:
    """A rewrite stage's answer: per reply, in the order given, its ``Rewrite`` (None: left as
    it is), and the share it moved (the round report's ``clamped_fraction``)."""

    per_reply: tuple[Rewrite | None, ...]
    clamped_fraction: float


class Stage:
    """One robust defence's round-time work, declared. Subclasses set the flags and override
    the methods their flags name; the defaults do nothing (keep every reply, rewrite none), so
    a base with no abstract method: "norm" is the base with nothing overridden."""

    name: str = ""
    screens: ClassVar[bool] = True
    selects: ClassVar[bool] = False
    rewrites_coordinates: ClassVar[bool] = False
    clips_to_center: ClassVar[bool] = False  # its rewrite pulls deltas toward a center

    def select(self, deltas: Deltas, settings: RobustSettings) -> list[int]:
        """Positions of the replies kept (``selects``); the others are rejected."""
        return list(range(deltas.count))

    def dropped_reason(self, kept: int, total: int) -> str:
        """The rejection reason of a reply ``select`` left out."""
        return f"robust-aggregation {self.name!r} kept {kept} of {total} updates"

    def rewrite(self, deltas: Deltas, settings: RobustSettings) -> Rewrites:
        """Each reply's rewrite from all of them (``rewrites_coordinates``)."""
        return Rewrites((None,) * deltas.count, 0.0)

    def clause(self, settings: RobustSettings) -> str:
        """What the stage adds to the start-up summary's line ("" for nothing)."""
        return ""


StageClass = TypeVar("StageClass", bound=type[Stage])

_DEFENCES: dict[str, Stage] = {}


def register_defence(name: str) -> Callable[[StageClass], StageClass]:
    """Class decorator that files one instance of a ``Stage`` subclass under ``name`` (the
    run-config ``robust-aggregation`` value); a second registration of a name is refused."""

    def decorate(stage_class: StageClass) -> StageClass:
        if name in _DEFENCES:
            raise ValueError(f"robust defence {name!r} is already registered")
        stage = stage_class()
        stage.name = name
        _DEFENCES[name] = stage
        return stage_class

    return decorate


def available_defences() -> tuple[str, ...]:
    """Names of every registered defence, in registration order (the built-ins' documented
    order first: norm, none, krum, trimmed-mean, median, centered-clip)."""
    return tuple(_DEFENCES)


def get_defence(name: str) -> Stage:
    """The defence filed under ``name``; ValueError naming the known ones otherwise."""
    try:
        return _DEFENCES[name]
    except KeyError:
        raise ValueError(
            f"unknown robust defence {name!r}; known: {', '.join(available_defences())}"
        ) from None
