"""Pairing of PEFT LoRA factors by module name (never by dictionary order).

PEFT state dicts name the factors ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` (saved
adapters) or ``<module>.lora_A.<adapter-name>.weight`` (live models); embedding layers use
``lora_embedding_A`` / ``lora_embedding_B``. Any other key is a non-LoRA trainable tensor
(``modules_to_save``, a DoRA magnitude vector) and is merged by the spec's step 5.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from strategies.merging.errors import MergeInputError

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.lora_(?P<kind>embedding_)?(?P<factor>[AB])(?P<tail>(\.[^.]+)*)$"
)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module: the keys of its A (r x d_in) and B (d_out x r) factors."""

    name: str
    a_key: str
    b_key: str


@dataclass(frozen=True)
class AdapterLayout:
    """The LoRA modules of an adapter, and its other (non-LoRA) trainable keys, in key order."""

    modules: tuple[LoraModule, ...]
    other_keys: tuple[str, ...]


def is_lora_key(key: str) -> bool:
    """True for a key that names a LoRA A or B factor."""
    return _LORA_KEY.match(key) is not None


def parse_layout(keys: Iterable[str], *, adapter: int | str | None = None) -> AdapterLayout:
    """Group keys into LoRA (A, B) pairs by module name; raise if an A lacks its B or vice versa."""
    a_keys: dict[tuple[str, str, str], str] = {}
    b_keys: dict[tuple[str, str, str], str] = {}
    other: list[str] = []
    for key in keys:
        match = _LORA_KEY.match(key)
        if match is None:
            other.append(key)
            continue
        ident = (match["module"], match["kind"] or "", match["tail"])
        (a_keys if match["factor"] == "A" else b_keys)[ident] = key
    for ident, key in a_keys.items():
        if ident not in b_keys:
            raise MergeInputError(
                f"LoRA A factor has no matching B factor (expected {_partner(key)!r})",
                adapter=adapter,
                key=key,
            )
    for ident, key in b_keys.items():
        if ident not in a_keys:
            raise MergeInputError(
                f"LoRA B factor has no matching A factor (expected {_partner(key)!r})",
                adapter=adapter,
                key=key,
            )
    modules = tuple(
        LoraModule(
            name=ident[0] + (".embedding" if ident[1] else "") + ident[2],
            a_key=a,
            b_key=b_keys[ident],
        )
        for ident, a in sorted(a_keys.items(), key=lambda item: item[1])
    )
    return AdapterLayout(modules=modules, other_keys=tuple(sorted(other)))


def _partner(key: str) -> str:
    match = _LORA_KEY.match(key)
    assert match is not None
    other = "B" if match["factor"] == "A" else "A"
    start, end = match.span("factor")
    return key[:start] + other + key[end:]
