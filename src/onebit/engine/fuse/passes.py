"""The graph passes, in order: :func:`~.thresholds.fuse_thresholds`, then (when asked)
:func:`~.batchnorm.fold_batchnorm` on the BatchNorms no threshold took."""

from __future__ import annotations

import torch

from onebit.engine.fuse.batchnorm import fold_batchnorm as fold_batchnorms
from onebit.engine.fuse.thresholds import fuse_thresholds

__all__ = ["fuse_graph"]


def fuse_graph(
    graph: dict, tensors: dict[str, torch.Tensor], *, fold_batchnorm: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The lowering's graph with its graph-level fusions made: a new graph and tensors."""
    graph, tensors = fuse_thresholds(graph, tensors)
    if fold_batchnorm:
        graph, tensors = fold_batchnorms(graph, tensors)
    return graph, tensors
