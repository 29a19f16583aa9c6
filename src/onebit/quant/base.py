"""The quantizer contract: the :class:`Quantizer` base, the registry by alias, and the rules that
say which of a quantizer's declarations hold for the forward it computes.

What a quantizer tells the rest of onebit (layers, converter, canonizers, the packed engine) is
declared on :class:`Quantizer`; :func:`is_sign`, :func:`has_sign_levels`, :func:`integer_code_of`,
:func:`factor_code_of` and :func:`current_method` are how they ask.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch
from torch import nn

from onebit.math import sign
from onebit.quant.codes import IntegerCode

__all__ = [
    "Quantizer",
    "QuantizerLike",
    "EPS",
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

#: the smallest scale divisor or clip, as BitNet b1.58 clamps its mean and maximum magnitudes
EPS = 1e-5

QuantizerLike = str | dict | nn.Module | Callable[[torch.Tensor], torch.Tensor] | None

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
# ``integer_factor`` / ``integer_code`` / ``factor_code``) describes the ``forward`` of the class
# that makes it. A subclass that overrides ``forward`` (or the factorization a declaration speaks
# of) below it has not declared anything about its own computation: the declaration is void for
# it until the subclass makes it again.

#: the methods a declaration speaks about
_DECLARES_ABOUT = {
    "is_sign": ("forward",),
    "sign_levels": ("forward", "factor"),
    "integer_code": ("forward", "integer_factor"),
    "factor_code": ("forward", "factor"),
}

#: the declarations that are methods returning an :class:`IntegerCode` (None on the base)
_CODES = ("integer_code", "factor_code")


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
    """Why a quantizer that looks binary or k-bit is not: ``"ShiftedSign overrides forward without
    declaring is_sign again"`` when it inherits ``is_sign`` / ``sign_levels = True`` or an
    ``integer_code`` / ``factor_code`` from a class whose ``forward`` (or ``factor`` /
    ``integer_factor``) it overrides, else None."""
    if not isinstance(quantizer, nn.Module):
        return None
    for attribute, methods in _DECLARES_ABOUT.items():
        if not _declares(quantizer, attribute) or _still_holds(quantizer, attribute):
            continue
        here = _depth(quantizer, attribute)
        overridden = (m for m in methods if (d := _depth(quantizer, m)) is not None and d < here)
        method = next(overridden, "forward")
        return f"{type(quantizer).__name__} overrides {method} without declaring {attribute} again"
    return None


def _declares(quantizer: nn.Module, attribute: str) -> bool:
    """``quantizer`` carries ``attribute``'s declaration, held or not: a true ``is_sign`` /
    ``sign_levels``, or an ``integer_code`` / ``factor_code`` other than the base's."""
    if attribute in _CODES:
        method = inspect.getattr_static(quantizer, attribute, None)
        return callable(method) and method is not Quantizer.__dict__[attribute]
    return bool(getattr(quantizer, attribute, False))


def _still_holds(quantizer: nn.Module, attribute: str) -> bool:
    if attribute == "is_sign":
        return is_sign(quantizer)
    if attribute == "sign_levels":
        return has_sign_levels(quantizer)
    return _holds(quantizer, attribute, _DECLARES_ABOUT[attribute])


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


def integer_code_of(quantizer: object) -> IntegerCode | None:
    """The integers of an input quantizer's ``integer_factor(x) = (x_int, s)``, and so of its
    forward (:class:`IntegerCode`): its :meth:`Quantizer.integer_code` while declared on (or below)
    the classes that define ``forward`` and ``integer_factor``, else None."""
    return _declared_code(quantizer, "integer_code")


def factor_code_of(quantizer: object) -> IntegerCode | None:
    """The integer levels of a weight quantizer's ``factor(w) = (levels, scale)``
    (:class:`IntegerCode`): ``binary`` for sign levels (:func:`has_sign_levels`), else its
    :meth:`Quantizer.factor_code` while declared on (or below) the classes that define ``forward``
    and ``factor``, else None."""
    if has_sign_levels(quantizer):
        return IntegerCode.binary()
    return _declared_code(quantizer, "factor_code")


def _declared_code(quantizer: object, name: str) -> IntegerCode | None:
    if not isinstance(quantizer, nn.Module) or not callable(getattr(quantizer, name, None)):
        return None
    if not _holds(quantizer, name, _DECLARES_ABOUT[name]):
        return None
    code = getattr(quantizer, name)()
    if code is not None and not isinstance(code, IntegerCode):
        raise TypeError(f"{type(quantizer).__name__}.{name}() must return an IntegerCode or None, got {code!r}")
    return code


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
    """Base class: the contract every quantizer keeps and declares.

    ``q(x)`` keeps shape and dtype, never modifies ``x``, and has ``precision`` bits. What the rest
    of onebit (layers, converter, canonizers, the packed engine) knows of a quantizer is what it
    declares here, so a user's own quantizer is handled like a built-in one by declaring the same:

    - ``is_sign``: the forward is exactly :func:`onebit.math.sign` (+-1, sign(0) = +1); such an
      input is packed as bits and a BatchNorm before it folds into integer thresholds;
    - ``sign_levels``: :meth:`factor` gives ``levels = sign(w)`` (any scale): the weights are bits;
    - :meth:`factor`: ``q(w) = levels * scale``; layers compute with the levels, then scale;
    - :meth:`integer_factor`: ``q(x) = x_int / s``; layers compute with the integers, then divide;
    - :meth:`integer_code` / :meth:`factor_code`: which integers those are
      (:class:`~onebit.quant.IntegerCode`), so that the packed engine computes them itself.

    A declaration speaks for the ``forward`` of the class that makes it: it holds only when made on
    (or below) the classes that define ``forward`` and the factorization it describes. A subclass
    that overrides ``forward`` (e.g. ``Sign`` shifted by 0.5) inherits none of them until it
    declares them again (:func:`declared`, :func:`current_method`, :func:`integer_code_of`,
    :func:`factor_code_of`, :func:`void_declaration`).
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

    def integer_factor(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(x_int, s)`` with ``q(x) = x_int / s``: integers in ``x``'s dtype (with the gradient of
        ``s * q(x)``) and their divisor. Layers compute ``conv(x_int, levels) / s``.

        The base has none (it raises); a layer calls it only when defined on (or below) the class
        that defines ``forward`` (:func:`current_method`)."""
        raise NotImplementedError(f"{type(self).__name__} does not factor its output into integers")

    def integer_code(self) -> IntegerCode | None:
        """The integers :meth:`integer_factor` gives, as an :class:`~onebit.quant.IntegerCode`; None
        (the base): none the packed engine can compute."""
        return None

    def factor_code(self) -> IntegerCode | None:
        """The integer levels :meth:`factor` gives, as an :class:`~onebit.quant.IntegerCode`; None (the
        base): none beyond the +-1 levels ``sign_levels`` declares."""
        return None
