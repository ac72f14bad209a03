"""Typed, validated reads of Flower run-config and node-config values.

Flower hands a ClientApp its settings as a flat ``Mapping[str, bool | int | float | str]``
(``context.run_config``, filled from ``[tool.flwr.app.config]`` and ``--run-config``; likewise
``context.node_config`` and a message's ConfigRecord; ``source`` names which in errors). A value of
the wrong type or outside its range must fail at the first read with a message that names the key,
says what is allowed and what came, instead of surfacing later as an obscure tensor error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _describe(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def read_int(
    config: Mapping[str, Any],
    key: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    source: str = "run-config",
) -> int:
    """The integer at ``key`` (``default`` when absent), within ``[minimum, maximum]``.

    A bool is rejected (``True`` is an int in Python, never a count); so is a float, even an
    integral one, since a float in an integer setting usually means a mistyped key.
    """
    value = config.get(key, default)
    allowed = _int_range(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{source} key {key!r} must be {allowed}; got {_describe(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{source} key {key!r} must be {allowed}; got {value}")
    return value


def _int_range(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"an integer in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"an integer >= {minimum}"
    if maximum is not None:
        return f"an integer <= {maximum}"
    return "an integer"


def read_float(
    config: Mapping[str, Any],
    key: str,
    default: float,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    source: str = "run-config",
) -> float:
    """The finite number at ``key`` (``default`` when absent) in the interval low..high.

    ``low_open`` / ``high_open`` exclude the bound (``(0, inf)`` for a learning rate,
    ``[0, 1)`` for a dropout probability). Integers are accepted (``learning-rate = 1``).
    """
    value = config.get(key, default)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    allowed = f"a finite number in {interval}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{source} key {key!r} must be {allowed}; got {_describe(value)}")
    number = float(value)
    below = number < low or (low_open and number == low)
    above = number > high or (high_open and number == high)
    if not math.isfinite(number) or below or above:
        raise ValueError(f"{source} key {key!r} must be {allowed}; got {value!r}")
    return number


def read_str(
    config: Mapping[str, Any], key: str, default: str, *, source: str = "run-config"
) -> str:
    """The string at ``key`` (``default`` when absent), stripped of surrounding whitespace."""
    value = config.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{source} key {key!r} must be a string; got {_describe(value)}")
    return value.strip()


def read_names(
    config: Mapping[str, Any],
    key: str,
    default: str,
    *,
    allowed: tuple[str, ...] | None = None,
    source: str = "run-config",
) -> tuple[str, ...]:
    """A comma-separated list of names at ``key``: non-empty, without duplicates, in order.

    With ``allowed`` given, every name must be one of them (the error lists them).
    """
    raw = read_str(config, key, default, source=source)
    names = tuple(part.strip() for part in raw.split(","))
    if not raw or any(not name for name in names):
        raise ValueError(
            f"{source} key {key!r} must be a comma-separated list of names without empty "
            f"entries (e.g. 'query,value'); got {raw!r}"
        )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{source} key {key!r} lists {duplicates} more than once; got {raw!r}")
    if allowed is not None:
        unknown = [name for name in names if name not in allowed]
        if unknown:
            raise ValueError(
                f"{source} key {key!r} has unknown name(s) {unknown}; allowed: {list(allowed)}"
            )
    return names
