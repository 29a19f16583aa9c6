"""A native ternary x int8 linear layer (BitLinear) with its constant operands bound, and its RMSNorm: the
call a packed model's ``ternary_linear`` steps make."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from onebit import _C
from onebit.engine.geometry import check_ternary
from onebit.engine.kernels.operands import channel_ptr
from onebit.engine.kernels.registry import direct
from onebit.engine.kernels.ternary import TERNARY_MAX_FEATURES, ternary_linear

__all__ = ["TernaryLayer"]

_F32 = torch.float32
_Tensor = torch.Tensor


class TernaryLayer:
    """``layer(x)`` is ``ternary_linear(x_n, wp, in_features=in_features, scale=scale, bias=bias)``, bit
    for bit: ``(x_int @ levels.T) / s * scale + bias`` of float32 tokens ``x`` ``[N, F]``, where ``x_n``
    is ``F.rms_norm(x, (F,), eps=norm_eps)`` (BitLinear's norm) or, with ``norm_eps=None``, ``x``.

    The weight, scale and bias are checked once, here, by the checks :func:`ternary_linear` makes; a
    call checks only its input, which saves the per-call argument handling that costs as much as a
    tenth of a decoding step's kernel (batch 1). The bound tensors may be written but not resized or
    replaced. Under tracing, with tensor subclasses or on any input but a plain float32 CPU matrix
    with unit feature stride, a call takes ``F.rms_norm`` and :func:`ternary_linear` themselves.

    The norm runs inside the native call (:mod:`.rms_norm`, no float32 ``[N, F]`` made and read again,
    no four dispatched torch ops) for contiguous tokens whose shape ``norm_order(x)`` answers with the
    vector width in which torch sums it (``onebit.engine.sum_order.NormOrderProbe``); on an answer of 0,
    or without ``norm_order``, ``F.rms_norm`` runs first.
    """

    __slots__ = ("wp", "in_features", "scale", "bias", "norm_eps", "norm_order", "out_features", "_ptrs")

    def __init__(
        self,
        wp: torch.Tensor,
        *,
        in_features: int,
        scale=None,
        bias=None,
        norm_eps: float | None = None,
        norm_order: Callable[[torch.Tensor], int] | None = None,
    ):
        _, f, out = check_ternary(torch.empty((0, in_features)), wp, in_features, _F32, scale, bias)
        if f > TERNARY_MAX_FEATURES:
            raise ValueError(f"ternary_linear: in_features={f} exceeds {TERNARY_MAX_FEATURES} (exact float32 sums)")
        if norm_eps is not None and not norm_eps > 0:
            raise ValueError(f"ternary_linear: norm_eps must be positive, got {norm_eps}")
        self.wp, self.in_features, self.scale, self.bias, self.out_features = wp, f, scale, bias, out
        self.norm_eps = None if norm_eps is None else float(norm_eps)
        self.norm_order = norm_order
        # the bound tensors' addresses (they stay put): weights, scale, bias
        self._ptrs = (wp.data_ptr(), channel_ptr(scale, "scale", _F32, out), channel_ptr(bias, "bias", _F32, out))

    def __reduce__(self):
        # a copy or a pickle is built again from its operands: the addresses it keeps are its own tensors'
        return _ternary_layer, (self.wp, self.in_features, self.scale, self.bias, self.norm_eps, self.norm_order)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f, eps = self.in_features, self.norm_eps
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
            if eps is not None:
                x = F.rms_norm(x, (f,), eps=eps)
            return ternary_linear(x, self.wp, in_features=f, scale=self.scale, bias=self.bias)
        lanes = 0
        if eps is not None:
            order = self.norm_order
            lanes = order(x) if order is not None and x.is_contiguous() else 0
            if not lanes:
                x = F.rms_norm(x, (f,), eps=eps)
        n = x.shape[0]
        y = torch.empty((n, self.out_features), dtype=_F32)
        if n > 0:
            w_ptr, scale_ptr, bias_ptr = self._ptrs
            threads = torch.get_num_threads()
            _C.ternary_linear_raw(
                x.data_ptr(),
                n,
                f,
                x.stride(0),
                w_ptr,
                self.out_features,
                scale_ptr,
                bias_ptr,
                y.data_ptr(),
                threads,
                lanes,
                0.0 if eps is None else eps,
            )
        return y


def _ternary_layer(wp, in_features: int, scale, bias, norm_eps=None, norm_order=None) -> TernaryLayer:
    """A :class:`TernaryLayer` built again (copies and pickles)."""
    return TernaryLayer(wp, in_features=in_features, scale=scale, bias=bias, norm_eps=norm_eps, norm_order=norm_order)
