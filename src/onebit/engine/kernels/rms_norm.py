"""RMSNorm without weight summed in torch's own order (``csrc/kernels/rms_norm.h``): a packed BitLinear
normalizes its tokens inside its native call and still gives ``F.rms_norm``'s bits.

    ss  = cascade sum of fl(x_k^2), torch's order with ``lanes``-wide vectors
    y_k = fl(x_k * fl(1 / fl(sqrt(fl(fl(ss / K) + eps)))))

Which ``lanes`` a shape gets from torch (8 on x86-64) is asked of torch by
:class:`onebit.engine.sum_order.NormOrderProbe`.
"""

from __future__ import annotations

import torch

from onebit import _C

__all__ = ["NORM_LANES", "rms_norm"]

#: the vector widths onebit can sum in
NORM_LANES = (4, 8, 16)


def rms_norm(x: torch.Tensor, eps: float, *, lanes: int) -> torch.Tensor:
    """``F.rms_norm(x, (K,), eps=eps)`` of float32 CPU ``x`` ``[N, K]`` (rows may be strided, unit feature
    stride), its sums in torch's cascade order with ``lanes``-wide vectors (one of :data:`NORM_LANES`)."""
    if not (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2):
        raise ValueError(f"rms_norm: x must be a float32 CPU [N, K] tensor, got {getattr(x, 'dtype', type(x))}")
    if x.shape[1] == 0:
        raise ValueError(f"rms_norm: x has no features, shape {list(x.shape)}")
    if lanes not in NORM_LANES:
        raise ValueError(f"rms_norm: lanes must be one of {NORM_LANES}, got {lanes}")
    n, k = x.shape
    if x.stride(1) != 1 or (n > 1 and x.stride(0) < k):
        x = x.contiguous()
    y = torch.empty((n, k), dtype=torch.float32)
    if n > 0:
        _C.rms_norm_raw(x.data_ptr(), n, k, x.stride(0) if n > 1 else k, float(eps), lanes, y.data_ptr())
    return y
