"""Models holding trained weights: ``create(name, weights=REF)``, ``from_pretrained(REF)`` and ``build``.

A reference is a run directory, a ``.safetensors`` file, a folder written by ``onebit push`` or
``hf://ORG/NAME[@REVISION]`` (read and checked by :mod:`onebit.models.weights`); the model is built
by :mod:`onebit.models.registry` and loaded with those weights, bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from onebit.models import registry
from onebit.models.weights import Weights, WeightsError, fetch_weights, is_hub_ref, load_into

__all__ = ["create", "from_pretrained", "build"]


def create(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    weights: str | os.PathLike | None = None,
    **kwargs,
) -> nn.Module:
    """Build the zoo model ``name`` (randomly initialized), or a user's ``"file.py:NAME"``.

    ``num_classes`` and ``in_channels`` default to 10 and 3. With ``weights`` (a run directory, a
    ``.safetensors`` file, a folder written by ``onebit push`` or ``hf://ORG/NAME[@REVISION]``; see
    :mod:`onebit.models.weights`) the model is loaded with those weights, bit for bit: they default to
    the weights' config, and a config naming another model or shape raises ``ValueError``."""
    if weights is not None:
        return build(fetch_weights(weights), name, num_classes, in_channels, **kwargs)
    return registry.create(name, num_classes, in_channels, **kwargs)


def build(
    weights: Weights,
    name: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The model ``name`` (default: the one ``weights.config`` names, with its ``model_kwargs``) holding
    ``weights``. ``num_classes`` / ``in_channels`` default to the config's; a config naming another
    model or shape raises :class:`WeightsError`. ``kwargs`` are the builder's (not merged with the config's)."""
    config = weights.config
    run = config["config"] if config is not None else None
    if name is None:
        if run is None:
            raise WeightsError(
                f"{weights.name}: a weights file without a config.json naming its model: "
                "build it with onebit.models.create(NAME, weights=...)"
            )
        name = run["model"]
        kwargs = {**run.get("model_kwargs", {}), **kwargs}
        if name.startswith("<"):
            raise WeightsError(
                f"{weights.ref}: trained with onebit.fit on a user's module {name}: build that module and "
                "call onebit.models.weights.load_into(module, fetch_weights(ref))"
            )
        if registry.is_file_model(name) and is_hub_ref(weights.ref):
            raise WeightsError(
                f"{weights.ref}: its model is defined in a Python file ({name}), which is not run from a Hub "
                "reference: build it with onebit.models.create('path/to/file.py:NAME', weights=...)"
            )
    elif run is not None and run["model"] != name:
        raise WeightsError(
            f"{weights.ref} holds weights of model {run['model']!r}, not {name!r}: "
            f"use create({run['model']!r}, weights=...) or onebit.models.from_pretrained(ref)"
        )
    for key, given in (("num_classes", num_classes), ("in_channels", in_channels)):
        if config is not None and given is not None and given != config[key]:
            raise WeightsError(f"{weights.ref} was trained with {key}={config[key]}, not {key}={given}")
    if num_classes is None:
        num_classes = config["num_classes"] if config is not None else 10
    if in_channels is None:
        in_channels = config["in_channels"] if config is not None else 3
    model = registry.create(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
    return load_into(model, weights, repr(name))


def from_pretrained(ref: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """The model ``ref``'s ``config.json`` names (its ``model_kwargs`` updated by ``kwargs``), holding
    ``ref``'s verified weights, in eval mode."""
    return build(fetch_weights(ref), **kwargs).eval()
