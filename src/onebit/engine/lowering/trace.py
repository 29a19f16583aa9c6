"""The model as a torch.fx graph: onebit's layers and quantizers as leaves, eval-mode identities
removed, every node's shape on the example input recorded."""

from __future__ import annotations

import torch
from torch import fx, nn

from onebit import quant
from onebit.engine.lowering.state import UnsupportedModelError
from onebit.nn.layers import QActivation, QuantizedLayer

#: modules that are the identity in eval mode: dropped before lowering, so that patterns see through them
IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def is_sign_threshold(m: nn.Module) -> bool:
    """A :class:`onebit.canonize.SignThreshold` (imported lazily: canonization is optional here)."""
    if type(m).__name__ != "SignThreshold":
        return False
    try:
        from onebit.canonize import SignThreshold
    except ImportError:
        return False
    return isinstance(m, SignThreshold)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantizedLayer, QActivation, quant.Quantizer)) or is_sign_threshold(m):
            return True
        return super().is_leaf_module(m, qualname)


def drop_identities(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Remove eval-mode identities (Identity, Dropout, ``.contiguous()``) so that patterns see through them."""
    for node in list(gm.graph.nodes):
        identity = (
            node.op == "call_module" and type(modules.get(node.target)) in IDENTITIES and len(node.args) == 1
        ) or (node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1 and not node.kwargs)
        if identity and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``model`` traced (a single layer as a one-layer ``Sequential``), identities dropped, shapes
    propagated from ``example`` (``node.meta["tensor_meta"]``)."""
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):
        model = nn.Sequential(model)  # a single layer: trace it as a call, not through its forward
    try:
        fx_graph = tracer.trace(model)
    except Exception as error:
        raise UnsupportedModelError(
            f"the model cannot be traced with torch.fx ({type(error).__name__}: {error}); the packed engine "
            "needs a traceable forward (no data-dependent Python control flow)"
        ) from error
    gm = fx.GraphModule(tracer.root, fx_graph)
    drop_identities(gm, dict(gm.named_modules()))
    try:
        with torch.no_grad():
            _ShapeRecorder(gm).run(example)
    except Exception as error:
        raise ValueError(
            f"the model fails on example_input of shape {list(example.shape)}: {type(error).__name__}: {error}"
        ) from error
    return gm


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and records each node's output shape (``node.meta["tensor_meta"]``), as
    torch's ``ShapeProp`` does, but lets a failing node's error through as it is (``ShapeProp`` prints
    its traceback to stderr and wraps it; the interpreter adds the node and its stack to the message)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False

    def run_node(self, n: fx.Node):
        from torch.fx.node import map_aggregate
        from torch.fx.passes.shape_prop import _extract_tensor_metadata

        result = super().run_node(n)
        found = False

        def extract(obj):
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        meta = map_aggregate(result, extract)
        if found:
            n.meta["tensor_meta"] = meta
        return result
