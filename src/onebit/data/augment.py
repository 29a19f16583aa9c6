"""Light, batch-level augmentation on normalized image tensors: random translation and flips.

Randomness comes from an explicit ``torch.Generator`` so a training run (and its
resumption from a checkpoint) is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Augment"]


@dataclass(frozen=True)
class Augment:
    """``crop_padding``: translate each image by up to that many pixels in x and y (zero padding,
    i.e. the mean after normalization, then a random crop back to size); ``flip``: mirror each image
    left-right with probability 1/2."""

    crop_padding: int = 0
    flip: bool = False

    @classmethod
    def parse(cls, spec: str, image_size: tuple[int, int]) -> "Augment":
        """``"none"``, ``"crop"``, ``"flip"`` or ``"crop+flip"``; the crop padding is 1/8 of the image side."""
        parts = {p for p in spec.replace(",", "+").split("+") if p and p != "none"}
        unknown = parts - {"crop", "flip"}
        if unknown:
            raise ValueError(f"unknown augmentation {spec!r}; use none, crop, flip or crop+flip")
        pad = max(1, min(image_size) // 8) if "crop" in parts else 0
        return cls(crop_padding=pad, flip="flip" in parts)

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def describe(self) -> str:
        parts = ([f"crop±{self.crop_padding}"] if self.crop_padding else []) + (["flip"] if self.flip else [])
        return "+".join(parts) or "none"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch ``[N, C, H, W]``; returns a new tensor."""
        n, _, h, w = x.shape
        if self.crop_padding:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # [N, 1, H, 1]
            cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # [N, 1, 1, W]
            batch = torch.arange(n)[:, None, None, None]
            chans = torch.arange(x.shape[1])[None, :, None, None]
            x = padded[batch, chans, rows, cols]
        if self.flip:
            mask = torch.rand(n, generator=generator) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return x
