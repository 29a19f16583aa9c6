"""Quantizers: small modules that map latent float tensors to low-bit values.

Each quantizer keeps shape and dtype, never modifies its input, is bitwise idempotent
(``q(q(x)) == q(x)``; :class:`DoReFaWeight` from 4 bits on is the one exception, see
its docstring) and has a ``precision`` attribute, the number of bits of
its output (used by summaries and by the packed engine). Forward and
pseudo-gradient (straight-through estimator, STE) are stated in each docstring.

One concept per module, each importing only those above it:

- ``codes``: :class:`IntegerCode`, the integers a quantizer computes with;
- ``base``: the :class:`Quantizer` contract, the registry and the declaration rules;
- ``ste``: :func:`round_ste`, the one rounding straight-through estimator;
- ``signs``: 1-bit quantizers (``ste_sign``, ``approx_sign``, ``swish_sign``, ``magnitude_aware_sign``);
- ``uniform``: uniform k-bit quantizers (``dorefa``, ``dorefa_weight``, ``dorefa_sym``);
- ``ternary``: BitNet b1.58's ``ternary`` weights and ``absmax8`` activations;
- ``int8``: symmetric 8-bit ``int8_weight`` weights and ``int8`` activations (a learned step).

Quantizers are registered under a short alias and resolved with :func:`get`::

    >>> get("ste_sign")
    Sign(clip=1.0)
"""

from onebit.quant.base import (
    _REGISTRY as _REGISTRY,  # the alias table, for code that unregisters an alias it added
)
from onebit.quant.base import (
    EPS,
    Quantizer,
    QuantizerLike,
    computes_as,
    current_method,
    declared,
    factor_code_of,
    get,
    has_sign_levels,
    integer_code_of,
    is_binary,
    is_sign,
    names,
    precision_of,
    register,
    void_declaration,
)
from onebit.quant.codes import IntegerCode
from onebit.quant.int8 import Int8, Int8Weight
from onebit.quant.signs import ApproxSign, MagnitudeAwareSign, Sign, SwishSign
from onebit.quant.ste import round_ste
from onebit.quant.ternary import Absmax8, Ternary
from onebit.quant.uniform import DoReFa, DoReFaSymmetric, DoReFaWeight, symmetric_integers, unsigned_integers

__all__ = [
    "Quantizer",
    "QuantizerLike",
    "IntegerCode",
    "EPS",
    "Sign",
    "ApproxSign",
    "SwishSign",
    "MagnitudeAwareSign",
    "DoReFa",
    "DoReFaWeight",
    "DoReFaSymmetric",
    "Ternary",
    "Absmax8",
    "Int8",
    "Int8Weight",
    "unsigned_integers",
    "symmetric_integers",
    "round_ste",
    "register",
    "get",
    "names",
    "is_sign",
    "has_sign_levels",
    "integer_code_of",
    "factor_code_of",
    "declared",
    "void_declaration",
    "current_method",
    "computes_as",
    "precision_of",
    "is_binary",
]
