"""``Step``: one call a packed model makes, with what it fused typed as fields.

A step is a graph node, or a binary convolution with the nodes fused into it (the packing of its
input, a BatchNorm, the add of a shortcut), as :func:`onebit.engine.fuse.fuse` makes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class Epilogue:
    """A BatchNorm (eval mode) a binary convolution applies as it writes its output:
    ``y * bn_scale[c] + bn_shift[c]``, rounded once (``bn_fma``, a fused multiply-add, as torch's
    vectorized CPU BatchNorm rounds it) or twice."""

    bn_scale: torch.Tensor | None = None
    bn_shift: torch.Tensor | None = None
    bn_fma: bool = False


@dataclass(slots=True, eq=False)
class Step:
    """One call of :meth:`PackedModel.forward`: ``env[output] = run(*env[inputs])``.

    ``run`` is the op's runner bound to the step's tensors, attributes and fields
    (:attr:`OpSpec.bind <onebit.engine.graph.OpSpec>`); a fused add's shortcut is the last input.
    """

    op: str  #: the graph op it runs
    output: str  #: the value it computes
    inputs: tuple[str, ...]  #: the values it reads
    tensors: dict[str, torch.Tensor]  #: role -> the model's tensor, as the graph node names them
    attrs: dict  #: the node's checked attributes
    cache: object | None = None  #: the native kernels' prepared weights (a ``kernels.WeightCache``), kept between calls
    layer: Callable | None = None  #: a binary conv's bound native call (``kernels.ConvLayer``), operands checked once
    epilogue: Epilogue | None = None  #: a BatchNorm fused into a binary conv
    free: tuple[str, ...] = ()  #: values no later step reads: dropped after this one
    #: its 4-d inputs in the model's memory format first (an op whose rounding depends on the layout: it
    #: runs as the model's op runs); a layout-free op takes them as they come
    model_layout: bool = False
    #: a layout-free op that torch runs faster on channels_last maps (``OpSpec.prefers_channels_last``): given
    #: its 4-d inputs so when the model's layout is NCHW
    channels_last: bool = False
    #: a layout-free op of several maps (``cat``, ``add``): in an NCHW model, given them all in channels_last
    #: when they come in both layouts (a binary conv reads any layout itself)
    joins_maps: bool = False
    #: in an NCHW model, run as ``run(*inputs, memory_format=torch.contiguous_format)``: a binary conv that
    #: writes its output in NCHW memory, as its readers (layout-bound ops) or the model's caller take it
    writes_nchw: bool = False
    #: a float conv's :class:`~onebit.engine.layout_probe.LayoutProbe`: in an NCHW model it runs on
    #: channels_last inputs where torch's conv gives the same bits so
    layout_probe: Callable | None = None
    relayout: str | None = None  #: None, or "contiguous": its output laid out as torch's op returns it
    label: str = ""  #: the op, with what it fused (e.g. ``pack+binary_conv2d+batch_norm+add``)
    module: str = ""  #: the model's module it comes from ("" when none)
    run: Callable = field(default=None, repr=False)  #: the bound op: ``run(*inputs) -> Tensor``
