"""Small JSON helpers shared by the config and header checks: strict parsing and type names."""

from __future__ import annotations

from typing import Any, TypeGuard


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses duplicate keys, which would make a file ambiguous.

    Raises
    ------
    ValueError
        ``duplicate key '<key>'`` for the first repeated key.
    """
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def is_int(value: object) -> TypeGuard[int]:
    """A JSON integer: ``int`` but not ``bool`` (which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """A JSON number: ``int`` or ``float`` but not ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type (``array``, ``object``, ...), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
