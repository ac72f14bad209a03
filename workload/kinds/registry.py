"""The registry of task kinds: one name, one kind; duplicate names are refused.

Mirrors ``strategies.merging.registry``. The built-in kinds register themselves when their
modules are imported; every lookup imports them first, so a name is known whichever module
asked first (the kinds import ``workload.model``, which itself looks kinds up).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from workload.kinds.base import TaskKind

KindClass = TypeVar("KindClass", bound="type[TaskKind]")

_BUILTIN_MODULES = ("workload.kinds.classification", "workload.kinds.causal_lm")
_REGISTRY: dict[str, TaskKind] = {}


def register_task_kind(name: str) -> Callable[[KindClass], KindClass]:
    """Class decorator that files one instance of a ``TaskKind`` subclass under ``name``."""

    def decorate(kind_class: KindClass) -> KindClass:
        if name in _REGISTRY:
            raise ValueError(f"task kind {name!r} is already registered")
        kind_class.name = name
        _REGISTRY[name] = kind_class()
        return kind_class

    return decorate


def _load_builtin_kinds() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_task_kinds() -> tuple[str, ...]:
    """Names of every registered task kind, sorted (the values run-config ``task`` takes)."""
    _load_builtin_kinds()
    return tuple(sorted(_REGISTRY))


def get_task_kind(name: str) -> TaskKind:
    """The kind called ``name``; ValueError naming the known kinds for any other name."""
    _load_builtin_kinds()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown task kind {name!r}; known kinds: {', '.join(available_task_kinds())}"
        ) from None


def unregister_task_kind(name: str) -> None:
    """Remove the kind filed under ``name`` at run time (a test's teardown: a kind registered
    from a test file must not outlive the test). The built-in kinds stay: removing one would
    break every later lookup of it in the process, so that is refused (ValueError), as is an
    unknown name."""
    _load_builtin_kinds()
    if name not in _REGISTRY:
        raise ValueError(f"task kind {name!r} is not registered")
    if type(_REGISTRY[name]).__module__ in _BUILTIN_MODULES:
        raise ValueError(f"task kind {name!r} is built in and stays registered")
    del _REGISTRY[name]
