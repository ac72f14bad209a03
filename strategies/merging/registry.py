"""The registry of merge methods: one name, one factory; duplicate names are refused."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from strategies.merging.method import MergeMethod

MethodFactory = Callable[..., MergeMethod]

_REGISTRY: dict[str, MethodFactory] = {}


def register_method(name: str) -> Callable[[MethodFactory], MethodFactory]:
    """Class decorator that files a merge method under ``name``."""

    def decorate(factory: MethodFactory) -> MethodFactory:
        if name in _REGISTRY:
            raise ValueError(f"merge method {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_methods() -> tuple[str, ...]:
    """Names of every registered merge method, sorted."""
    return tuple(sorted(_REGISTRY))


def _factory(name: str) -> MethodFactory:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown merge method {name!r}; known methods: {', '.join(available_methods())}"
        ) from None


def create_method(name: str, **hyperparameters: Any) -> MergeMethod:
    """Build the method called ``name`` with validated hyperparameters."""
    return _factory(name)(**hyperparameters)


def method_class(name: str) -> type[MergeMethod]:
    """The class filed under ``name``, for its class-level declarations (such as
    ``run_config_options``) without building an instance."""
    factory = _factory(name)
    if not (isinstance(factory, type) and issubclass(factory, MergeMethod)):
        raise TypeError(f"merge method {name!r} is filed as {factory!r}, not a MergeMethod class")
    return factory


def accepted_hyperparameters(name: str) -> tuple[str, ...]:
    """The keyword hyperparameters the method called ``name`` takes (its constructor's)."""
    create_method(name)
    factory = _REGISTRY[name]
    return tuple(
        parameter
        for parameter in inspect.signature(factory).parameters
        if parameter not in ("self", "args", "kwargs")
    )
