"""The one sign convention of onebit.

``sign(x) = +1 where x >= 0 else -1``: never zero, so ``sign(0) = sign(-0.0) = +1``.
NaN maps to +1 as well, exactly as the packed engine's bit convention
(bit set = negative). Every quantizer, layer, converter and kernel of onebit
uses this function or its bit-level twin; none uses ``torch.sign``.
"""

from __future__ import annotations

import torch

__all__ = ["sign"]


def sign(x: torch.Tensor) -> torch.Tensor:
    """Return +1 where ``x`` is not negative and -1 where it is, in ``x``'s dtype (never 0)."""
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x < 0, -one, one)
