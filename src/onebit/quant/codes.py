"""Integer codes: which integers a quantizer computes with, so that the packed engine can run it.

A quantizer declares them through :meth:`onebit.quant.Quantizer.integer_code` (its input integers)
and :meth:`onebit.quant.Quantizer.factor_code` (its weight levels); see :class:`IntegerCode`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["IntegerCode", "KINDS"]

#: the integer codes onebit knows, each one exact arithmetic (see :class:`IntegerCode`)
KINDS = ("unsigned", "symmetric", "ternary", "binary", "absmax", "signed")


@dataclass(frozen=True)
class IntegerCode:
    r"""The integers of a quantizer's factorization, with ``n = 2^bits - 1``.

    As an input code (:meth:`~onebit.quant.Quantizer.integer_code`), of
    ``integer_factor(x) = (x_int, s)`` and of the forward:

    - ``"unsigned"``: ``x_int = round(clamp(x, 0, 1) n)`` in {0, ..., n}, ``s = n``,
      ``q(x) = x_int / n`` (``dorefa``);
    - ``"symmetric"`` on ``clip`` c: ``u = (clamp(x, -c, c) / c + 1) / 2``,
      ``x_int = 2 floor(u n + 1/2) - n`` (odd, in [-n, n]), ``s = n / c``,
      ``q(x) = c (2 floor(u n + 1/2) / n - 1)`` (``dorefa_sym``);
    - ``"absmax"`` (8 bits): per token (last dim) ``s = 127 / max(max|x|, 1e-5)``,
      ``x_int = clamp(round(x s), -128, 127)`` (ties to even), ``q(x) = x_int / s`` (``absmax8``);
    - ``"signed"``: with ``m = 2^(bits-1) - 1`` and ONE divisor ``s`` per tensor (the one
      ``integer_factor`` returns), ``x_int = clamp(round(x s), -m, m)`` (ties to even),
      ``q(x) = x_int / s`` (``int8``: m = 127).

    As a levels code (:meth:`~onebit.quant.Quantizer.factor_code`), of the levels of
    ``factor(w) = (levels, scale)``: ``"symmetric"`` (odd integers in [-n, n], ``dorefa_weight``),
    ``"ternary"`` ({-1, 0, +1}), ``"binary"`` (+-1, what ``sign_levels`` declares) or ``"signed"``
    (every integer in [-m, m], m = 2^(bits-1) - 1; ``int8_weight``); ``clip`` is unused.

    :attr:`largest` bounds ``|x_int|`` (or ``|levels|``): a layer's integer sum is exact in float32
    while ``taps * largest_in * largest_w < 2^24``.
    """

    kind: str
    bits: int
    clip: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"IntegerCode: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 1 <= self.bits <= 16:
            raise ValueError(f"IntegerCode: bits must be an integer in [1, 16], got {self.bits!r}")
        if self.kind == "signed" and self.bits < 2:
            raise ValueError(f"IntegerCode: a signed code needs bits >= 2, got {self.bits!r}")
        if not self.clip > 0:
            raise ValueError(f"IntegerCode: clip must be positive, got {self.clip!r}")

    @property
    def largest(self) -> int:
        """The largest magnitude of the code's integers: ``n`` (unsigned, symmetric), 128 (absmax),
        ``2^(bits-1) - 1`` (signed), 1 (ternary, binary)."""
        n = 2**self.bits - 1
        return {"unsigned": n, "symmetric": n, "absmax": 2 ** (self.bits - 1), "signed": 2 ** (self.bits - 1) - 1}.get(
            self.kind, 1
        )

    @staticmethod
    def unsigned(bits: int) -> IntegerCode:
        return IntegerCode("unsigned", bits)

    @staticmethod
    def symmetric(bits: int, clip: float = 1.0) -> IntegerCode:
        return IntegerCode("symmetric", bits, float(clip))

    @staticmethod
    def ternary() -> IntegerCode:
        return IntegerCode("ternary", 2)

    @staticmethod
    def binary() -> IntegerCode:
        return IntegerCode("binary", 1)

    @staticmethod
    def absmax(bits: int = 8) -> IntegerCode:
        return IntegerCode("absmax", bits)

    @staticmethod
    def signed(bits: int = 8) -> IntegerCode:
        return IntegerCode("signed", bits)
