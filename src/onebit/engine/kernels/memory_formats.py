"""Native float32 copy between NCHW and channels_last memory: a blocked transpose of each sample's plane."""

from __future__ import annotations

import torch

from onebit import _C
from onebit.engine.geometry import check_relayout
from onebit.engine.kernels.registry import direct

__all__ = ["relayout"]

#: below this many elements torch's copy is quicker than the native call's checks and allocation
NATIVE_MIN_ELEMENTS = 4096
_Tensor, _F32 = torch.Tensor, torch.float32
_FORMATS = (torch.channels_last, torch.contiguous_format)


def _planes(x: torch.Tensor, memory_format: torch.memory_format) -> tuple[int, int, int, int] | None:
    """``(rows, cols, sample stride, row stride)``: each sample of ``x`` as a ``[rows, cols]`` plane with
    unit column stride whose transpose is the sample in ``memory_format`` (``[C, H*W]`` to channels_last,
    ``[H*W, C]`` to NCHW); None when the strides of ``x`` do not flatten so (torch copies then)."""
    _, c, h, w = x.shape
    s_n, s_c, s_h, s_w = x.stride()
    if memory_format == torch.channels_last:
        if (w == 1 or s_w == 1) and (h == 1 or s_h == w):
            return c, h * w, s_n, s_c
        return None
    if (c == 1 or s_c == 1) and (h == 1 or w == 1 or s_h == w * s_w):
        return h * w, c, s_n, s_w if w > 1 else s_h
    return None


def relayout(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """float32 ``x [N, C, H, W]`` in ``memory_format`` memory (``torch.channels_last`` or
    ``torch.contiguous_format``): ``x`` itself when it already is, else a copy with the values and strides
    of ``x.contiguous(memory_format=memory_format)``, ``out[n, c, h, w] = x[n, c, h, w]`` bit for bit.

    Eager plain tensors take the native transpose; under tracing, for tensor subclasses, autograd,
    small tensors or strides that do not flatten to planes, torch's own copy runs."""
    if not (type(x) is _Tensor and x.dtype is _F32 and x.is_cpu and x.dim() == 4 and memory_format in _FORMATS):
        check_relayout(x, memory_format)  # the common case passes the quick test above
    # direct() first: it is False while tracing, where the size is symbolic and must not be compared
    if not direct(x) or x.numel() < NATIVE_MIN_ELEMENTS or (x.requires_grad and torch.is_grad_enabled()):
        return x.contiguous(memory_format=memory_format)
    if x.is_contiguous(memory_format=memory_format):
        return x
    planes = _planes(x, memory_format)
    if planes is None:
        return x.contiguous(memory_format=memory_format)
    out = torch.empty_like(x, memory_format=memory_format)  # the strides torch's copy gives
    rows, cols, sample_stride, row_stride = planes
    _C.relayout_raw(
        x.data_ptr(), x.shape[0], rows, cols, sample_stride, row_stride, out.data_ptr(), torch.get_num_threads()
    )
    return out
