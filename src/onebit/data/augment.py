"""The augmentation of a training run, and its batch-level form for images held in memory.

:class:`Augment` names what a run does to each training image: a random translation
(``crop``: pad by 1/8 of the side, crop back), a random resized crop (``resized-crop``:
Inception's crop of 8-100 % of the area, aspect 3/4-4/3, resized to the model's size) and
left-right flips. :meth:`onebit.data.DataBundle.train_transform` turns it into a per-sample
pipeline; ``Augment.__call__`` applies translation and flips to a whole normalized batch at
once, drawing from an explicit ``torch.Generator`` (the trainer's fast path for in-memory data).
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
    resized_crop: bool = False

    @classmethod
    def parse(cls, spec: str, image_size: tuple[int, int]) -> Augment:
        """``"none"``, or ``+``-joined parts: ``crop`` (padding 1/8 of the image side),
        ``resized-crop`` and ``flip``; e.g. ``"crop+flip"``, ``"resized-crop+flip"``."""
        parts = {p for p in spec.replace(",", "+").split("+") if p and p != "none"}
        unknown = parts - {"crop", "flip", "resized-crop"}
        if unknown:
            raise ValueError(
                f"unknown augmentation {spec!r}; use none, crop, flip, crop+flip, resized-crop or resized-crop+flip"
            )
        if {"crop", "resized-crop"} <= parts:
            raise ValueError(f"augmentation {spec!r}: choose crop or resized-crop, not both")
        pad = max(1, min(image_size) // 8) if "crop" in parts else 0
        return cls(crop_padding=pad, flip="flip" in parts, resized_crop="resized-crop" in parts)

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.resized_crop

    def describe(self) -> str:
        parts = ([f"crop±{self.crop_padding}"] if self.crop_padding else []) + (
            ["resized-crop"] if self.resized_crop else []
        )
        parts += ["flip"] if self.flip else []
        return "+".join(parts) or "none"

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a batch ``[N, C, H, W]`` (translation and flips); returns a new tensor."""
        if self.resized_crop:
            raise ValueError(
                "a resized crop is a per-sample augmentation (DataBundle.train_transform), not a batch one"
            )
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
