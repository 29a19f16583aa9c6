"""A model as a ``torch.fx`` graph, with onebit's layers kept whole.

The leaf rule: onebit's quantized layers (:class:`~onebit.nn.layers.QuantizedLayer`),
:class:`~onebit.nn.layers.QActivation`, quantizers (:class:`onebit.quant.Quantizer`) and
:class:`~onebit.nn.thresholded.SignThreshold` are called as one node each, never traced into;
every other module follows ``torch.fx``'s own rule (``torch.nn``'s modules but ``Sequential`` are
leaves). :func:`drop_identities` removes what is the identity in eval mode (the modules of
:data:`onebit.layerkinds.IDENTITIES`, ``.contiguous()``), so that patterns see through them.

The canonizers (:mod:`onebit.canonize.adjacency`, which adds leaves of its own) and the packed
engine's lowering (:mod:`onebit.engine.lowering.trace`) both trace with :class:`Tracer`.
"""

from __future__ import annotations

from torch import fx, nn

from onebit import quant
from onebit.layerkinds import IDENTITIES
from onebit.nn.layers import QActivation, QuantizedLayer
from onebit.nn.thresholded import SignThreshold

__all__ = ["ONEBIT_LEAVES", "Tracer", "is_onebit_leaf", "is_sign_threshold", "drop_identities"]

#: the module classes a trace keeps whole: quantized layers, activations, quantizers, thresholds
ONEBIT_LEAVES = (QuantizedLayer, QActivation, quant.Quantizer, SignThreshold)


def is_onebit_leaf(m: nn.Module) -> bool:
    """``m`` is one of onebit's leaves (:data:`ONEBIT_LEAVES`, subclasses included)."""
    return isinstance(m, ONEBIT_LEAVES)


def is_sign_threshold(m: nn.Module) -> bool:
    """``m`` is a :class:`~onebit.nn.thresholded.SignThreshold`: ``sign(bn(acc))`` as integer comparisons."""
    return isinstance(m, SignThreshold)


class Tracer(fx.Tracer):
    """``torch.fx`` tracer that keeps onebit's leaves whole (:func:`is_onebit_leaf`)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_onebit_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def drop_identities(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Remove eval-mode identities from ``gm``: a call of a module whose class is exactly one of
    :data:`~onebit.layerkinds.IDENTITIES`, or ``x.contiguous()``, on one argument; its readers read
    the argument instead."""
    for node in list(gm.graph.nodes):
        identity = (
            node.op == "call_module" and type(modules.get(node.target)) in IDENTITIES and len(node.args) == 1
        ) or (node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1 and not node.kwargs)
        if identity and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
