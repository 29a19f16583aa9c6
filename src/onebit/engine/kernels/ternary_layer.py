"""A native ternary x int8 linear layer (BitLinear) with its constant operands bound: the call a packed
model's ``ternary_linear`` steps make."""

from __future__ import annotations

import torch

from onebit import _C
from onebit.engine.geometry import check_ternary
from onebit.engine.kernels.operands import channel_ptr
from onebit.engine.kernels.registry import direct
from onebit.engine.kernels.ternary import TERNARY_MAX_FEATURES, ternary_linear

__all__ = ["TernaryLayer"]

_F32 = torch.float32
_Tensor = torch.Tensor


class TernaryLayer:
    """``layer(x)`` is ``ternary_linear(x, wp, in_features=in_features, scale=scale, bias=bias)``, bit
    for bit: ``(x_int @ levels.T) / s * scale + bias`` of float32 tokens ``x`` ``[N, F]``.

    The weight, scale and bias are checked once, here, by the checks :func:`ternary_linear` makes; a
    call checks only its input, which saves the per-call argument handling that costs as much as a
    tenth of a decoding step's kernel (batch 1). The bound tensors may be written but not resized or
    replaced. Under tracing, with tensor subclasses or on any input but a plain float32 CPU matrix
    with unit feature stride, a call takes :func:`ternary_linear` itself.
    """

    __slots__ = ("wp", "in_features", "scale", "bias", "out_features", "_ptrs")

    def __init__(self, wp: torch.Tensor, *, in_features: int, scale=None, bias=None):
        _, f, out = check_ternary(torch.empty((0, in_features)), wp, in_features, _F32, scale, bias)
        if f > TERNARY_MAX_FEATURES:
            raise ValueError(f"ternary_linear: in_features={f} exceeds {TERNARY_MAX_FEATURES} (exact float32 sums)")
        self.wp, self.in_features, self.scale, self.bias, self.out_features = wp, f, scale, bias, out
        # the bound tensors' addresses (they stay put): weights, scale, bias
        self._ptrs = (wp.data_ptr(), channel_ptr(scale, "scale", _F32, out), channel_ptr(bias, "bias", _F32, out))

    def __reduce__(self):
        # a copy or a pickle is built again from its operands: the addresses it keeps are its own tensors'
        return _ternary_layer, (self.wp, self.in_features, self.scale, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = self.in_features
        if not (
            type(x) is _Tensor
            and x.dtype is _F32
            and x.is_cpu
            and x.dim() == 2
            and x.shape[1] == f
            and x.stride(1) == 1
            and x.stride(0) >= f
            and direct()
        ):
            return ternary_linear(x, self.wp, in_features=f, scale=self.scale, bias=self.bias)
        n = x.shape[0]
        y = torch.empty((n, self.out_features), dtype=_F32)
        if n > 0:
            w_ptr, scale_ptr, bias_ptr = self._ptrs
            threads = torch.get_num_threads()
            _C.ternary_linear_raw(
                x.data_ptr(), n, f, x.stride(0), w_ptr, self.out_features, scale_ptr, bias_ptr, y.data_ptr(), threads
            )
        return y


def _ternary_layer(wp, in_features: int, scale, bias) -> TernaryLayer:
    """A :class:`TernaryLayer` built again (copies and pickles)."""
    return TernaryLayer(wp, in_features=in_features, scale=scale, bias=bias)
