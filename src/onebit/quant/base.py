"""Quantizers: small modules that map latent float tensors to low-bit values.

Each quantizer keeps shape and dtype, never modifies its input, is bitwise idempotent
(``q(q(x)) == q(x)``; :class:`DoReFaWeight` from 4 bits on is the one exception, see
its docstring) and has a ``precision`` attribute, the number of bits of
its output (used by summaries and by the packed engine). Forward and
pseudo-gradient (straight-through estimator, STE) are stated in each docstring.

Quantizers are registered under a short alias and resolved with :func:`get`::

    >>> get("ste_sign")
    Sign(clip=1.0)
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Union

import torch
from torch import nn

from onebit.math import sign

__all__ = [
    "Quantizer",
    "Sign",
    "ApproxSign",
    "SwishSign",
    "MagnitudeAwareSign",
    "DoReFa",
    "DoReFaWeight",
    "register",
    "get",
    "names",
    "is_sign",
    "has_sign_levels",
    "declared",
    "void_declaration",
    "current_method",
    "computes_as",
    "precision_of",
    "is_binary",
]

QuantizerLike = Union[str, dict, nn.Module, Callable[[torch.Tensor], torch.Tensor], None]

_REGISTRY: dict[str, type[nn.Module]] = {}


def register(alias: str):
    """Class decorator: make a quantizer available to :func:`get` under ``alias``."""

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if alias in _REGISTRY and _REGISTRY[alias] is not cls:
            raise ValueError(f"quantizer alias {alias!r} is already registered to {_REGISTRY[alias].__name__}")
        _REGISTRY[alias] = cls
        cls.alias = alias
        return cls

    return decorator


def names() -> list[str]:
    """The registered quantizer aliases, sorted."""
    return sorted(_REGISTRY)


def get(identifier: QuantizerLike) -> nn.Module | Callable | None:
    """Resolve a quantizer.

    - ``None`` -> ``None`` (no quantization);
    - an alias string -> a new instance with default arguments;
    - a dict ``{"name": alias, **arguments}`` -> a new instance with those arguments (what a command
      line or a JSON config can give: ``--model-arg 'input_quantizer={"name": "dorefa_sym", "clip": 2.0}'``);
    - a quantizer instance (any ``nn.Module``) -> returned as is;
    - a quantizer class -> a new instance with default arguments;
    - any other callable -> returned as is.
    """
    if identifier is None:
        return None
    if isinstance(identifier, str):
        try:
            return _REGISTRY[identifier]()
        except KeyError:
            raise ValueError(f"unknown quantizer {identifier!r}; known quantizers: {', '.join(names())}") from None
    if isinstance(identifier, dict):
        arguments = dict(identifier)
        name = arguments.pop("name", None)
        if not isinstance(name, str):
            raise ValueError(f"a quantizer given as a dict needs its alias under 'name', got {identifier!r}")
        if name not in _REGISTRY:
            raise ValueError(f"unknown quantizer {name!r}; known quantizers: {', '.join(names())}")
        try:
            return _REGISTRY[name](**arguments)
        except TypeError as error:
            raise ValueError(f"quantizer {name!r}: {error}") from None
    if isinstance(identifier, nn.Module):
        return identifier
    if isinstance(identifier, type) and issubclass(identifier, nn.Module):
        return identifier()
    if callable(identifier):
        return identifier
    raise TypeError(
        f"a quantizer must be an alias string, a {{'name': alias, ...}} dict, a module, a callable or None, "
        f"got {type(identifier).__name__}"
    )


# ---------------------------------------------------------------------------
# what a quantizer declares, and which of its declarations still hold
#
# A declaration (the attributes ``is_sign`` / ``sign_levels``, the methods ``factor`` /
# ``integer_factor``) describes the ``forward`` of the class that makes it. A subclass that
# overrides ``forward`` (or ``factor``) below it has not declared anything about its own
# computation: the declaration is void for it until the subclass makes it again.

#: the methods an attribute speaks about
_DECLARES_ABOUT = {"is_sign": ("forward",), "sign_levels": ("forward", "factor")}


def _defined_at(cls: type, name: str) -> int | None:
    """The position in ``cls.__mro__`` of the class that defines ``name`` (0: ``cls`` itself), or None
    (a few dict lookups, traced as constants by torch.compile)."""
    for depth, c in enumerate(cls.__mro__):
        if name in c.__dict__:
            return depth
    return None


def _depth(obj: object, name: str) -> int | None:
    """Where ``obj``'s ``name`` comes from: -1 for the instance itself, else :func:`_defined_at`."""
    if name in getattr(obj, "__dict__", ()):
        return -1
    return _defined_at(type(obj), name)


#: (class, name, methods) -> :func:`_holds` for instances that set none of them themselves (one entry
#: per quantizer class and question)
_HOLDS: dict[tuple, bool] = {}


def _holds(obj: object, name: str, methods: tuple[str, ...]) -> bool:
    """``name`` (defined on ``obj``) is declared at or below every class that defines one of ``methods``."""
    own = getattr(obj, "__dict__", None)
    if own:
        for attribute in (name, *methods):
            if attribute in own:  # set on the instance: not cached
                return _holds_uncached(obj, name, methods)
    key = (type(obj), name, methods)
    holds = _HOLDS.get(key)
    if holds is None:
        holds = _HOLDS[key] = _holds_uncached(obj, name, methods)
    return holds


def _holds_uncached(obj: object, name: str, methods: tuple[str, ...]) -> bool:
    here = _depth(obj, name)
    if here is None:
        return False
    return all(d is None or here <= d for d in (_depth(obj, m) for m in methods))


def declared(quantizer: object, attribute: str) -> bool:
    """True when ``quantizer`` is a module whose ``attribute`` (``"is_sign"`` or ``"sign_levels"``) is
    true and still holds: declared on the class that defines its ``forward`` (and, for
    ``sign_levels``, its ``factor``) or on a subclass of it (or on the instance). A subclass that
    overrides ``forward`` without declaring the attribute again does not inherit it."""
    if not isinstance(quantizer, nn.Module) or not getattr(quantizer, attribute, False):
        return False
    return _holds(quantizer, attribute, _DECLARES_ABOUT[attribute])


def void_declaration(quantizer: object) -> str | None:
    """Why a quantizer that looks binary is not: ``"ShiftedSign overrides forward without declaring
    is_sign again"`` when it inherits ``is_sign`` / ``sign_levels = True`` from a class whose
    ``forward`` (or ``factor``) it overrides, else None."""
    if not isinstance(quantizer, nn.Module):
        return None
    for attribute, holds in (("is_sign", is_sign), ("sign_levels", has_sign_levels)):
        if getattr(quantizer, attribute, False) and not holds(quantizer):
            here = _depth(quantizer, attribute)
            overridden = (m for m in _DECLARES_ABOUT[attribute] if (d := _depth(quantizer, m)) is not None and d < here)
            method = next(overridden, "forward")
            return f"{type(quantizer).__name__} overrides {method} without declaring {attribute} again"
    return None


def current_method(quantizer: object, name: str) -> Callable | None:
    """``quantizer``'s ``factor`` / ``integer_factor`` when it describes the ``forward`` in use (defined
    on the class that defines ``forward`` or on a subclass of it), else None: a subclass that
    overrides ``forward`` alone computes ``q(x)``, no longer its parent's factorization."""
    method = getattr(quantizer, name, None)
    if method is None or not callable(method):
        return None
    return method if _holds(quantizer, name, ("forward",)) else None


def computes_as(quantizer: object, cls: type) -> bool:
    """``quantizer`` is a ``cls`` that overrides none of ``cls``'s methods and properties (its
    ``__init__`` and ``extra_repr`` aside): it computes exactly what ``cls`` computes, so that what
    onebit knows of ``cls`` (the packed engine's ops for it) holds for it."""
    if not isinstance(quantizer, cls):
        return False
    names = _computing_names(cls)
    if any(name in getattr(quantizer, "__dict__", ()) for name in names):
        return False
    return type(quantizer) is cls or _keeps(type(quantizer), cls)


@functools.lru_cache(maxsize=256)
def _computing_names(cls: type) -> tuple[str, ...]:
    return tuple(
        name
        for klass in cls.__mro__
        if klass is not object and klass is not nn.Module
        for name, value in vars(klass).items()
        if not name.startswith("__")
        and name != "extra_repr"
        and (inspect.isfunction(value) or isinstance(value, (property, staticmethod, classmethod)))
    )


@functools.lru_cache(maxsize=1024)
def _keeps(sub: type, cls: type) -> bool:
    return all(inspect.getattr_static(sub, name) is inspect.getattr_static(cls, name) for name in _computing_names(cls))


def is_sign(quantizer: object) -> bool:
    """True when the quantizer's forward is exactly :func:`onebit.math.sign`: a module that declares
    ``is_sign = True`` for its ``forward`` (see :func:`declared`), or ``onebit.math.sign`` itself."""
    return quantizer is sign or declared(quantizer, "is_sign")


def has_sign_levels(quantizer: object) -> bool:
    """True when the quantizer's :meth:`Quantizer.factor` levels are ``sign(w)``: binary weights,
    possibly with a per-output-channel scale (``ste_sign``, ``magnitude_aware_sign``, ...): a
    module that declares ``sign_levels`` (or ``is_sign``) for its ``forward`` and ``factor``."""
    if quantizer is sign:
        return True
    return declared(quantizer, "sign_levels") or (
        declared(quantizer, "is_sign") and _holds(quantizer, "is_sign", ("factor",))
    )


def precision_of(quantizer: nn.Module | Callable | None) -> int:
    """Bits of a quantizer's output: its ``precision`` attribute, 32 for ``None`` or an unknown callable."""
    if quantizer is None:
        return 32
    return int(getattr(quantizer, "precision", 32))


def is_binary(quantizer: object) -> bool:
    """True for a 1-bit quantizer (``precision`` 1: two levels, a sign or a scaled sign). What the
    tools count as binary (summary, doctor, plots, Bop); :func:`is_sign` and :func:`has_sign_levels`
    are what the engine and the canonizers need to know."""
    return quantizer is not None and precision_of(quantizer) == 1


class Quantizer(nn.Module):
    """Base class: ``precision`` bits, no parameters, no state.

    Two class attributes tell the rest of onebit (layers, converter, canonizers, the
    packed engine) what a quantizer computes, so that a user's own quantizer is
    handled like a built-in one by setting them:

    - ``is_sign``: the forward is exactly :func:`onebit.math.sign` (values +-1,
      sign(0) = +1); such an input is packed as bits and folded into thresholds.
    - ``sign_levels``: :meth:`factor` returns ``levels = sign(w)`` (with any scale);
      such weights are stored and computed as bits (with a per-channel float scale).

    A declaration speaks for the ``forward`` of the class that makes it: ``is_sign`` holds
    only when declared on the class that defines ``forward`` (or a subclass of it), and
    ``sign_levels`` only when declared on (or below) the classes defining ``forward`` and
    ``factor``. So a subclass that overrides ``forward`` (e.g. ``Sign`` shifted by 0.5) or
    ``factor`` is no longer binary for onebit until it declares the attribute again itself
    (:func:`declared`, :func:`void_declaration`). Likewise a layer computes with
    :meth:`factor` (or ``integer_factor``) only when it is defined on (or below) the class
    defining ``forward``; a subclass that overrides ``forward`` alone is computed as
    ``q(w)`` (:func:`current_method`). The packed engine runs a built-in quantizer's own
    ops for a subclass only when it overrides none of its methods (:func:`computes_as`).
    """

    precision: int = 32
    alias: str = ""
    is_sign: bool = False
    sign_levels: bool = False

    def factor(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(levels, scale)`` with ``q(w) = levels * scale`` per output channel (dim 0).

        ``scale`` is ``[C_out]`` (a constant: no gradient) or None for 1. Layers compute
        with the levels and apply the scale to their output; the default is
        ``(q(w), None)``.
        """
        return self(w), None


# ---------------------------------------------------------------------------
# autograd functions: forward sign(x) (never 0), backward grad * d(x)


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: float | None) -> torch.Tensor:
        ctx.clip = clip
        if clip is not None:
            ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.clip is None:
            return grad, None
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


class _ApproxSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        # max(0, 2 - 2|x|) * grad, in place on one new buffer
        return x.abs().mul_(-2.0).add_(2.0).clamp_(min=0.0).mul_(grad)


class _SwishSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: float) -> torch.Tensor:
        ctx.beta = beta
        ctx.save_for_backward(x)
        return sign(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        b = ctx.beta
        bx = b * x
        # d/dx [2 sigmoid(bx) (1 + bx (1 - sigmoid(bx))) - 1] = b (2 - bx tanh(bx/2)) / (1 + cosh(bx))
        return grad * (b * (2.0 - bx * torch.tanh(bx / 2.0)) / (1.0 + torch.cosh(bx))), None


class _Round(torch.autograd.Function):
    """round(x), straight-through (identity) gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad


def unsigned_integers(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``round(clamp(x, 0, 1) * n)``: :meth:`DoReFa.integer_factor`'s integers, without gradient."""
    return torch.round(torch.clamp(x, 0.0, 1.0) * levels)


class _UniformIntegers(torch.autograd.Function):
    """``round(clamp(x, 0, 1) * n)``; gradient ``n * 1[0 <= x <= 1]`` (that of ``n * q(x)``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.levels = levels
        return torch.round(torch.clamp(x, 0.0, 1.0) * levels)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * ((x >= 0.0) & (x <= 1.0)).to(grad.dtype) * ctx.levels, None


class _Uniform(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, levels: int) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.round(torch.clamp(x, 0.0, 1.0) * levels) / levels

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad * ((x >= 0.0) & (x <= 1.0)).to(grad.dtype), None


# ---------------------------------------------------------------------------
# quantizers


@register("ste_sign")
class Sign(Quantizer):
    r"""Binarization with the clipped straight-through estimator.

    Forward:  q(x) = +1 if x >= 0 else -1   (sign(0) = +1)

    Backward: dq/dx = 1[|x| <= clip]; with ``clip=None`` the plain identity, dq/dx = 1.

    Courbariaux et al., "Binarized Neural Networks", 2016.
    """

    precision = 1
    is_sign = True
    sign_levels = True

    def __init__(self, clip: float | None = 1.0):
        super().__init__()
        if clip is not None and not clip > 0:
            raise ValueError(f"Sign: clip must be positive or None, got {clip}")
        self.clip = None if clip is None else float(clip)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SignSTE.apply(x, self.clip)

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


@register("approx_sign")
class ApproxSign(Quantizer):
    r"""Binarization with Bi-Real Net's piecewise-polynomial gradient.

    Forward:  q(x) = +1 if x >= 0 else -1

    Backward: dq/dx = max(0, 2 - 2|x|)   (the derivative of the polynomial
    approximation 2x + x|x| ... clipped to [-1, 1]).

    Liu et al., "Bi-Real Net", ECCV 2018.
    """

    precision = 1
    is_sign = True
    sign_levels = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ApproxSign.apply(x)


@register("swish_sign")
class SwishSign(Quantizer):
    r"""Binarization with BNN+'s swish-sign gradient.

    Forward:  q(x) = +1 if x >= 0 else -1

    Backward: dq/dx = beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)),
    the derivative of SS_beta(x) = 2 sigmoid(beta x) (1 + beta x (1 - sigmoid(beta x))) - 1.

    Darabi et al., "BNN+: Improved Binary Network Training", 2018.
    """

    precision = 1
    is_sign = True
    sign_levels = True

    def __init__(self, beta: float = 5.0):
        super().__init__()
        if not beta > 0:
            raise ValueError(f"SwishSign: beta must be positive, got {beta}")
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwishSign.apply(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"


@register("magnitude_aware_sign")
class MagnitudeAwareSign(Quantizer):
    r"""Bi-Real Net's weight binarization: signs scaled by the mean magnitude per output channel.

    Forward:  q(w)[o] = alpha_o * sign(w[o]),  alpha_o = mean(|w[o]|) over all dims but the
    first (the output channel); a 1-D tensor gets a single alpha.

    Backward: dq/dw = alpha_o * 1[|w| <= clip] (alpha is treated as a constant).

    Bitwise idempotent: where all magnitudes of a row are equal (as in ``q(w)``), alpha is
    that magnitude exactly rather than a rounded sum divided by the count.
    Liu et al., "Bi-Real Net", ECCV 2018.
    """

    precision = 1
    sign_levels = True

    def __init__(self, clip: float | None = 1.0):
        super().__init__()
        if clip is not None and not clip > 0:
            raise ValueError(f"MagnitudeAwareSign: clip must be positive or None, got {clip}")
        self.clip = None if clip is None else float(clip)

    @staticmethod
    def scale(w: torch.Tensor) -> torch.Tensor:
        """alpha, shaped to broadcast against ``w``."""
        a = w.detach().abs()
        if w.dim() <= 1:
            top = a.amax()
            return torch.where(top == a.amin(), top, a.mean())
        dims = tuple(range(1, w.dim()))
        top = a.amax(dim=dims, keepdim=True)
        return torch.where(top == a.amin(dim=dims, keepdim=True), top, a.mean(dim=dims, keepdim=True))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale(w) * _SignSTE.apply(w, self.clip)

    def factor(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sign(w), alpha)`` with ``alpha`` of shape ``[C_out]`` (``[1]`` for a 1-D ``w``)."""
        return _SignSTE.apply(w, self.clip), self.scale(w).reshape(-1)

    def extra_repr(self) -> str:
        return f"clip={self.clip}"


@register("dorefa")
class DoReFa(Quantizer):
    r"""k-bit uniform quantization on [0, 1] (DoReFa-Net activations).

    Forward:  q(x) = round(clamp(x, 0, 1) * (2^k - 1)) / (2^k - 1), exactly 2^k levels.

    Backward: dq/dx = 1[0 <= x <= 1].

    An activation quantizer: used for weights it maps every negative weight to 0 (warned
    about once per instance); for k-bit weights use :class:`DoReFaWeight` (``"dorefa_weight"``).

    Zhou et al., "DoReFa-Net", 2016.
    """

    output_range = (0.0, 1.0)

    def __init__(self, bits: int = 2):
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"DoReFa: bits must be an integer in [1, 16], got {bits!r}")
        self.precision = bits

    @property
    def levels(self) -> int:
        return 2**self.precision - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Uniform.apply(x, self.levels)

    def integer_factor(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(x_int, n)``: ``x_int = round(clamp(x, 0, 1) * n)`` in {0, ..., n} (``x``'s dtype) and
        ``n = 2^k - 1``, so ``q(x) = x_int / n``. Layers compute ``conv(x_int, levels) / n``."""
        return _UniformIntegers.apply(x, self.levels), float(self.levels)

    def factor(self, w: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Used as a weight quantizer (layers factor their weights): warns once that the
        levels are in [0, 1], then ``(q(w), None)``."""
        if not getattr(self, "_warned_weights", False):
            self._warned_weights = True
            warnings.warn(
                f"{type(self).__name__} quantizes into [0, 1] (an activation quantizer): used for weights it maps "
                "every negative weight to 0. For symmetric k-bit weights use DoReFaWeight ('dorefa_weight').",
                UserWarning,
                stacklevel=3,
            )
        return self(w), None

    def extra_repr(self) -> str:
        return f"bits={self.precision}"


@register("dorefa_weight")
class DoReFaWeight(Quantizer):
    r"""DoReFa-Net's k-bit weights: symmetric levels in [-1, 1].

    Forward:  q(w) = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1,
    quantize_k(r) = round((2^k - 1) r) / (2^k - 1): the 2^k levels 2 i / (2^k - 1) - 1,
    symmetric around 0 ({-1, -1/3, +1/3, +1} at 2 bits, as BMXNet's 2-bit weights); the max
    is over the whole tensor.

    Backward: straight through the rounding, through tanh and the normalization:
    dq/dw = d/dw [tanh(w) / max|tanh(w)|].

    ``factor(w)`` is ``(2 i - n, 1 / n)``: odd integer levels and their scale, so a layer's sum is an
    exact integer (``conv(x, levels) * (1 / n)``).
    Bitwise idempotent up to 3 bits; from 4 bits on, tanh compresses the levels of ``q(w)``
    by more than half a step (|tanh(l) / tanh(1) - l| reaches 0.107 > 1 / (2^k - 1)), so
    ``q(q(w))`` moves inner levels one step towards 0.

    Zhou et al., "DoReFa-Net", 2016.
    """

    output_range = (-1.0, 1.0)

    def __init__(self, bits: int = 2):
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"DoReFaWeight: bits must be an integer in [1, 16], got {bits!r}")
        self.precision = bits

    @property
    def levels(self) -> int:
        return 2**self.precision - 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        # 2 round(n r) / n - 1, as (2 i - n) / n: levels exactly symmetric around 0 (-l == l')
        return self.integer_levels(w) / self.levels

    def integer_levels(self, w: torch.Tensor) -> torch.Tensor:
        """``2 round(n r) - n``: the odd integers in [-n, n] whose ``1 / n`` multiples are ``q(w)``."""
        t = torch.tanh(w)
        r = t / (2.0 * t.abs().max().clamp_min(torch.finfo(t.dtype).tiny)) + 0.5
        n = self.levels
        return 2.0 * _Round.apply(r * n) - n

    def factor(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(2 i - n, 1 / n)``: odd integer levels and a per-output-channel scale ``1 / n`` (float32),
        so a layer sums integers exactly and then scales (``q(w)`` equals ``levels / n``)."""
        channels = w.shape[0] if w.dim() >= 2 else 1
        return self.integer_levels(w), torch.full((channels,), 1.0 / self.levels, dtype=w.dtype, device=w.device)

    def extra_repr(self) -> str:
        return f"bits={self.precision}"
