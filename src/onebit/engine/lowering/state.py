"""The lowering state: the traced model, the graph's nodes and tensors emitted so far, and the
value name of every fx node lowered."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from onebit.engine.graph.schema import fresh_name


class UnsupportedModelError(ValueError):
    """The model contains a module, function or configuration the packed engine cannot run."""


class Lowering:
    """What lowering a traced model has built so far.

    ``value`` maps an fx node to the name of the graph value holding its float result; ``packed``
    maps ``(float value name, layout)`` to the packed copy of that value, so that every value is
    packed once per layout.
    """

    def __init__(self, gm: fx.GraphModule, example: torch.Tensor):
        self.gm = gm
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.example = example
        self.fallbacks: list[dict[str, str]] = []  # binary layers that run in float, with the reason
        self.sign_source: dict[str, str] = {}  # a sign op's output value -> the float value it signs
        self.nodes: list[dict] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.value: dict[fx.Node, str] = {}
        self.packed: dict[tuple, str] = {}  # (float value name, layout) -> packed value name
        self.names: set[str] = {"input"}

    def name(self, base: str) -> str:
        """A new value name from ``base`` (:func:`~onebit.engine.graph.schema.fresh_name`)."""
        return fresh_name(self.names, base)

    def emit(
        self,
        base: str,
        op: str,
        inputs: list[str],
        attrs: dict | None = None,
        tensors: dict | None = None,
        module: str | None = None,
    ) -> str:
        """Append a graph node; its tensors (None ones left out) are stored as ``<name>__<role>``.
        Returns the node's (output value's) name."""
        name = self.name(base)
        refs = {}
        for role, t in (tensors or {}).items():
            if t is None:
                continue
            key = f"{name}__{role}"
            self.tensors[key] = t
            refs[role] = key
        node = {"name": name, "op": op, "inputs": inputs, "attrs": attrs or {}, "tensors": refs}
        if module:
            node["module"] = module
        self.nodes.append(node)
        return name

    def _where(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module '{node.target}' ({type(self.modules[node.target]).__name__})"
        target = getattr(node.target, "__name__", str(node.target))
        return f"node '{node.name}' ({node.op} {target})"

    def unsupported(self, node: fx.Node, why: str = "") -> UnsupportedModelError:
        """The error naming ``node`` (its module and type, or its function) and why."""
        return UnsupportedModelError(
            f"the packed engine does not support {self._where(node)}{': ' + why if why else ''}"
        )

    def arg(self, node: fx.Node, a: Any) -> str:
        """The value name of ``node``'s tensor argument ``a``."""
        if not isinstance(a, fx.Node):
            raise self.unsupported(node, f"expected a tensor argument, got {a!r}")
        if a not in self.value:
            raise self.unsupported(node, f"its input '{a.name}' is not a float tensor the engine computes")
        return self.value[a]

    def shape(self, node: fx.Node) -> tuple | None:
        """The shape of ``node``'s output on the example input, None when it is not one tensor."""
        meta = node.meta.get("tensor_meta")
        return None if meta is None or not hasattr(meta, "shape") else tuple(meta.shape)
