"""Which nodes a round asks: a seeded sample, so a resumed run asks the nodes an uninterrupted
one would, on every aggregation path."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import INFO

from flwr.supercore import log


def seeded_sample(node_ids: Iterable[int], wanted: int, seed: int, server_round: int) -> list[int]:
    """``wanted`` of ``node_ids``, ascending; the same ones for the same seed and round, so a
    resumed run asks the nodes an uninterrupted one would."""
    population = sorted(node_ids)
    return sorted(random.Random(seed * 1_000_003 + server_round).sample(population, wanted))


def sample_connected(
    connected: Callable[[], Iterable[int]],
    fraction: float,
    minimum: int,
    min_available: int,
    seed: int,
    server_round: int,
) -> list[int]:
    """A seeded sample of ``fraction`` (at least ``minimum``) of the ``connected()`` node ids,
    waiting until ``min_available`` and the sample's size are connected."""
    nodes = sorted(connected())
    wanted = max(int(len(nodes) * fraction), minimum)
    needed = max(min_available, wanted)
    while len(nodes) < needed:
        log(INFO, "Waiting for nodes to connect: %d connected (need %d).", len(nodes), needed)
        time.sleep(1)
        nodes = sorted(connected())
    return seeded_sample(nodes, wanted, seed, server_round)
