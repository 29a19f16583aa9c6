r"""Adjacency: which module feeds which, and what each step between a BatchNorm and a layer does.

A model becomes a list of small graphs of :class:`_Node` (inputs, module calls, function and
method calls, outputs). An ``nn.Sequential`` whose children are leaves (nested Sequentials
flattened) is a chain read from the module structure; any other module is traced with
``torch.fx`` (:class:`onebit.tracing.Tracer`), where onebit's leaves, BatchNorms, the
canonized modules and every module without children are leaves. A module that fx cannot trace is split into its
children (the reason is kept in :attr:`_Graphs.notes`), and a BatchNorm that no graph reaches
is reported as one whose neighbours are unknown.

:func:`_classify` names what a node does to a per-channel affine map ``x -> s x + t`` passing
through it: ``identity`` (identities, dropout in eval), ``relu``, ``avgpool`` (commutes with the
map when every window averages real values only), ``maxpool`` (commutes when the map is
non-decreasing), ``flatten`` (dimensions 1..-1), ``layer`` (a convolution or linear layer) or
``other``, with the reason when it is close to one of these but not exact.

:class:`_Plan` is the planning state the merge and the fold share: the graphs, the number of
call sites per module, and ``fail()``, which raises :class:`UnmergeableError` or warns with a
:class:`CanonizationWarning` when ``skip_unmergeable`` is set.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from onebit.layerkinds import (
    ADAPTIVE_AVG_POOL_FUNCTIONS,
    ADAPTIVE_AVG_POOLS,
    AVG_POOL_FUNCTIONS,
    AVG_POOLS,
    BATCHNORMS,
    DROPOUT_FUNCTIONS,
    IDENTITIES,
    MAX_POOL_FUNCTIONS,
    MAX_POOLS,
    RELU_FUNCTIONS,
    WEIGHT_LAYERS,
)
from onebit.nn.layers import QuantizedLayer
from onebit.nn.thresholded import ThresholdedReLU
from onebit.tracing import Tracer, is_onebit_leaf


class UnmergeableError(ValueError):
    """A BatchNorm (or BatchNorm + sign) that cannot be canonized exactly."""


class CanonizationWarning(UserWarning):
    """A structure left alone because ``skip_unmergeable=True``."""


# ---------------------------------------------------------------------------
# the graphs


@dataclass(eq=False)
class _Node:
    """One operation of a traced forward: what it is, what feeds it (``inputs``) and what it feeds (``users``)."""

    op: str  # input | module | function | method | output | other
    target: Any  # qualified module name, function, method name
    module: nn.Module | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    inputs: list[_Node] = field(default_factory=list)
    users: list[_Node] = field(default_factory=list)

    def describe(self) -> str:
        if self.op == "module":
            return f"{type(self.module).__name__} '{self.target}'"
        if self.op == "output":
            return f"the output of module '{self.target}'" if self.target else "the model's output"
        if self.op == "input":
            return f"the input of module '{self.target}'" if self.target else "the model's input"
        if self.op == "function":
            return (
                f"{getattr(self.target, '__module__', '') or ''}.{getattr(self.target, '__name__', self.target)}()"
            ).lstrip(".")
        if self.op == "method":
            return f"Tensor.{self.target}()"
        return f"module '{self.target}' (not traced into)" if self.target else "an untraced operation"


def _is_leaf(module: nn.Module) -> bool:
    """A module the graphs call as one step (never traced into): onebit's leaves
    (:func:`onebit.tracing.is_onebit_leaf`), BatchNorms, ThresholdedReLU, and every module without
    children but a ``Sequential``."""
    if is_onebit_leaf(module) or isinstance(module, (BATCHNORMS, ThresholdedReLU)):
        return True
    if isinstance(module, nn.Sequential):
        return False
    return next(iter(module.children()), None) is None


class _Tracer(Tracer):
    """onebit's tracer, keeping every :func:`_is_leaf` module whole."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Graphs:
    """The graphs of a model, how often each module is called in them, and why parts were not traced."""

    graphs: list[list[_Node]]
    calls: dict[int, int]  # id(module) -> number of call sites
    notes: list[str]


def _build_graphs(model: nn.Module) -> _Graphs:
    """The graphs of every part of ``model`` (see the module docstring)."""
    graphs: list[list[_Node]] = []
    notes: list[str] = []
    _collect(model, "", graphs, notes)
    calls: dict[int, int] = {}
    for g in graphs:
        for n in g:
            if n.op == "module":
                calls[id(n.module)] = calls.get(id(n.module), 0) + 1
    return _Graphs(graphs, calls, notes)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _collect(module: nn.Module, prefix: str, graphs: list, notes: list) -> None:
    """Append the graphs of ``module`` (qualified name ``prefix``) to ``graphs``."""
    if _is_leaf(module):
        if isinstance(module, BATCHNORMS):
            graphs.append(_lone_call(module, prefix))
        return
    items = _sequential_children(module, prefix) if isinstance(module, nn.Sequential) else []
    if items and all(_is_leaf(child) for _, child in items):
        _chain(items, prefix, graphs, notes)
        return
    graph = _trace(module, prefix, notes)
    if graph is None:
        if items:
            _chain(items, prefix, graphs, notes)
        else:
            for name, child in module.named_children():
                _collect(child, _join(prefix, name), graphs, notes)
        return
    graphs.append(_from_fx(graph, module, prefix))


def _lone_call(module: nn.Module, name: str) -> list[_Node]:
    """A module that is the whole model: input -> module -> output, neighbours unknown."""
    inp = _Node("input", None)
    node = _Node("module", name, module, inputs=[inp])
    inp.users.append(node)
    out = _Node("output", None, inputs=[node])
    node.users.append(out)
    return [inp, node, out]


def _sequential_children(seq: nn.Sequential, prefix: str) -> list[tuple[str, nn.Module]]:
    """(qualified name, child) of a Sequential in call order, nested Sequentials flattened."""
    items: list[tuple[str, nn.Module]] = []
    for name, child in seq.named_children():
        if isinstance(child, nn.Sequential):
            items += _sequential_children(child, _join(prefix, name))
        else:
            items.append((_join(prefix, name), child))
    return items


def _chain(items: list[tuple[str, nn.Module]], prefix: str, graphs: list, notes: list) -> None:
    """A Sequential's chain of children; non-leaf children are opaque here and get graphs of their own."""
    prev = _Node("input", prefix)
    chain = [prev]
    for name, child in items:
        if _is_leaf(child):
            node = _Node("module", name, child, inputs=[prev])
        else:
            node = _Node("other", name, child, inputs=[prev])
            _collect(child, name, graphs, notes)
        prev.users.append(node)
        chain.append(node)
        prev = node
    out = _Node("output", prefix, inputs=[prev])
    prev.users.append(out)
    chain.append(out)
    graphs.append(chain)


def _trace(module: nn.Module, prefix: str, notes: list) -> fx.Graph | None:
    """The fx graph of ``module``, or None with the reason in ``notes``."""
    try:
        return _Tracer().trace(module)
    except Exception as error:  # dynamic control flow, unsupported ops, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        notes.append(f"torch.fx could not trace {f'module {prefix!r}' if prefix else 'the model'} ({reason[:160]})")
        return None


def _from_fx(graph: fx.Graph, module: nn.Module, prefix: str) -> list[_Node]:
    """An fx graph of ``module`` as nodes; module targets become qualified names in the whole model."""
    mapping: dict[fx.Node, _Node] = {}
    nodes: list[_Node] = []
    kinds = {
        "placeholder": "input",
        "call_module": "module",
        "call_function": "function",
        "call_method": "method",
        "output": "output",
    }
    for n in graph.nodes:
        op = kinds.get(n.op, "other")
        target: Any = n.target
        mod = None
        if op == "module":
            target = _join(prefix, n.target)
            mod = module.get_submodule(n.target)
        node = _Node(op, target, mod, tuple(n.args), dict(n.kwargs), [mapping[a] for a in n.all_input_nodes])
        if op in ("input", "output"):
            node.target = prefix
        for a in node.inputs:
            a.users.append(node)
        mapping[n] = node
        nodes.append(node)
    return nodes


# ---------------------------------------------------------------------------
# what a node does to a per-channel affine map

_FLATTENS_OTHER = "flattens other dimensions than 1..-1"


def _arg(node: _Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _as_tuple(value: Any) -> tuple:
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,)


def _classify(node: _Node) -> tuple[str, str | None]:
    """(kind, problem): kind in identity, relu, avgpool, maxpool, flatten, layer, other."""
    if node.op == "module":
        return _classify_module(node.module)
    if node.op == "function":
        return _classify_function(node)
    if node.op == "method":
        return _classify_method(node)
    return "other", None


def _classify_module(m: nn.Module) -> tuple[str, str | None]:
    if isinstance(m, WEIGHT_LAYERS):
        return "layer", None
    if isinstance(m, IDENTITIES):
        if isinstance(m, nn.Identity) or not m.training:
            return "identity", None
        return "other", "is a dropout layer in train mode"
    if type(m) is nn.ReLU:
        return "relu", None
    if isinstance(m, ADAPTIVE_AVG_POOLS):
        return "avgpool", None
    if isinstance(m, AVG_POOLS):
        padded = any(int(p) > 0 for p in _as_tuple(m.padding))
        if getattr(m, "divisor_override", None) is not None:  # AvgPool1d has none
            return "other", "is an average pooling with divisor_override (not an average of real values)"
        if padded and m.count_include_pad:
            return "other", "is a padded average pooling with count_include_pad=True (border windows average in zeros)"
        return "avgpool", None
    if isinstance(m, MAX_POOLS):
        if getattr(m, "return_indices", False):
            return "other", "is a max pooling that returns indices"
        return "maxpool", None
    if isinstance(m, nn.Flatten):
        if m.start_dim == 1 and m.end_dim == -1:
            return "flatten", None
        return "other", _FLATTENS_OTHER
    return "other", None


def _classify_function(node: _Node) -> tuple[str, str | None]:
    fn = node.target
    if fn in RELU_FUNCTIONS:
        return "relu", None
    if fn in ADAPTIVE_AVG_POOL_FUNCTIONS:
        return "avgpool", None
    if fn in AVG_POOL_FUNCTIONS:
        padding = _arg(node, 3, "padding", 0)
        include = _arg(node, 5, "count_include_pad", True)
        divisor = _arg(node, 6, "divisor_override", None)
        if divisor is not None or (any(int(p) > 0 for p in _as_tuple(padding)) and include):
            return "other", "is a padded average pooling counting the padding"
        return "avgpool", None
    if fn in MAX_POOL_FUNCTIONS:
        return "maxpool", None
    if fn is torch.flatten:
        if _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1:
            return "flatten", None
        return "other", _FLATTENS_OTHER
    if fn in DROPOUT_FUNCTIONS:
        if not _arg(node, 2, "training", True):
            return "identity", None
        return "other", "is a dropout that may be active"
    return "other", None


def _classify_method(node: _Node) -> tuple[str, str | None]:
    if node.target == "relu":
        return "relu", None
    if node.target == "flatten":
        if _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1:
            return "flatten", None
        return "other", _FLATTENS_OTHER
    return "other", None


def _weight_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, QuantizedLayer) and layer.weight_quantizer is not None


def _input_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, QuantizedLayer) and layer.input_quantizer is not None


# ---------------------------------------------------------------------------
# planning


def _bn_problem(bn: nn.Module, name: str, calls: int) -> str | None:
    """Why ``bn`` cannot be canonized at all (whatever its neighbours), or None."""
    if bn.training:
        return "is in train mode (it normalizes with batch statistics); call model.eval() first"
    if bn.running_mean is None or bn.running_var is None:
        return (
            "has no running statistics (track_running_stats=False), "
            "so it normalizes with batch statistics even in eval mode"
        )
    if calls > 1:
        return f"is called {calls} times in forward; merging it into one neighbour would change the others"
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        return "is a lazy BatchNorm that has not been initialized yet"
    return None


class _Plan:
    """The graphs of ``model`` and what to do with a structure that cannot be canonized."""

    def __init__(self, model: nn.Module, skip_unmergeable: bool) -> None:
        self.model = model
        self.skip_unmergeable = skip_unmergeable
        self.graphs = _build_graphs(model)

    def calls(self, module: nn.Module) -> int:
        """How many call sites ``module`` has in the graphs."""
        return self.graphs.calls.get(id(module), 0)

    def bn_nodes(self) -> list[_Node]:
        """Every call of a BatchNorm, graph by graph in forward order."""
        return [n for g in self.graphs.graphs for n in g if n.op == "module" and isinstance(n.module, BATCHNORMS)]

    def unreached(self) -> list[str]:
        """BatchNorms that no graph calls (e.g. inside an untraceable module)."""
        reached = {id(n.module) for n in self.bn_nodes()}
        return [name for name, m in self.model.named_modules() if isinstance(m, BATCHNORMS) and id(m) not in reached]

    def fail(self, message: str) -> None:
        """Raise :class:`UnmergeableError`, or warn when ``skip_unmergeable`` (from the planner's caller's caller)."""
        if self.skip_unmergeable:
            warnings.warn(message + " Left unchanged.", CanonizationWarning, stacklevel=4)
        else:
            raise UnmergeableError(message + " Pass skip_unmergeable=True to leave it in place.")
