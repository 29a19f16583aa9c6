"""How the torch of this process rounds an eval-mode BatchNorm, so that a native kernel can
compute the same bits.

torch's CPU BatchNorm in eval mode computes, per channel ``c``,

    alpha[c] = weight[c] * (1 / sqrt(running_var[c] + eps))
    beta[c]  = bias[c] - running_mean[c] * alpha[c]
    y        = x * alpha[c] + beta[c]

and whether ``x * alpha + beta`` (and ``beta`` itself) is rounded once (a fused multiply-add) or
twice depends on the kernel torch picked at start-up: its AVX2 and AVX-512 kernels fuse, its
default kernel does not (``ATEN_CPU_CAPABILITY``). :func:`batchnorm_rounding` finds out which by
running torch's BatchNorm on random data, and :func:`batchnorm_epilogue` gives a layer's
``(scale, shift, fused)`` for the packed convolution's epilogue after checking, on random data of
that layer's channel count in both memory formats, that it reproduces torch bit for bit. When
anything does not match, the answer is ``None`` and the BatchNorm stays torch's own op.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from onebit.engine.reference import fused_multiply_add

__all__ = ["batchnorm_rounding", "batchnorm_epilogue"]


def _emulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, fused: bool) -> torch.Tensor:
    """``x * scale[c] + shift[c]`` over dim 1, rounded once (``fused``) or twice, in float32."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    s, t = scale.view(view), shift.view(view)
    return fused_multiply_add(x, s, t) if fused else x * s + t  # one rounding, or two torch ops


def _affine(running_mean, running_var, weight, bias, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's ``(alpha, beta)``: alpha by the formula above, beta read from torch: its output at the zero
    ``x`` whose product with alpha is -0.0 (so ``-0.0 + beta`` is beta, the sign of a zero beta kept)."""
    channels = running_mean.numel()
    # float32 scalar arithmetic, correctly rounded as C++'s std::sqrt and `/` (numpy; torch.sqrt's
    # vectorized kernel may differ in the last bit)
    var = running_var.detach().numpy().astype(np.float32)
    invstd = torch.from_numpy(np.float32(1) / np.sqrt(var + np.float32(eps)))
    alpha = invstd * weight if weight is not None else invstd
    zero = torch.where(torch.signbit(alpha), 0.0, -0.0).view(1, channels, 1, 1)
    beta = F.batch_norm(zero, running_mean, running_var, weight, bias, False, 0.0, eps).view(channels)
    return alpha.contiguous(), beta.contiguous()


def _probes(channels: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, channels, 3, 5), (1, channels, 1, 1), (1, channels, 4, 9))
    out = []
    for shape in shapes:
        x = torch.randn(shape, generator=g) * 37.0
        x[:, :, 0, 0], x[:, :, -1, -1] = 0.0, -0.0  # signed zeros in every channel
        out += [x, x.contiguous(memory_format=torch.channels_last)]
    return out


def _matches(running_mean, running_var, weight, bias, eps: float, fused: bool) -> bool:
    alpha, beta = _affine(running_mean, running_var, weight, bias, eps)
    for x in _probes(running_mean.numel(), seed=running_mean.numel()):
        want = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        got = _emulate(x, alpha, beta, fused)
        if not torch.equal(want.contiguous().view(torch.int32), got.contiguous().view(torch.int32)):
            return False
    return True


@functools.lru_cache(maxsize=1)
def batchnorm_rounding() -> str | None:
    """``"fma"`` when this process's torch rounds ``x * alpha + beta`` once, ``"mul_add"`` when
    twice, ``None`` when neither reproduces it (then no BatchNorm is fused)."""
    g = torch.Generator().manual_seed(0)
    answers = set()
    for channels in (1, 3, 17, 64, 67):
        mean = torch.randn(channels, generator=g)
        var = torch.rand(channels, generator=g) * 2 + 0.1
        weight = torch.randn(channels, generator=g)
        bias = torch.randn(channels, generator=g)
        found = [
            name
            for name, fused in (("fma", True), ("mul_add", False))
            if _matches(mean, var, weight, bias, 1e-5, fused)
        ]
        if len(found) != 1:
            return None
        answers.add(found[0])
    return answers.pop() if len(answers) == 1 else None


def batchnorm_epilogue(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """``(scale, shift, fused)`` with which ``y * scale[c] + shift[c]`` (rounded once when
    ``fused``) equals torch's eval-mode BatchNorm of ``y`` bit for bit in this process, checked on
    random data of this layer's channel count; ``None`` when it cannot be reproduced."""
    mode = batchnorm_rounding()
    if mode is None:
        return None
    tensors = [
        t.detach().to(torch.float32) if t is not None else None for t in (running_mean, running_var, weight, bias)
    ]
    fused = mode == "fma"
    if not _matches(*tensors, eps, fused):
        return None
    alpha, beta = _affine(*tensors, eps)
    return alpha, beta, fused
