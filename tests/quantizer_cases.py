"""A user's subclasses of built-in quantizers, shared by the quantizer and engine tests: a
declaration speaks for the forward of the class that makes it."""

from __future__ import annotations

from onebit import quant
from onebit.math import sign


class _ShiftedSign(quant.Sign):
    """Overrides forward, inherits ``is_sign = True`` without declaring it: not a plain sign."""

    def forward(self, x):
        return super().forward(x - 0.5)


class _RedeclaredSign(quant.Sign):
    """Overrides forward and declares again that it is exactly the sign."""

    is_sign = True

    def forward(self, x):
        return sign(x)


class _DoubledMagnitude(quant.MagnitudeAwareSign):
    """Overrides forward only: the inherited factor() no longer describes it."""

    def forward(self, w):
        return 2.0 * super().forward(w)


class _OwnFactor(quant.Sign):
    """Keeps the sign forward (still an input sign) but factors weights into other levels."""

    def factor(self, w):
        return sign(w) * 3.0, None


class _ShiftedDoReFa(quant.DoReFa):
    def forward(self, x):
        return super().forward(x + 0.25)


class _QuietDoReFa(quant.DoReFa):
    """Changes nothing of what DoReFa computes (only its default bit width)."""

    def __init__(self, bits: int = 3):
        super().__init__(bits)
