"""``Step``: one call a packed model makes, with what it fused typed as fields.

A step is a graph node, or a convolution with the nodes fused into it (the packing of its input, a
BatchNorm, the add of a shortcut, an int8 convolution's max pool), as :func:`onebit.engine.fuse.fuse`
makes them.
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


@dataclass(frozen=True, slots=True)
class IntegerPool:
    """A ``max_pool2d`` an int8 convolution applies to its integer sums, before its float epilogue:
    torch's pool of the epilogue's floats, bit for bit, because the epilogue is monotone in each
    channel's sum (:func:`onebit.engine.graph.int8.integer_max_pool` checks it): the pool takes the
    largest sum where the epilogue increases (``sign`` +1) and the smallest where it decreases (-1)."""

    attrs: dict  #: the ``max_pool2d`` node's: ``kernel_size``, ``stride``, ``padding``, ``dilation``, ``ceil_mode``
    sign: torch.Tensor  #: int32 ``[C_out]``: +1 or -1

    def window(self) -> list[int]:
        """The kernels' form: kernel, stride, padding, dilation (each h, w), ceil_mode."""
        a = self.attrs
        return [*a["kernel_size"], *a["stride"], *a["padding"], *a["dilation"], int(a["ceil_mode"])]


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
    #: the bound native call of a binary conv or linear layer (``kernels.ConvLayer``, ``ThresholdConvLayer``) or of a
    #: pool on bits (``MaxPoolBitsLayer``): operands checked once, a call's numbers once per input shape
    layer: Callable | None = None
    epilogue: Epilogue | None = None  #: a BatchNorm fused into a binary or int8 conv, or before a max pool
    pool: IntegerPool | None = None  #: a max pool fused into an int8 conv (after its BatchNorm)
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
    #: a layout-bound op that rounds as the model's layout on a map in either layout, as fast in both (onebit's
    #: channelwise conv; set by its binder): in an NCHW model it takes its input as it comes, run as
    #: ``run(x, model_format=torch.contiguous_format)``, with no copy
    keeps_layout: bool = False
    #: a float conv's :class:`~onebit.engine.layout_probe.LayoutProbe`: in an NCHW model it runs on
    #: channels_last inputs where torch's conv gives the same bits so
    layout_probe: Callable | None = None
    relayout: str | None = None  #: None, or "contiguous": its output laid out as torch's op returns it
    label: str = ""  #: the op, with what it fused (e.g. ``pack+binary_conv2d+batch_norm+add``)
    module: str = ""  #: the model's module it comes from ("" when none)
    run: Callable = field(default=None, repr=False)  #: the bound op: ``run(*inputs) -> Tensor``
