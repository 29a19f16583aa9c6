r"""The BatchNorm -> sign chain: a per-channel map whose every reader takes its sign first.

    source -> [before ...] -> batchnorm -> [after ...] -> readers (each applies a sign first)

``sign(bn(y))`` is a per-channel threshold on ``y``, not a scale (:mod:`onebit.thresholds`). When
``source`` is a binary layer's integer accumulator and the steps before the BatchNorm keep it
an integer (identities, max pooling), the whole chain is one integer comparison per channel.

The canonizer (:func:`onebit.canonize.fold_thresholds`, on its graphs of
:class:`~onebit.canonize.adjacency._Node`) and the packed engine's threshold pass
(:mod:`onebit.engine.fuse.thresholds`, on the engine graph, where a ``pack`` takes the sign) both
find chains with :func:`find_sign_chain`. Each sees its graph through a :class:`ChainView`, which also says which
steps it crosses; what each then asks of the source and of the readers is its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from torch import nn

from onebit import quant
from onebit.nn.layers import QActivation, QuantizedLayer

__all__ = ["ChainView", "SignChain", "find_sign_chain", "takes_sign"]

N = TypeVar("N")


class ChainView(Protocol[N]):
    """A graph of nodes ``N`` as :func:`find_sign_chain` reads it."""

    def inputs(self, node: N) -> Sequence[N]:
        """The nodes ``node`` reads, its first argument first."""

    def users(self, node: N) -> Sequence[N]:
        """The nodes that read ``node``'s output."""

    def module(self, node: N) -> nn.Module | None:
        """The module ``node`` calls; None for any other operation."""

    def reads_alone(self, node: N, value: N) -> bool:
        """``node`` (a reader of ``value``) takes ``value`` as its one tensor argument."""

    def crosses_before(self, node: N) -> bool:
        """``node`` is a step between the source and the BatchNorm that keeps the source's integers."""

    def crosses_after(self, node: N) -> bool:
        """``node`` is a step between the BatchNorm and the signs that commutes with the sign."""

    def describe(self, node: N) -> str:
        """``node`` in words, for a problem's message."""


def takes_sign(m: nn.Module | None) -> bool:
    """``m`` applies a plain sign to its input first (:func:`onebit.quant.is_sign`): a quantized
    layer whose input quantizer is a sign, a ``QActivation`` of a sign, or a sign quantizer."""
    if m is None:
        return False
    if isinstance(m, QuantizedLayer):
        return quant.is_sign(m.input_quantizer)
    if isinstance(m, QActivation):
        return quant.is_sign(m.quantizer)
    return quant.is_sign(m)


@dataclass
class SignChain(Generic[N]):
    """A BatchNorm, where its input comes from and where its output goes.

    ``source`` is the node before the ``before`` steps (None when the BatchNorm reads no node);
    ``readers`` take the sign of the BatchNorm's output through the ``after`` steps. ``problem``
    says why not every path from the BatchNorm reaches a reader (``readers`` and ``after`` are then
    empty); None when all do.
    """

    batchnorm: N
    source: N | None
    before: list[N] = field(default_factory=list)  # source side first
    readers: list[N] = field(default_factory=list)
    after: list[N] = field(default_factory=list)
    problem: str | None = None


def find_sign_chain(view: ChainView[N], batchnorm: N) -> SignChain[N]:
    """The chain around ``batchnorm``: back from its first input through the steps
    ``view.crosses_before`` (each reading one node) to the source; forward along every path from its
    output, through the steps ``view.crosses_after``, to readers that take the sign (:func:`takes_sign`),
    each step and reader reading one value alone."""
    source, before = _source(view, batchnorm)
    readers, after, problem = _readers(view, batchnorm)
    return SignChain(batchnorm, source, before, readers, after, problem)


def _source(view: ChainView[N], batchnorm: N) -> tuple[N | None, list[N]]:
    inputs = view.inputs(batchnorm)
    node = inputs[0] if inputs else None
    before: list[N] = []
    while node is not None and view.crosses_before(node) and len(view.inputs(node)) == 1:
        before.append(node)
        node = view.inputs(node)[0]
    return node, before[::-1]


def _readers(view: ChainView[N], batchnorm: N) -> tuple[list[N], list[N], str | None]:
    readers: list[N] = []
    after: list[N] = []
    stack = [batchnorm]
    while stack:
        node = stack.pop()
        if not view.users(node):
            return [], [], "its output is not used"
        for user in view.users(node):
            if takes_sign(view.module(user)) and view.reads_alone(user, node):
                readers.append(user)
            elif view.crosses_after(user) and view.reads_alone(user, node):
                after.append(user)
                stack.append(user)
            else:
                return [], [], f"its output goes to {view.describe(user)}, which does not take its sign first"
    return (readers, after, None) if readers else ([], [], "it feeds no sign")
