"""The vector a client's RobustMerge terms travel in under SecAgg+: shared by client and server.

``client.secure_aggregation`` packs each client's terms into it and ``server.secure_aggregation``
unpacks the sum; both build it from the adapter's public keys and shapes and the clipping range,
so the layout lives here, below both apps (the server never imports the ClientApp's code).

Transport format (``TermLayout``)
---------------------------------
The vector is: every adapter key in the order sent (its term), then one ``<module>::scale``
(r,) per LoRA module in ``parse_layout`` order, then two (1,) entries, ``::clipped`` and
``::train-loss``. SecAgg+ clips every entry to [-c, c] (c = ``secagg-clipping-range``) before
quantising, so each entry travels multiplied by a public constant (the server divides it out):

- LoRA and other terms: 1. They fit while |lambda * delta_A| and |lambda * s~ * delta_B| stay
  within c. s~ multiplies B and can approach d_in, so B's terms are the ones to watch: on the
  default workload (MiniLM, 512 examples, one round) the largest was 0.99 (s~ up to 82,
  |delta_B| up to 8e-3), A's 0.014, so the default c = 8 leaves 8x headroom. A client whose
  terms exceed c is counted (below) and the server logs a warning: raise the range then;
- s~: c / d_in (d_in = entries per row of A). s~ >= 1 is not bounded by any small constant, but
  it is by d_in: the entries pruning drops are all below tau and each kept one is >= tau, so
  a row with k >= 1 kept entries has s < d_in / k <= d_in (and s = 1 when none is kept). So
  the scale entries never clip, whatever the data;
- ``::clipped``: c if any other entry of this client exceeded c (was clipped), else 0. The
  server learns how many clients clipped, not which;
- ``::train-loss``: the local train loss clamped to [0, ``LOSS_RANGE``], times c / LOSS_RANGE;
  the server learns the mean train loss only.

Values are float64 here, so the quantiser's own rounding is far below one level.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from strategies.merging.decomposed import scale_key
from strategies.merging.lora_keys import parse_layout

CLIPPED_KEY = "::clipped"
TRAIN_LOSS_KEY = "::train-loss"
LOSS_RANGE = 100.0


@dataclass(frozen=True)
class TermEntry:
    """One array of the transported vector: its name, shape and public transport factor."""

    name: str
    shape: tuple[int, ...]
    factor: float


@dataclass(frozen=True)
class TermLayout:
    """The order, shapes and transport factors of the vector that SecAgg+ sums (see module doc).

    Built identically by client and server from the adapter's keys and shapes (public: the
    server sends them) and the clipping range c.
    """

    entries: tuple[TermEntry, ...]
    clipping_range: float

    @classmethod
    def for_adapter(
        cls, shapes: Sequence[tuple[str, tuple[int, ...]]], clipping_range: float
    ) -> TermLayout:
        """Adapter keys in the given order, then each module's scale, then the two scalars."""
        if not clipping_range > 0:
            raise ValueError(f"clipping range must be > 0, got {clipping_range}")
        entries = [TermEntry(key, tuple(shape), 1.0) for key, shape in shapes]
        shape_of = dict(shapes)
        for module in parse_layout(shape_of).modules:
            a_shape = shape_of[module.a_key]
            rank = a_shape[0]
            width = math.prod(a_shape) // rank
            entries.append(TermEntry(scale_key(module.name), (rank,), clipping_range / width))
        entries.append(TermEntry(CLIPPED_KEY, (1,), clipping_range))
        entries.append(TermEntry(TRAIN_LOSS_KEY, (1,), clipping_range / LOSS_RANGE))
        return cls(tuple(entries), float(clipping_range))

    @property
    def names(self) -> list[str]:
        """Entry names in vector order."""
        return [entry.name for entry in self.entries]

    def pack(self, terms: Mapping[str, torch.Tensor], train_loss: float) -> list[np.ndarray]:
        """One client's terms as the float64 arrays SecAgg+ quantises (transport units).

        Raises ValueError for a missing, misshapen or non-finite term: SecAgg+ would turn a NaN
        into an arbitrary integer and corrupt everyone's sum.
        """
        arrays: list[np.ndarray] = []
        clipped = False
        for entry in self.entries[:-2]:
            if entry.name not in terms:
                raise ValueError(f"term {entry.name!r} is missing from the client's terms")
            value = terms[entry.name].detach().to("cpu", torch.float64).numpy()
            if tuple(value.shape) != entry.shape:
                raise ValueError(
                    f"term {entry.name!r} has shape {tuple(value.shape)}, expected {entry.shape}"
                )
            if not np.isfinite(value).all():
                raise ValueError(f"term {entry.name!r} is not finite; refusing to send it")
            scaled = value * entry.factor
            clipped = clipped or bool(np.abs(scaled).max(initial=0.0) > self.clipping_range)
            arrays.append(scaled)
        loss = min(max(train_loss, 0.0), LOSS_RANGE) if math.isfinite(train_loss) else LOSS_RANGE
        arrays.append(np.array([self.clipping_range if clipped else 0.0]))
        arrays.append(np.array([loss * self.entries[-1].factor]))
        return arrays

    def unpack(self, arrays: Sequence[np.ndarray], scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Transport-unit arrays back to true units (times ``scale``), float64, by name."""
        if len(arrays) != len(self.entries):
            raise ValueError(f"expected {len(self.entries)} arrays, got {len(arrays)}")
        result: dict[str, torch.Tensor] = {}
        for entry, array in zip(self.entries, arrays, strict=True):
            value = np.asarray(array, dtype=np.float64)
            if tuple(value.shape) != entry.shape:
                raise ValueError(
                    f"array {entry.name!r} has shape {tuple(value.shape)}, expected {entry.shape}"
                )
            result[entry.name] = torch.from_numpy(value * (scale / entry.factor))
        return result
