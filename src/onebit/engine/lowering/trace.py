"""The model as a torch.fx graph: onebit's layers and quantizers as leaves, eval-mode identities
removed, every node's shape on the example input recorded (the tracer, its leaf rule and the
identities are :mod:`onebit.tracing`'s)."""

from __future__ import annotations

import torch
from torch import fx, nn

from onebit.engine.lowering.state import UnsupportedModelError
from onebit.tracing import Tracer, drop_identities

__all__ = ["trace"]


def trace(model: nn.Module, example: torch.Tensor) -> fx.GraphModule:
    """``model`` traced (a single layer as a one-layer ``Sequential``), identities dropped, shapes
    propagated from ``example`` (``node.meta["tensor_meta"]``)."""
    tracer = Tracer()
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
