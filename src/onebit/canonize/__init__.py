r"""Exact, reversible model canonization: BatchNorm merging and integer thresholds.

Every function here changes a model *in place* and returns a :class:`Handle` whose
``remove()`` puts back every parameter, buffer, ``eps``, module and hook exactly
as it was (bit for bit). A handle is a context manager::

    with merge_batchnorm(model):
        explain(model)            # BatchNorms merged: same outputs (within 1e-5)
    # here the model is the original again, bit for bit

* :func:`merge_batchnorm` moves each eval-mode BatchNorm ``bn(x) = s x + t`` into a
  neighbouring convolution or linear layer (left or right, through ReLUs, pooling and
  flatten, with exact bias maps for padded convolutions): :mod:`onebit.canonize.merge`.
* :func:`fold_thresholds` turns ``binary layer -> [max pool] -> bn -> sign`` into exact
  integer thresholds (shared with the packed engine, :mod:`onebit.thresholds`):
  :mod:`onebit.canonize.fold`. A BatchNorm before a sign, or after a layer with quantized
  weights, is never merged into weights: :func:`merge_batchnorm` raises, or skips with a
  warning.
* Which module feeds which comes from the module structure for ``nn.Sequential`` and
  from a ``torch.fx`` trace otherwise: :mod:`onebit.canonize.adjacency`.
* :class:`Handle`, :class:`CompositeHandle`, :func:`register_all` (every handle or none),
  :func:`canonize` (several canonizers) and :func:`preserve` (a whole model put back on
  exit): :mod:`onebit.canonize.handles`.

The package is layered; a module imports only from those below it::

    merge.py   fold.py           the two canonizations and their Canonizers
    adjacency.py                 graphs, what each node does to a per-channel map, planning
    handles.py   modules.py      undo records and preserve; ThresholdedReLU, SignThreshold

and below it, shared with the packed engine: the tracer and the layer kinds
(:mod:`onebit.tracing`, :mod:`onebit.layerkinds`), the BatchNorm -> sign chain
(:mod:`onebit.sign_chain`), the BatchNorm as an affine map (:mod:`onebit.batchnorm`) and the
canonized modules themselves (:mod:`onebit.nn.thresholded`).

A structure that cannot be canonized exactly raises :class:`UnmergeableError` naming the
BatchNorm and why, before anything is changed; ``skip_unmergeable=True`` leaves it alone
with a :class:`CanonizationWarning` instead. ``state_dict()`` stays in sync while merged:
parameters and buffers are changed in place (a bias-less layer that needs a bias gets a
``bias`` parameter until ``remove()``; a :class:`ThresholdedReLU` stores its threshold and
direction as buffers). Keep the model in eval mode while merged, and do not train it: the
bias maps are computed from the weights at merge time.
"""

from onebit.canonize.adjacency import CanonizationWarning, UnmergeableError
from onebit.canonize.fold import FoldThresholds, fold_thresholds
from onebit.canonize.handles import (
    Canonizer,
    CompositeHandle,
    Handle,
    HandleOrderError,
    canonize,
    preserve,
    register_all,
)
from onebit.canonize.merge import MergeBatchNorm, merge_batchnorm
from onebit.nn.thresholded import SignThreshold, ThresholdedReLU

__all__ = [
    "Handle",
    "CompositeHandle",
    "HandleOrderError",
    "Canonizer",
    "MergeBatchNorm",
    "FoldThresholds",
    "ThresholdedReLU",
    "SignThreshold",
    "UnmergeableError",
    "CanonizationWarning",
    "merge_batchnorm",
    "fold_thresholds",
    "canonize",
    "register_all",
    "preserve",
]
