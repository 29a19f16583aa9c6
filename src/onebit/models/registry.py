"""The model zoo's registry: ``register_model``, ``create``, ``names``."""

from __future__ import annotations

import fnmatch
import inspect
from typing import Callable

from torch import nn

__all__ = ["register_model", "create", "names"]

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a function ``fn(num_classes, in_channels, **kwargs) -> nn.Module`` under its name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def names(pattern: str = "*") -> list[str]:
    """Registered model names matching the glob ``pattern``, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def create(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the zoo model ``name`` (randomly initialized)."""
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}") from None
    accepted = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in kwargs if k not in accepted and not takes_any]
    if unknown:
        raise ValueError(f"model {name!r} does not take argument(s) {', '.join(unknown)}")
    from onebit.convert import name_layers

    return name_layers(builder(num_classes=num_classes, in_channels=in_channels, **kwargs))
