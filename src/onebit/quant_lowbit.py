"""Kept for old imports: the quantizers beyond one bit, now in :mod:`onebit.quant`.

``Ternary`` and ``Absmax8`` live in :mod:`onebit.quant.ternary`, ``DoReFaSymmetric`` and
``symmetric_integers`` in :mod:`onebit.quant.uniform`; ``from onebit.quant import ...`` is the
current path.
"""

from onebit.quant.base import EPS
from onebit.quant.ternary import Absmax8, Ternary
from onebit.quant.uniform import DoReFaSymmetric, symmetric_integers

__all__ = ["Ternary", "Absmax8", "DoReFaSymmetric", "symmetric_integers", "EPS"]
