"""Lowering: an eval-mode onebit/torch model -> the packed engine's graph.

The model is traced with ``torch.fx`` (onebit's layers and quantizers are leaves; :mod:`.trace`).
Each traced node becomes graph ops (see :mod:`onebit.engine.graph`):

- a *binary* ``QConv2d`` / ``QLinear`` (1-bit sign input quantizer -- ``ste_sign``,
  ``approx_sign``, ``swish_sign`` -- and sign or magnitude-aware sign weights)
  becomes ``pack`` + ``binary_conv2d`` / ``pack_features`` + ``binary_linear``, on
  1-bit weights with an optional per-channel float scale (the magnitude-aware alpha);
  a ``QConv1d`` (and a float ``Conv1d``) is a ``1 x k`` 2-d conv between two reshapes;
- everything else runs as the model's own float ops on copies of its parameters;
  a binary conv the packed kernels cannot run (e.g. ``padding_mode='reflect'``) runs
  as sign + float conv of its quantized weight, exactly as the model does.

Each layer is its own node(s): the lowering makes no fusion. :func:`lower_computation` returns
this graph of what the model computes; :func:`lower` passes it through the graph fusions of
:mod:`onebit.engine.fuse` (a BatchNorm + sign before binary layers as integer thresholds; with
``fold_batchnorm``, a BatchNorm into a magnitude-aware conv's scale and bias).

Unsupported modules or functions raise :class:`UnsupportedModelError` naming the node.

The modules, each importing only those before it: :mod:`.state` (what has been emitted),
:mod:`.attrs` (node attributes), :mod:`.trace` (the fx graph), :mod:`.patterns` (which layers
are binary), :mod:`.operands` (weights and inputs of quantized
layers), :mod:`.floats` (``EMITTERS``, ``FUNCTIONS``, ``METHODS``), :mod:`.quantized`
(``QUANTIZED``: the quantized layers' emitters), :mod:`.walk` (the dispatch of every node).
"""

from __future__ import annotations

import torch
from torch import nn

from onebit.engine.fuse.passes import fuse_graph
from onebit.engine.lowering import trace, walk
from onebit.engine.lowering.floats import EMITTERS
from onebit.engine.lowering.patterns import is_sign_quantizer, is_ternary_linear
from onebit.engine.lowering.quantized import QUANTIZED
from onebit.engine.lowering.state import Lowering, UnsupportedModelError

__all__ = [
    "EMITTERS",
    "QUANTIZED",
    "UnsupportedModelError",
    "is_sign_quantizer",
    "is_ternary_linear",
    "lower",
    "lower_computation",
]


def lower(
    model: nn.Module, example_input: torch.Tensor, *, fold_batchnorm: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Trace ``model`` and return ``(graph, tensors)`` for :class:`~onebit.engine.PackedModel`:
    :func:`lower_computation`'s graph with the graph fusions made
    (:func:`onebit.engine.fuse.fuse_graph`).

    ``graph["fallbacks"]`` lists the layers with binary weights or a binary input that run
    in float, each with the reason."""
    return fuse_graph(*lower_computation(model, example_input), fold_batchnorm=fold_batchnorm)


def lower_computation(model: nn.Module, example_input: torch.Tensor) -> tuple[dict, dict[str, torch.Tensor]]:
    """Trace ``model`` and return ``(graph, tensors)`` of what it computes, each layer as its own
    node(s), nothing fused."""
    lowering = Lowering(trace.trace(model, example_input), example_input)
    graph = walk.walk(lowering)
    live = {key for node in graph["nodes"] for key in node.get("tensors", {}).values()}
    return graph, {key: t for key, t in lowering.tensors.items() if key in live}
