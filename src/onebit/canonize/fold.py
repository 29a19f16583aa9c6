r"""BatchNorm + sign folded into per-channel integer thresholds, exactly and reversibly.

A BatchNorm that feeds a sign cannot be merged into weights: ``sign(s x + t)`` is a
per-channel *threshold*, not a scale. When its input is the exact integer accumulator
``acc`` of a binary layer (input and weights plain signs, no bias; a max pooling between
keeps it integer), ``sign(bn(acc))`` equals one integer comparison per channel:

    sign(bn(acc)) = -1  where  acc < threshold   (direction +1, s > 0)
                           or  acc > threshold   (direction -1, s < 0),    else +1

with the thresholds of :func:`onebit.thresholds.batchnorm_sign_thresholds`, the packed
engine's own derivation (every ``acc`` in ``[-K, K]`` is evaluated, so the result is the
float model's bit for bit). :func:`fold_thresholds` replaces each such BatchNorm by a
:class:`SignThreshold`; every path from it must reach a sign through identities and
flattens only. The chain is found by :func:`onebit.sign_chain.find_sign_chain`, as the packed
engine finds it.
"""

from __future__ import annotations

from torch import nn

from onebit import quant
from onebit.canonize.adjacency import _bn_problem, _classify, _Node, _Plan
from onebit.canonize.handles import Canonizer, CompositeHandle, Handle, Patch, register_all
from onebit.layerkinds import WEIGHT_LAYERS
from onebit.nn.layers import QuantizedLayer
from onebit.nn.thresholded import SignThreshold
from onebit.sign_chain import find_sign_chain, takes_sign

__all__ = ["FoldThresholds", "fold_thresholds"]


class _ChainView:
    """The graphs of :mod:`~onebit.canonize.adjacency` as a :class:`~onebit.sign_chain.ChainView`:
    identities and max pooling before the BatchNorm, identities and flattens after it."""

    def inputs(self, node: _Node) -> list[_Node]:
        return node.inputs

    def users(self, node: _Node) -> list[_Node]:
        return node.users

    def module(self, node: _Node) -> nn.Module | None:
        return node.module if node.op == "module" else None

    def reads_alone(self, node: _Node, value: _Node) -> bool:
        return len(node.inputs) == 1

    def crosses_before(self, node: _Node) -> bool:
        return _classify(node)[0] in ("identity", "maxpool")

    def crosses_after(self, node: _Node) -> bool:
        return _classify(node)[0] in ("identity", "flatten")

    def describe(self, node: _Node) -> str:
        return node.describe()


class _FoldThreshold(Handle):
    """``binary layer -> [max pool] -> bn -> sign`` becomes ``... -> SignThreshold -> sign``."""

    def __init__(self, root: nn.Module, name: str, bn: nn.Module, producer: nn.Module, producer_name: str) -> None:
        super().__init__()
        self.root, self.name, self.bn, self.producer, self.producer_name = root, name, bn, producer, producer_name
        self._patch = Patch()
        self.thresholds = None

    def _compute(self):
        from onebit.thresholds import accumulator_bound, batchnorm_sign_thresholds

        p = self.producer
        if isinstance(p, nn.Linear):
            bound = p.in_features
        else:
            bound = accumulator_bound(p.in_channels, p.groups, p.kernel_size)
        return batchnorm_sign_thresholds(self.bn, bound)

    def _apply(self) -> None:
        self.thresholds = self._compute()
        module = SignThreshold(self.thresholds).to(self.bn.running_mean.device).train(self.bn.training)
        self._patch.replace_module(self.root, self.name, module)

    def _undo(self) -> None:
        self._patch.undo()

    def __repr__(self) -> str:
        return f"<thresholds {self.producer_name} -> {self.name} -> sign>"


def _accumulator_problem(plan: _Plan, source: _Node | None) -> str | None:
    """None when ``source`` is a binary layer whose output is an exact integer accumulator, else why not."""
    layer = source.module if source is not None and source.op == "module" else None
    if not isinstance(layer, QuantizedLayer) or not isinstance(layer, WEIGHT_LAYERS):
        return (
            f"its input comes from {source.describe() if source is not None else 'nothing'}, "
            "not from a binary layer's accumulator"
        )
    if not quant.is_sign(layer.input_quantizer) or not quant.is_sign(layer.weight_quantizer):
        return (
            f"{source.describe()} does not binarize both its input and its weights with a plain sign, "
            "so its output is not an integer accumulator"
        )
    if layer.bias is not None:
        return f"{source.describe()} has a bias, so its output is not an integer accumulator"
    if plan.calls(layer) != 1:
        return f"{source.describe()} is called more than once"
    return None


def _fold_plan(model: nn.Module, skip_unmergeable: bool) -> list[_FoldThreshold]:
    """One unregistered fold per BatchNorm that feeds signs from a binary layer's accumulator;
    the others fail or warn."""
    plan = _Plan(model, skip_unmergeable)
    view = _ChainView()
    folds: list[_FoldThreshold] = []
    for node in plan.bn_nodes():
        bn, name = node.module, node.target
        if getattr(bn, "_onebit_merged", False):
            continue
        chain = find_sign_chain(view, node)
        if chain.problem is not None:
            # a BatchNorm that feeds no sign is merge_batchnorm's business, not an error here
            if any(takes_sign(view.module(u)) for u in node.users):
                plan.fail(f"BatchNorm '{name}' cannot be folded into thresholds: {chain.problem}.")
            continue
        problem = _bn_problem(bn, name, plan.calls(bn))
        if problem:
            plan.fail(f"BatchNorm '{name}' cannot be folded into thresholds: it {problem}.")
            continue
        source = chain.source
        problem = _accumulator_problem(plan, source)
        if problem:
            plan.fail(f"BatchNorm '{name}' cannot be folded into thresholds: {problem}.")
            continue
        folds.append(_FoldThreshold(model, name, bn, source.module, source.target))
    return folds


class FoldThresholds(Canonizer):
    """Replace ``binary layer -> [max pool] -> BatchNorm -> sign`` by integer thresholds
    (see :func:`fold_thresholds`)."""

    def __init__(self, skip_unmergeable: bool = False) -> None:
        self.skip_unmergeable = skip_unmergeable

    def apply(self, model: nn.Module) -> CompositeHandle:
        folds = _fold_plan(model, self.skip_unmergeable)
        composite = register_all(folds)
        composite.thresholds = {f.name: f.thresholds for f in folds}
        return composite


def fold_thresholds(model: nn.Module, *, skip_unmergeable: bool = False) -> CompositeHandle:
    r"""Fold every ``binary layer -> [max pooling] -> BatchNorm -> sign`` into per-channel integer thresholds.

    The BatchNorm's input is the exact integer accumulator ``acc`` of a layer whose
    input and weights are plain signs (no bias); the layer that follows only looks at
    ``sign(bn(acc))``. Each such BatchNorm is replaced by a :class:`SignThreshold` that
    outputs ``sign(bn(acc))`` as +-1 from one integer comparison per channel,
    bit for bit the same as the float model (the thresholds come from
    :func:`onebit.thresholds.batchnorm_sign_thresholds`, the packed engine's own
    derivation, evaluated on every ``acc`` in ``[-K, K]``).

    Returns a :class:`CompositeHandle` with ``thresholds``: ``{BatchNorm name: Thresholds}``;
    ``remove()`` puts the BatchNorms back. BatchNorms that feed no sign are left alone
    (they are :func:`merge_batchnorm`'s business); one that feeds a sign but does not sit on
    an integer accumulator raises :class:`UnmergeableError`, or warns with
    ``skip_unmergeable=True``.
    """
    return FoldThresholds(skip_unmergeable).apply(model)
