"""onebit's native bit-packed CPU kernels, as ``torch.library`` custom ops (namespace ``onebit``).

Layering: :mod:`onebit.engine.geometry` checks every argument (one check, one message per mistake);
this package runs an op natively on checked arguments, :mod:`onebit.engine.reference` in pure torch;
:mod:`onebit.engine.ops` is the one entry per op, choosing between the two. The functions here are
the native implementations behind ``ops`` (tests and benchmarks call them to pick an ISA), and
:class:`ConvLayer` is ``binary_conv2d`` with its constant operands bound (:class:`ThresholdConvLayer`
``binary_conv2d_threshold``, :class:`MaxPoolBitsLayer` ``max_pool_bits``), :class:`TernaryLayer`
``ternary_linear``.

Modules, each one concept: ``registry`` (custom-op registration, the eager bypass of the dispatcher),
``operands`` (addresses of checked tensors, channels_last outputs), ``weight_cache`` (:class:`WeightCache`),
``plans`` (validated calls cached by shape), ``packing``, ``conv``, ``conv_layer``, ``linear``, ``pool``,
``ternary``, ``int8``, ``planes``, ``memory_formats`` (the ops), ``rms_norm`` (BitLinear's norm summed in
torch's order), ``ternary_layer``, ``ordered_conv`` (float convs summed as torch's kernels sum them: a 1x1 conv
as its reference GEMM, a stem as fused multiply-add chains, a depthwise 1x1 conv as a product and its bias),
``huge_pages`` (large weights in transparent huge pages).

Bit convention (``csrc/kernels/pack.h``): bit set = -1 (``x < 0``), bit clear = +1, so
sign(0) = sign(-0.0) = +1 and NaN packs as +1. Channel ``c`` of a group lives in word
``c // 64``, bit ``c % 64`` of that group's words; unused high bits are always 0.

Layouts (all packed tensors are int64, contiguous):

- packed activations ``[N, H + 2 ph, W + 2 pw, G, Wg]``, ``Wg = ceil((C / G) / 64)``, where
  ``G`` is the groups of the conv that consumes them;
- packed conv weights ``[C_out, KH, KW, Wg]``, ``Wg = ceil((C_in / G) / 64)``, output
  channel ``co`` in group ``co // (C_out / G)``;
- packed features ``[N, Wg]`` and linear weights ``[Out, Wg]``, ``Wg = ceil(F / 64)``;
- float32 / int32 conv outputs ``[N, C_out, OH, OW]`` in channels_last memory.

Every function checks its arguments with :mod:`onebit.engine.geometry` (``ValueError`` naming the
problem, the same text as the reference path's) before any native code runs; the native code keeps
the checks that protect memory. Kernels release the GIL, run on ``torch.get_num_threads()`` threads
(small layers stay on one), and are safe to call from several Python threads at once. The
instruction set is chosen at import (best supported, or ``ONEBIT_ISA``) and can be forced with
:func:`set_isa`.

In eager mode the functions call the native kernels directly; under ``torch.compile``,
``torch.export``, ``make_fx``, ``torch.jit.trace`` or with tensor subclasses they go through
``torch.ops.onebit.*``, whose fake implementations give shapes for tracing. Validated shapes are
cached (a native plan per convolution shape), so a repeated call only re-checks dtypes, devices and
contiguity.
"""

from __future__ import annotations

from onebit import _C
from onebit.engine.geometry import conv_output_size, words_for
from onebit.engine.kernels.conv import binary_conv2d, binary_conv2d_int, binary_conv2d_threshold
from onebit.engine.kernels.conv_layer import (  # noqa: F401 (pickles name them here)
    ConvLayer,
    ThresholdConvLayer,
    _conv_layer,
    _threshold_conv_layer,
)
from onebit.engine.kernels.huge_pages import HUGE_PAGE, in_huge_pages
from onebit.engine.kernels.int8 import int8_conv2d, int8_linear
from onebit.engine.kernels.linear import binary_linear, binary_linear_int, binary_linear_threshold
from onebit.engine.kernels.memory_formats import relayout
from onebit.engine.kernels.ordered_conv import (
    ORDERED_CONV_BLOCK,
    TAP_CONV_BLOCK,
    ChannelwiseConv1x1,
    OrderedConv1x1,
    TapOrderedConv,
)
from onebit.engine.kernels.packing import pack_activations, pack_features, pack_weights
from onebit.engine.kernels.planes import combine_planes, pack_integer_planes, pack_integer_planes_nan
from onebit.engine.kernels.plans import MODE_FLOAT, MODE_INT, MODE_THRESHOLD, conv_plan
from onebit.engine.kernels.pool import MaxPoolBitsLayer, max_pool2d, max_pool_bits
from onebit.engine.kernels.registry import custom_op, direct
from onebit.engine.kernels.rms_norm import NORM_LANES, rms_norm
from onebit.engine.kernels.ternary import (
    TERNARY_MAX_FEATURES,
    ternary_linear,
    ternary_linear_int,
    ternary_linear_kernel,
)
from onebit.engine.kernels.ternary_layer import TernaryLayer, _ternary_layer  # noqa: F401 (pickles name it here)
from onebit.engine.kernels.weight_cache import PROBE_WORDS, WeightCache

__all__ = [
    "isa",
    "set_isa",
    "supported_isas",
    "words_for",
    "conv_output_size",
    "pack_activations",
    "pack_features",
    "pack_weights",
    "binary_conv2d",
    "binary_conv2d_int",
    "binary_conv2d_threshold",
    "binary_linear",
    "binary_linear_int",
    "binary_linear_threshold",
    "int8_conv2d",
    "int8_linear",
    "HUGE_PAGE",
    "in_huge_pages",
    "max_pool_bits",
    "max_pool2d",
    "ConvLayer",
    "ThresholdConvLayer",
    "MaxPoolBitsLayer",
    "WeightCache",
    "PROBE_WORDS",
    "ternary_linear",
    "ternary_linear_int",
    "ternary_linear_kernel",
    "TernaryLayer",
    "TERNARY_MAX_FEATURES",
    "rms_norm",
    "NORM_LANES",
    "pack_integer_planes",
    "pack_integer_planes_nan",
    "combine_planes",
    "relayout",
    "ChannelwiseConv1x1",
    "OrderedConv1x1",
    "ORDERED_CONV_BLOCK",
    "TapOrderedConv",
    "TAP_CONV_BLOCK",
]

isa = _C.isa
set_isa = _C.set_isa
supported_isas = _C.supported_isas

# the names these had when the package was one module (tests, and pickles of a ConvLayer)
_conv_plan, _direct, _custom_op = conv_plan, direct, custom_op
_MODE_INT, _MODE_FLOAT, _MODE_THRESHOLD = MODE_INT, MODE_FLOAT, MODE_THRESHOLD
