"""The fusion stage: every fusion the packed engine makes, between the lowering and the run.

The lowering (:mod:`onebit.engine.lowering`) emits the graph of what the model computes, each
layer as its own nodes, and makes no fusion. Two kinds of fusion follow, each pure (what it is
given stays as it is):

Graph passes, ``(graph, tensors) -> (graph, tensors)``, run by :func:`fuse_graph` inside
:func:`onebit.engine.lowering.lower`; what they make is what a file stores and ONNX exports:

- :mod:`.thresholds`: a BatchNorm (or a canonized ``sign_threshold``) whose value one pack takes,
  for binary layers only, becomes the binary layer's integer thresholds: ``binary_conv2d`` ->
  [``max_pool2d``] -> ``batch_norm`` -> ``pack`` as ``binary_conv2d_threshold`` [+
  ``max_pool_bits``], and ``binary_linear`` -> ``batch_norm`` -> ``pack_features`` as
  ``binary_linear_threshold``, bit for bit the model's decisions;
- :mod:`.batchnorm` (only with ``fold_batchnorm=True``): a BatchNorm into a magnitude-aware
  ``binary_conv2d``'s scale and bias (one op less, equal up to float rounding).

Step fusions, ``fuse(graph, tensors) -> list[Step]`` (:mod:`.steps`), run by
:class:`~onebit.engine.PackedModel`; the graph keeps its nodes, a step makes one native call of several:

- a ``pack`` read only by one binary convolution: the convolution packs its float input itself;
- a ``batch_norm`` that alone reads a binary convolution: the convolution's epilogue, rounded as
  this process's torch rounds it;
- an ``add`` of a binary convolution (or of its epilogue) and a shortcut: the convolution adds it
  as it writes its output.

Helpers: :mod:`.rewrite` (who reads a value; a pass's edits applied to a copy).
"""

from __future__ import annotations

from onebit.engine.fuse.passes import fuse_graph
from onebit.engine.fuse.steps import Fusions, find_fusions, fuse

__all__ = ["Fusions", "find_fusions", "fuse", "fuse_graph"]
