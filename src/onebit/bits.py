"""Bit-packing of signs into 64-bit words: onebit's bit convention, in Python.

    bit = 1  <=>  x < 0 (the value -1);   bit = 0  <=>  x >= 0 (the value +1, so sign(0) = +1)

The last dimension (channels) is packed, channel ``c`` into word ``c // 64`` at
bit ``c % 64``; unused high bits of the last word are 0. Words are returned as
``torch.int64`` (the same 64 bits as the C++ kernels' ``uint64``).

:func:`pack_signs` runs the native kernel (``onebit._C.pack_rows``);
:func:`pack_signs_reference` is its plain-torch specification, built on
:func:`pack_bits` / :func:`unpack_bits`, which the engine's pure-torch kernels share.
This module needs the native extension only for :func:`pack_signs`.
"""

from __future__ import annotations

import torch

__all__ = ["words_for", "pack_bits", "unpack_bits", "pack_signs", "pack_signs_reference", "unpack_signs"]

_SHIFTS = torch.arange(64, dtype=torch.int64)


def words_for(channels: int) -> int:
    """Number of 64-bit words that hold ``channels`` bits."""
    return (channels + 63) // 64


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool ``[..., C]`` -> int64 words ``[..., ceil(C / 64)]``: channel ``c`` at word ``c // 64``, bit ``c % 64``."""
    channels = bits.shape[-1]
    words = words_for(channels)
    if words * 64 != channels:
        bits = torch.nn.functional.pad(bits, (0, words * 64 - channels), value=False)
    bits = bits.reshape(*bits.shape[:-1], words, 64).to(torch.int64)
    # distinct powers of two: the sum is the bitwise or; bit 63 wraps into the int64 sign bit
    return (bits << _SHIFTS).sum(dim=-1)


def unpack_bits(words: torch.Tensor, channels: int) -> torch.Tensor:
    """int64 words ``[..., W]`` -> bool ``[..., channels]`` (inverse of :func:`pack_bits`)."""
    if words.shape[-1] != words_for(channels):
        raise ValueError(f"unpack_bits: {channels} channels need {words_for(channels)} words, got {words.shape[-1]}")
    bits = (words.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.reshape(*words.shape[:-1], words.shape[-1] * 64)[..., :channels].bool()


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of ``x[..., C]`` (float32) into int64 words ``[..., ceil(C / 64)]``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"pack_signs expects a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"pack_signs expects float32, got {x.dtype}")
    if x.device.type != "cpu":
        raise ValueError(f"pack_signs runs on the CPU, got a tensor on {x.device}")
    if x.dim() == 0:
        raise ValueError("pack_signs expects at least one dimension (the channels), got a scalar")
    channels = x.shape[-1]
    rows = x.reshape(-1, channels) if channels else x.reshape(-1, 0)
    if rows.stride(-1) != 1 and channels > 1:
        rows = rows.contiguous()
    from onebit import _C

    out = torch.empty(rows.shape[0], words_for(channels), dtype=torch.int64)
    if rows.shape[0] and channels:
        _C.pack_rows(rows, out)
    return out.reshape(*x.shape[:-1], words_for(channels))


def pack_signs_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain-torch specification of :func:`pack_signs`."""
    return pack_bits(x < 0)


def unpack_signs(words: torch.Tensor, channels: int) -> torch.Tensor:
    """Inverse of packing: int64 words ``[..., W]`` -> float32 signs ``[..., channels]`` (+1 / -1)."""
    return 1.0 - 2.0 * unpack_bits(words, channels).to(torch.float32)
