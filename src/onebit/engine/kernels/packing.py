"""Native packing of signs into bits: activations, features and weights (custom op ``onebit::pack_activations``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from onebit import _C
from onebit.engine.geometry import check_pack, check_pack_features, check_pack_weights, pair, words_for
from onebit.engine.kernels.plans import PACK_PLANS, pack_plan
from onebit.engine.kernels.registry import custom_op, direct

__all__ = ["pack_activations", "pack_features", "pack_weights"]

_F32 = torch.float32


def _pack_activations_impl(x, padding, pad_value, groups):
    key = entry = None
    if type(x) is torch.Tensor and x.dtype is _F32 and x.is_cpu:
        key = (x.shape, x.stride(), tuple(padding) if type(padding) is list else padding, pad_value, groups)
        try:
            entry = PACK_PLANS.get(key)
        except TypeError:  # unhashable: pack_plan says what is wrong
            key = None
    shape, numbers, copy = entry if entry is not None else pack_plan(x, padding, pad_value, groups, key)
    if copy:
        x = x.contiguous()
    out = torch.empty(shape, dtype=torch.int64)
    if out.numel():
        _C.pack_activations_raw(x.data_ptr(), *numbers, out.data_ptr(), torch.get_num_threads())
    return out


def _pack_activations_fake(x, padding, pad_value, groups):
    shape, *_ = check_pack(x, padding, pad_value, groups)
    return x.new_empty(shape, dtype=torch.int64)


custom_op(
    "pack_activations",
    "(Tensor x, SymInt[] padding, float pad_value, SymInt groups) -> Tensor",
    _pack_activations_impl,
    _pack_activations_fake,
)


def pack_activations(
    x: torch.Tensor, padding: int | Sequence[int] = (0, 0), pad_value: float = 0.0, groups: int = 1
) -> torch.Tensor:
    """float32 ``[N, C, H, W]`` (any strides) -> packed int64 ``[N, H + 2 ph, W + 2 pw, G, Wg]``.

    Padded positions are +1 (all bits clear) for ``pad_value`` 0.0 or 1.0 and -1 (the real
    channels' bits set, never the unused ones) for -1.0. ``pad_value`` 0 is made exact by
    the convolution's correction, given the same ``pad_value``.
    """
    if direct(x):
        return _pack_activations_impl(x, padding, pad_value, groups)
    return torch.ops.onebit.pack_activations(x, list(pair(padding, "padding")), float(pad_value), groups)


def pack_features(x: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, F]`` -> packed int64 ``[N, ceil(F / 64)]`` (the input of a binary linear layer)."""
    n, f = check_pack_features(x)
    return pack_activations(x[:, :, None, None]).view(n, words_for(f))  # (n, -1) is ambiguous for n = 0


def pack_weights(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Signs of weights, packed: float32 ``[C_out, C_in / G, KH, KW]`` -> int64 ``[C_out, KH, KW, Wg]``.

    A 2-D linear weight ``[Out, F]`` packs to ``[Out, ceil(F / 64)]``. ``groups`` only
    checks that ``C_out`` splits into the groups (each output channel's weights already
    cover just its group's inputs).
    """
    if isinstance(w, torch.Tensor):
        w = w.detach()
    check_pack_weights(w, groups)
    if w.dim() == 2:
        return pack_activations(w[:, :, None, None]).view(w.shape[0], -1)
    co, _, kh, kw = w.shape
    return pack_activations(w).view(co, kh, kw, -1)
