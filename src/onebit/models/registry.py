"""The model zoo's registry: ``register_model``, ``create``, ``names``.

``create`` also takes a user's own model as ``"path/to/file.py:NAME"``: ``NAME`` is a module
class or a factory function in that file (as ``python -m`` tools take ``module:attr``), called
with ``num_classes`` / ``in_channels`` when it accepts them and with the other arguments given.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable

from torch import nn

__all__ = ["register_model", "create", "names", "is_file_model", "import_model_file", "load_file_attribute"]

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


def is_file_model(name: str) -> bool:
    """``"path/to/file.py:NAME"``: a user's model in a Python file."""
    path, sep, attr = name.rpartition(":")
    return bool(sep) and path.endswith(".py") and attr.isidentifier()


def import_model_file(path: str):
    """A user's Python file imported as a module (once per process; under a name derived from its
    absolute path, so that dataclasses and pickling find its classes)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    module_name = "onebit_user_" + "".join(c if c.isalnum() else "_" for c in os.path.abspath(path))
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as error:
            del sys.modules[module_name]
            raise ValueError(f"model file {path!r} failed to import: {type(error).__name__}: {error}") from error
        except SystemExit as error:  # sys.exit() in a file that defines models: an error of that file
            del sys.modules[module_name]
            raise ValueError(f"model file {path!r} failed to import: it calls sys.exit({error.code!r})") from None
    return module


def load_file_attribute(spec: str):
    """The object ``NAME`` of ``"path/to/file.py:NAME"`` (the file is imported as a module)."""
    path, _, attr = spec.rpartition(":")
    try:
        module = import_model_file(path)
    except FileNotFoundError as error:
        raise ValueError(str(error)) from None
    if not hasattr(module, attr):
        raise ValueError(f"model file {path!r} has no attribute {attr!r}")
    return getattr(module, attr)


def create(name: str, num_classes: int | None = None, in_channels: int | None = None, **kwargs) -> nn.Module:
    """Build the zoo model ``name`` (randomly initialized), or a user's ``"file.py:NAME"``.

    ``num_classes`` and ``in_channels`` default to 10 and 3. (:func:`onebit.models.create` also
    takes trained ``weights``: see :mod:`onebit.models.pretrained`.)"""
    num_classes = 10 if num_classes is None else num_classes
    in_channels = 3 if in_channels is None else in_channels
    if is_file_model(name):
        builder = load_file_attribute(name)
        if not callable(builder):
            raise ValueError(f"{name!r} is not a module class or a factory function")
        accepted = inspect.signature(builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        shape = {
            k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if k in accepted or takes_any
        }
        model = builder(**shape, **kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"{name!r} returned a {type(model).__name__}, not a torch.nn.Module")
        from onebit.convert import name_layers

        return name_layers(model)
    try:
        builder = _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(names())} (or a file's model as path/to/file.py:NAME)"
        ) from None
    accepted = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in kwargs if k not in accepted and not takes_any]
    if unknown:
        raise ValueError(f"model {name!r} does not take argument(s) {', '.join(unknown)}")
    from onebit.convert import name_layers

    return name_layers(builder(num_classes=num_classes, in_channels=in_channels, **kwargs))
