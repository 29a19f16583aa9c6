"""Per-image transforms for a training pipeline, in plain torch (no torchvision).

Every transform is a small callable class: ``t(img, generator=None) -> img`` on one image
``[C, H, W]`` of dtype uint8 or floating. A random transform draws only from the ``generator`` it is
given (never torch's global RNG), so a sample's augmentation is a function of that generator's
state; calling one without a generator is an error. A deterministic transform ignores the generator.
:class:`Compose` chains transforms and hands each the same generator.

Crops return views of their input where no padding is needed; no transform here writes into its input.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "CenterCrop",
    "Compose",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "Resize",
    "ToFloat",
    "check_image",
    "crop",
    "resize",
]


# -- helpers -------------------------------------------------------------------------------------


def check_image(img: object) -> torch.Tensor:
    """Returns ``img`` if it is one image ``[C, H, W]`` of dtype uint8 or floating, else raises ValueError."""
    if not isinstance(img, torch.Tensor):
        raise ValueError(f"expected an image tensor [C, H, W] (uint8 or floating), got {type(img).__name__}")
    if img.dim() != 3:
        raise ValueError(f"expected an image tensor [C, H, W] (uint8 or floating), got shape {tuple(img.shape)}")
    if img.dtype != torch.uint8 and not img.dtype.is_floating_point:
        raise ValueError(f"expected an image tensor [C, H, W] of dtype uint8 or floating, got {img.dtype}")
    return img


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _size_pair(size: object, name: str = "size") -> tuple[int, int]:
    """An int ``s`` means ``(s, s)``; a pair means ``(height, width)``."""
    if isinstance(size, int) and not isinstance(size, bool):
        return (_positive_int(size, name),) * 2
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return (_positive_int(size[0], name), _positive_int(size[1], name))
    raise ValueError(f"{name} must be a positive int or a (height, width) pair of positive ints, got {size!r}")


def _ordered_positive_pair(value: object, name: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    try:
        low, high = float(value[0]), float(value[1])
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (0 < low <= high < math.inf):
        raise ValueError(f"{name} must be a (low, high) pair with 0 < low <= high, got {value!r}")
    return (low, high)


def _require_generator(generator: torch.Generator | None, who: str) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"{who} is random and draws only from the generator it is given: "
            f"pass generator=torch.Generator().manual_seed(...), got {generator!r}"
        )
    return generator


def _randint(high: int, generator: torch.Generator) -> int:
    """A uniform integer in ``[0, high)`` drawn from ``generator``."""
    return int(torch.randint(0, high, (1,), generator=generator, device=generator.device).item())


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    """A uniform float in ``[low, high)`` (exactly ``low`` when ``low == high``) drawn from ``generator``."""
    u = torch.rand(1, generator=generator, device=generator.device, dtype=torch.float64).item()
    return low + (high - low) * u


def crop(img: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    """``img[:, top:top + height, left:left + width]`` (a view); the box must lie inside the image."""
    _, h, w = img.shape
    if height <= 0 or width <= 0 or top < 0 or left < 0 or top + height > h or left + width > w:
        raise ValueError(
            f"crop box (top={top}, left={left}, height={height}, width={width}) "
            f"is not inside the image of shape {tuple(img.shape)}"
        )
    return img[:, top : top + height, left : left + width]


def resize(img: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize of ``[C, H, W]`` to ``size = (h, w)`` (``align_corners=False``; with ``antialias``,
    the kernel widens by the shrink factor when shrinking, which low-pass filters). uint8 stays uint8
    (torch rounds and saturates); float stays float. Returns ``img`` itself when the size already matches."""
    h, w = size
    if tuple(img.shape[-2:]) == (h, w):
        return img
    x = img[None]
    # The antialiased kernel is implemented on CPU for uint8, float32 and float64 only.
    compute = x if x.dtype in (torch.uint8, torch.float32, torch.float64) else x.to(torch.float32)
    out = F.interpolate(compute, size=(h, w), mode="bilinear", align_corners=False, antialias=antialias)
    return out[0].to(img.dtype)


def _resized_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int]:
    """An int: the shorter side becomes ``size``, the longer ``int(size * long / short)``; a pair: itself."""
    if isinstance(size, tuple):
        return size
    if width <= height:
        return (int(size * height / width), size)
    return (size, int(size * width / height))


# -- transforms ----------------------------------------------------------------------------------


class Compose:
    """``Compose([t1, t2, ...])(img, g) = ... t2(t1(img, g), g)``: the transforms in order, one generator."""

    def __init__(self, transforms: list) -> None:
        if isinstance(transforms, (str, bytes)) or not isinstance(transforms, Sequence):
            raise ValueError(f"transforms must be a list of callables, got {type(transforms).__name__}")
        for i, t in enumerate(transforms):
            if not callable(t):
                raise ValueError(f"transforms[{i}] is not callable: {t!r}")
        self.transforms: list[Callable] = list(transforms)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            img = t(img, generator)
        return img

    def __repr__(self) -> str:
        if not self.transforms:
            return "Compose([])"
        inner = "".join(f"    {t!r},\n" for t in self.transforms)
        return f"Compose([\n{inner}])"


class ToFloat:
    """``x = img.to(float32) / scale``: uint8 pixels 0..255 become 0..1 with the default scale."""

    def __init__(self, scale: float = 255.0) -> None:
        scale = float(scale)
        if not (0 < scale < math.inf):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.scale = scale

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return check_image(img).to(torch.float32) / self.scale

    def __repr__(self) -> str:
        return f"ToFloat(scale={self.scale})"


class Normalize:
    """``y[c] = (x[c] - mean[c]) / std[c]`` per channel, with ``mean`` and ``std`` float32 tensors ``[C]``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).detach().clone().reshape(-1)
        self.std = torch.as_tensor(std, dtype=torch.float32).detach().clone().reshape(-1)
        if self.mean.numel() == 0:
            raise ValueError("mean must have one value per channel, got an empty sequence")
        if self.mean.shape != self.std.shape:
            raise ValueError(
                f"mean and std must have one value per channel each, got mean of shape {tuple(self.mean.shape)} "
                f"and std of shape {tuple(self.std.shape)}"
            )
        if not bool((self.std != 0).all()):
            raise ValueError(f"std must be non-zero, got {self.std.tolist()}")

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_image(img)
        if img.shape[0] != self.mean.shape[0]:
            raise ValueError(
                f"Normalize has {self.mean.shape[0]} channels (mean and std of shape {tuple(self.mean.shape)}) "
                f"but the image [C, H, W] has shape {tuple(img.shape)}"
            )
        mean, std = self.mean.to(img.device), self.std.to(img.device)
        return (img - mean[:, None, None]) / std[:, None, None]

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class Resize:
    """Bilinear resize (``align_corners=False``, antialiased when shrinking if ``antialias``).

    ``size`` an int: the shorter side becomes ``size`` and the longer ``int(size * long / short)``;
    ``size`` a pair ``(h, w)``: exactly that. uint8 in gives uint8 out; float gives float. An image
    already of the target size is returned as is."""

    def __init__(self, size: int | tuple[int, int], antialias: bool = True) -> None:
        if isinstance(size, int) and not isinstance(size, bool):
            self.size: int | tuple[int, int] = _positive_int(size, "size")
        else:
            self.size = _size_pair(size)
        if not isinstance(antialias, bool):
            raise ValueError(f"antialias must be a bool, got {antialias!r}")
        self.antialias = antialias

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _, h, w = check_image(img).shape
        return resize(img, _resized_size(h, w, self.size), self.antialias)

    def __repr__(self) -> str:
        return f"Resize(size={self.size}, antialias={self.antialias})"


class CenterCrop:
    """The central ``(h, w)`` box: ``top = int(round((H - h) / 2))``, ``left = int(round((W - w) / 2))``
    (Python's round, halves to even). A side shorter than the crop is first zero-padded to the crop's
    size, ``(h - H) // 2`` before and the rest after."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = _size_pair(size)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _, height, width = check_image(img).shape
        h, w = self.size
        if height < h or width < w:
            pad_h, pad_w = max(h - height, 0), max(w - width, 0)
            img = F.pad(img, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
            _, height, width = img.shape
        top = int(round((height - h) / 2.0))
        left = int(round((width - w) / 2.0))
        return crop(img, top, left, h, w)

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


class RandomCrop:
    """Pad ``padding`` pixels of value ``fill`` on every side, then crop ``size = (h, w)`` at an offset
    ``(top, left)`` uniform over the ``(H + 2p - h + 1) * (W + 2p - w + 1)`` possible ones."""

    def __init__(self, size: int | tuple[int, int], padding: int = 0, fill: float = 0) -> None:
        self.size = _size_pair(size)
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be a non-negative int, got {padding!r}")
        if isinstance(fill, bool) or not isinstance(fill, (int, float)):
            raise ValueError(f"fill must be a number, got {fill!r}")
        self.padding = padding
        self.fill = fill

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _, height, width = check_image(img).shape
        generator = _require_generator(generator, "RandomCrop")
        h, w = self.size
        p = self.padding
        if height + 2 * p < h or width + 2 * p < w:
            raise ValueError(
                f"RandomCrop of size {self.size} does not fit in the image of shape {tuple(img.shape)} "
                f"padded by {p} on each side"
            )
        if p:
            img = F.pad(img, (p, p, p, p), value=self.fill)
        top = _randint(height + 2 * p - h + 1, generator)
        left = _randint(width + 2 * p - w + 1, generator)
        return crop(img, top, left, h, w)

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, padding={self.padding}, fill={self.fill})"


class RandomHorizontalFlip:
    """``img.flip(-1)`` (left-right mirror) with probability ``p``; one uniform draw per call."""

    def __init__(self, p: float = 0.5) -> None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p <= 1.0):
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        check_image(img)
        generator = _require_generator(generator, "RandomHorizontalFlip")
        u = torch.rand(1, generator=generator, device=generator.device).item()
        return img.flip(-1) if u < self.p else img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomResizedCrop:
    """The Inception crop: a random box of random area and aspect ratio, resized to ``size``.

    For an image ``H x W``, up to 10 attempts draw ``area = U(scale) * H * W`` and
    ``r = exp(U(log ratio))`` (``r`` = width / height), and set ``w = round(sqrt(area * r))``,
    ``h = round(sqrt(area / r))``; the first with ``0 < w <= W`` and ``0 < h <= H`` is placed at
    ``top ~ U{0..H-h}``, ``left ~ U{0..W-w}``. If all 10 fail, the fallback is the central box of the
    image's own aspect ratio clamped to ``ratio``: the full width with ``h = round(W / min(ratio))``
    when the image is too tall, the full height with ``w = round(H * max(ratio))`` when too wide
    (either at least 1), else the whole image; ``top = (H - h) // 2``, ``left = (W - w) // 2``. The box is then resized
    bilinearly (antialiased if ``antialias``) to ``size``: an int ``s`` means ``(s, s)``, a pair ``(h, w)``."""

    attempts = 10

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        antialias: bool = True,
    ) -> None:
        self.size = _size_pair(size)
        self.scale = _ordered_positive_pair(scale, "scale")
        self.ratio = _ordered_positive_pair(ratio, "ratio")
        if not isinstance(antialias, bool):
            raise ValueError(f"antialias must be a bool, got {antialias!r}")
        self.antialias = antialias

    def get_params(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """The box ``(top, left, h, w)`` for an image ``height x width``, drawn from ``generator``."""
        height = _positive_int(height, "height")
        width = _positive_int(width, "width")
        generator = _require_generator(generator, "RandomResizedCrop")
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(self.attempts):
            area = _uniform(self.scale[0], self.scale[1], generator) * height * width
            r = math.exp(_uniform(log_low, log_high, generator))
            w = int(round(math.sqrt(area * r)))
            h = int(round(math.sqrt(area / r)))
            if 0 < w <= width and 0 < h <= height:
                return _randint(height - h + 1, generator), _randint(width - w + 1, generator), h, w
        image_ratio = width / height
        if image_ratio < self.ratio[0]:
            w, h = width, max(1, int(round(width / self.ratio[0])))
        elif image_ratio > self.ratio[1]:
            w, h = max(1, int(round(height * self.ratio[1]))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _, height, width = check_image(img).shape
        top, left, h, w = self.get_params(height, width, generator)
        return resize(crop(img, top, left, h, w), self.size, self.antialias)

    def __repr__(self) -> str:
        return (
            f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio}, antialias={self.antialias})"
        )
