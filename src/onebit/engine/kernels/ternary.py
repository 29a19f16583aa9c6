"""Native ternary weights x int8 activations (BitLinear): see ``csrc/kernels/ternary_linear.h``.

Custom ops ``onebit::ternary_linear`` (float32 tokens, quantized inside the kernel) and
``onebit::ternary_linear_int`` (their int8 integers); the 2-bit weight layout is
:func:`onebit.engine.reference.pack_ternary_weights`'.
"""

from __future__ import annotations

import torch

from onebit import _C
from onebit.engine.geometry import check_epilogue, check_ternary
from onebit.engine.kernels.operands import channel_ptr
from onebit.engine.kernels.registry import custom_op, direct

__all__ = ["TERNARY_MAX_FEATURES", "ternary_linear", "ternary_linear_int", "ternary_linear_kernel"]

#: largest in_features of ternary_linear: the integer sums stay exact in float32 (128 * F < 2^24)
TERNARY_MAX_FEATURES = 1 << 17
_F32 = torch.float32


def _ternary_linear_impl(x, wp, in_features, scale, bias):
    n, f, out = check_ternary(x, wp, in_features, _F32)
    if f > TERNARY_MAX_FEATURES:
        raise ValueError(f"ternary_linear: in_features={f} exceeds {TERNARY_MAX_FEATURES} (exact float32 sums)")
    scale_ptr = channel_ptr(scale, "scale", _F32, out)
    bias_ptr = channel_ptr(bias, "bias", _F32, out)
    if n > 0 and (x.stride(1) != 1 or x.stride(0) < f):
        x = x.contiguous()
    y = torch.empty((n, out), dtype=_F32)
    if n > 0:
        threads = torch.get_num_threads()
        _C.ternary_linear_raw(
            x.data_ptr(), n, f, x.stride(0), wp.data_ptr(), out, scale_ptr, bias_ptr, y.data_ptr(), threads
        )
    return y


def _ternary_linear_int_impl(x, wp, in_features):
    n, f, out = check_ternary(x, wp, in_features, torch.int8)
    x = x.contiguous()
    y = torch.empty((n, out), dtype=torch.int32)
    if n > 0:
        _C.ternary_linear_int_raw(x.data_ptr(), n, f, wp.data_ptr(), out, y.data_ptr(), torch.get_num_threads())
    return y


def _ternary_linear_fake(x, wp, in_features, scale, bias):
    n, _, out = check_ternary(x, wp, in_features, _F32)
    check_epilogue(out, scale, bias)
    return x.new_empty((n, out))


def _ternary_linear_int_fake(x, wp, in_features):
    n, _, out = check_ternary(x, wp, in_features, torch.int8)
    return x.new_empty((n, out), dtype=torch.int32)


custom_op(
    "ternary_linear",
    "(Tensor x, Tensor wp, SymInt in_features, Tensor? scale, Tensor? bias) -> Tensor",
    _ternary_linear_impl,
    _ternary_linear_fake,
)
custom_op(
    "ternary_linear_int",
    "(Tensor x, Tensor wp, SymInt in_features) -> Tensor",
    _ternary_linear_int_impl,
    _ternary_linear_int_fake,
)


def ternary_linear(
    x: torch.Tensor,
    wp: torch.Tensor,
    *,
    in_features: int,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 ``[N, Out]`` ``= (x_int @ levels.T) / s * scale + bias``: BitLinear's arithmetic.

    ``x`` is float32 ``[N, F]`` (rows may be strided), quantized per token inside the kernel as
    :class:`onebit.quant.Absmax8` does (``s = 127 / max(max|x|, 1e-5)``,
    ``x_int = clamp(round(x s), -128, 127)``); ``wp`` is the uint8 ``[Out, ceil(F / 4)]`` 2-bit
    weight of :func:`onebit.engine.reference.pack_ternary_weights`; ``scale`` and ``bias`` are
    optional float32 ``[Out]``. The integer sum is exact, the three roundings after it are those of
    the layer, in its order (bit-identical). A token holding a NaN or infinity gives NaNs.
    """
    if direct(x, wp, scale, bias):
        return _ternary_linear_impl(x, wp, in_features, scale, bias)
    return torch.ops.onebit.ternary_linear(x, wp, in_features, scale, bias)


def ternary_linear_int(x: torch.Tensor, wp: torch.Tensor, *, in_features: int) -> torch.Tensor:
    """int32 ``[N, Out]`` ``= x @ levels.T`` of int8 ``x`` ``[N, F]`` and 2-bit ternary weights
    (see :func:`ternary_linear`)."""
    if direct(x, wp):
        return _ternary_linear_int_impl(x, wp, in_features)
    return torch.ops.onebit.ternary_linear_int(x, wp, in_features)


def ternary_linear_kernel() -> str:
    """The kernel :func:`ternary_linear` runs on the active ISA: ``avx512_vnni``, ``avx2``,
    ``neon_dotprod``, ``neon`` or ``reference``."""
    return _C.ternary_linear_kernel()
