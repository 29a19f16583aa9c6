"""Where a run computes and in which precision: ``--device auto|cpu|cuda``, ``--precision fp32|bf16|fp16``.

Mixed precision is torch's autocast around the training forward pass and loss: matrix
products and convolutions run in bf16 or fp16, reductions and the loss in fp32, and the
weights (latent binary weights included) stay fp32. fp16 scales the loss (``GradScaler``) so
that small gradients do not flush to zero; bf16 has fp32's range and needs no scaling.
Evaluation, ``pack`` and export always compute in fp32, so a checkpoint trained in any
precision packs bit-identically to its fp32 model.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

__all__ = ["DEVICES", "PRECISIONS", "resolve_device", "place_model", "autocast", "make_scaler"]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (torchrun's ``LOCAL_RANK``) when CUDA is available, else the CPU;
    ``cuda`` without a GPU is a ``ValueError`` naming the option."""
    if name not in DEVICES:
        raise ValueError(f"unknown --device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available to this torch (use --device cpu or auto)")
    return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")


def place_model(
    model: nn.Module, device: torch.device, memory_format: torch.memory_format, world_size: int = 1
) -> nn.Module:
    """``model`` moved to ``device`` in ``memory_format`` (a GPU becomes this process's current device,
    also for the loader's pinning thread); returns the module a step calls: ``model`` itself, or in a
    process group of ``world_size > 1`` its DistributedDataParallel wrapper."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model.to(device, memory_format=memory_format)
    if world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def autocast(device: torch.device, precision: str):
    """The context a training forward pass runs in: nothing for fp32, else torch's autocast."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A loss scaler for fp16 (None otherwise)."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
