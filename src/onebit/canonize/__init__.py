r"""Exact, reversible model canonization: BatchNorm merging and integer thresholds.

Every function here changes a model *in place* and returns a :class:`Handle` whose
``remove()`` puts back every parameter, buffer, ``eps``, module and hook exactly
as it was (bit for bit). A handle is a context manager::

    with merge_batchnorm(model):
        explain(model)            # BatchNorms merged: same outputs (within 1e-5)
    # here the model is the original again, bit for bit

BatchNorm in eval mode is a per-channel affine map ``bn(x) = s * x + t`` with

    s = gamma / sqrt(running_var + eps),     t = beta - running_mean * s

(``eps`` included; the arithmetic of a merge runs in float64 and is rounded once).
:func:`merge_batchnorm` moves ``s`` and ``t`` into a neighbouring layer ``L``
(convolution or linear) and sets the BatchNorm to the identity (weight 1, bias 0,
running mean 0, running variance 1, eps 0):

* **left merge**, ``L -> bn``: ``W'[o] = s[o] W[o]``, ``b' = s b + t``. Exact for any
  convolution (padding, stride, dilation, groups) and for a layer whose *input* is
  quantized (the sign happens before ``W``), but not for a layer whose *weights* are
  quantized: ``q(s W) != s q(W)`` for a sign.
* **right merge**, ``bn -> L``: ``W'[:, i] = W[:, i] s[i]`` and ``b' = b + W t`` (the sum
  runs over the input channels and the kernel window). For a zero-padded convolution
  the border positions see zeros instead of ``t``, so a constant bias is wrong there;
  the merged layer gets a *per-position bias map* instead,
  ``map = L(T) - L'(0)`` with ``T`` the image filled with ``t``, computed once per
  input size (stride, dilation, groups, ``pad_value`` and every ``padding_mode`` are
  covered because the map is computed by the layer's own convolution). The map is
  added by a forward hook that the handle removes.
* **through a ReLU**, ``bn -> relu -> L``: with ``d = sign(s)`` and ``theta = -t / s``,

      relu(s x + t) = |s| relu(d (x - theta))          (s != 0)

  so the ReLU becomes a :class:`ThresholdedReLU` ``relu(d (x - theta))`` and ``|s|``
  moves into ``L`` as in a right merge (a channel with ``s = 0`` is the constant
  ``relu(t)``, which moves into ``L``'s bias). When the ReLU is not a module of its
  own (``F.relu`` in a ``forward``, or one ``nn.ReLU`` called at several places) the
  BatchNorm itself computes ``d (x - theta)`` (weight ``d``, bias ``-d theta``,
  statistics 0 and 1, eps 0) instead of becoming the identity.
* Between the BatchNorm and ``L`` the walk also crosses identities, dropout (eval),
  average pooling (which commutes with a per-channel affine map when every window
  averages real values only), max pooling (when the map is non-decreasing, i.e. after
  the ReLU or for positive scales) and a ``flatten`` to a linear layer (the channel's
  scale repeats over its ``in_features / C`` positions). A BatchNorm whose output feeds
  several such layers is merged into all of them.

A left merge is tried first, a right merge second. A BatchNorm in train mode, without
running statistics, called more than once, or whose neighbours do not allow an exact
merge raises :class:`UnmergeableError` naming it and why, before anything is changed;
``skip_unmergeable=True`` leaves such BatchNorms alone with a
:class:`CanonizationWarning` instead.

**Binary layers.** A BatchNorm that feeds a layer with a quantized input (a sign)
cannot be merged into weights: ``sign(s x + t)`` is a per-channel *threshold*, not a
scale. :func:`fold_thresholds` turns ``binary layer -> [max pool] -> bn -> sign`` into
exact integer thresholds (shared with the packed engine, :mod:`onebit.thresholds`).
Likewise a BatchNorm after a layer with quantized weights cannot be merged into them.
:func:`merge_batchnorm` never changes what such a model computes: it raises, or skips
with a warning.

Adjacency comes from the module structure for ``nn.Sequential`` (nested Sequentials
are flattened) and from a ``torch.fx`` trace otherwise (onebit's layers, quantizers and
every module without children are leaves of the trace). ``state_dict()`` stays in sync
while merged: parameters and buffers are changed in place (a bias-less layer that needs
a bias gets a ``bias`` parameter until ``remove()``; a :class:`ThresholdedReLU` stores its
threshold and direction as buffers). Keep the model in eval mode while merged, and do
not train it: the bias maps are computed from the weights at merge time.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from onebit import quant
from onebit.nn import functional as QF
from onebit.nn.layers import QActivation, QuantizedLayer

__all__ = [
    "Handle",
    "CompositeHandle",
    "HandleOrderError",
    "Canonizer",
    "MergeBatchNorm",
    "FoldThresholds",
    "ThresholdedReLU",
    "SignThreshold",
    "UnmergeableError",
    "CanonizationWarning",
    "merge_batchnorm",
    "fold_thresholds",
    "canonize",
]

_BN = nn.modules.batchnorm._BatchNorm
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class UnmergeableError(ValueError):
    """A BatchNorm (or BatchNorm + sign) that cannot be canonized exactly."""


class CanonizationWarning(UserWarning):
    """A structure left alone because ``skip_unmergeable=True``."""


# ---------------------------------------------------------------------------
# handles


class HandleOrderError(RuntimeError):
    """``remove()`` of a handle while a later one that touches the same modules is registered.

    Changes stack: removing the earlier one first would restore the state it saw under the
    later change, which the later one's ``remove()`` then overwrites with a merged state.
    Nothing is changed when this is raised: remove the later handle first."""


#: the leaf handles registered now (weakly: a dropped handle can no longer be removed anyway)
_REGISTERED: "weakref.WeakSet[Handle]" = weakref.WeakSet()
_SERIALS = itertools.count(1)


class Handle:
    """Undo record of one change to a model: ``register()`` applies it, ``remove()`` undoes it.

    ``remove()`` restores every parameter, buffer, attribute, module and hook the change
    touched, bit for bit, and is idempotent. A handle is a context manager that removes
    itself on exit.

    Handles that touch the same modules stack: they are removed last registered first.
    ``remove()`` of a handle while a later one touching one of its modules is still
    registered raises :class:`HandleOrderError` and changes nothing.
    """

    def __init__(self) -> None:
        self._registered = False
        self._serial = 0

    @property
    def registered(self) -> bool:
        return self._registered

    def register(self) -> "Handle":
        if not self._registered:
            self._apply()
            self._registered = True
            self._serial = next(_SERIALS)
            _REGISTERED.add(self)
        return self

    def remove(self) -> None:
        if self._registered:
            _check_removable(list(self._leaves()))
            self._undo()
            self._registered = False
            _REGISTERED.discard(self)

    def _leaves(self) -> Iterator["Handle"]:
        """The registered handles that hold changes (a composite's, or this one)."""
        if self._registered:
            yield self

    def _touched(self) -> set[int]:
        """ids of the objects this handle changed while registered."""
        patch = getattr(self, "_patch", None)
        return set(patch.touched) if patch is not None else set()

    def _apply(self) -> None:
        raise NotImplementedError

    def _undo(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _check_removable(leaves: list[Handle]) -> None:
    """Raise :class:`HandleOrderError` when a handle outside ``leaves``, registered after one of
    them, touches the same objects (removing ``leaves`` first would leave the model changed)."""
    own = {id(h) for h in leaves}
    for h in leaves:
        touched = h._touched()
        for later in list(_REGISTERED):
            if id(later) not in own and later._registered and later._serial > h._serial and later._touched() & touched:
                raise HandleOrderError(
                    f"cannot remove {h!r}: {later!r}, registered after it, changed the same modules "
                    "and is still registered; remove it first (nothing was changed)"
                )


class CompositeHandle(Handle):
    """Several handles as one: registered in order, removed in reverse order.

    Removing in reverse order is what makes stacked changes exact: a layer touched by
    two merges first gets back the state the second merge saw, then the original.
    """

    def __init__(self, handles: Iterable[Handle] = ()) -> None:
        super().__init__()
        self.handles: list[Handle] = list(handles)
        self._registered = any(h.registered for h in self.handles)

    def append(self, handle: Handle) -> None:
        self.handles.append(handle)
        self._registered = self._registered or handle.registered

    def register(self) -> "Handle":
        if not self._registered:
            self._apply()
            self._registered = True
        return self

    def remove(self) -> None:
        if self._registered:
            _check_removable(list(self._leaves()))
            self._undo()
            self._registered = False

    def _leaves(self) -> Iterator[Handle]:
        for h in self.handles:
            yield from h._leaves()

    def _apply(self) -> None:
        for h in self.handles:
            h.register()

    def _undo(self) -> None:
        for h in reversed(self.handles):
            h.remove()

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[Handle]:
        return iter(self.handles)

    def __repr__(self) -> str:
        return f"CompositeHandle({len(self.handles)} handles, registered={self.registered})"


class _Patch:
    """Records in-place changes so they can be undone exactly, last first."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.touched: set[int] = set()  # ids of the modules and tensors changed (alive while undo holds them)

    @torch.no_grad()
    def set_tensor(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        tensor = getattr(module, name)
        self.touched |= {id(module), id(tensor)}
        saved = tensor.detach().clone()
        tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))

        def undo() -> None:
            with torch.no_grad():
                tensor.copy_(saved)

        self._undo.append(undo)

    def add_bias(self, module: nn.Module, value: torch.Tensor) -> None:
        weight = module.weight
        bias = nn.Parameter(value.to(dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad)
        module.bias = bias
        self.touched.add(id(module))

        def undo() -> None:
            module.bias = None

        self._undo.append(undo)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        missing = object()
        old = obj.__dict__.get(name, missing) if not isinstance(obj, nn.Module) else getattr(obj, name, missing)
        setattr(obj, name, value)
        self.touched.add(id(obj))

        def undo() -> None:
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def replace_module(self, root: nn.Module, qualified_name: str, new: nn.Module) -> None:
        parent_name, _, child = qualified_name.rpartition(".")
        parent = root.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, new)
        self.touched |= {id(parent), id(old)}
        self._undo.append(lambda: setattr(parent, child, old))

    def forward_hook(self, module: nn.Module, hook: Callable) -> None:
        handle = module.register_forward_hook(hook)
        self.touched.add(id(module))
        self._undo.append(handle.remove)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.touched = set()


# ---------------------------------------------------------------------------
# modules that canonized models contain


class ThresholdedReLU(nn.Module):
    r"""Per-channel thresholded ReLU: ``y_c = max(d_c (x_c - theta_c), 0)``.

    ``theta`` (threshold) and ``d`` (direction, +1 or -1) are float buffers of length C;
    channels are dimension 1 (``[N, C, *]``) or the only dimension of an unbatched
    ``[C]`` input. With ``d = +1`` it passes ``x - theta`` above ``theta``; with ``d = -1``
    it passes ``theta - x`` below ``theta``. :func:`merge_batchnorm` puts it in place of a
    ReLU that follows a BatchNorm ``s x + t``, with ``theta = -t / s`` and ``d = sign(s)``.
    """

    def __init__(self, threshold: torch.Tensor, direction: torch.Tensor) -> None:
        super().__init__()
        if threshold.shape != direction.shape or threshold.dim() != 1:
            raise ValueError("ThresholdedReLU: threshold and direction must be 1-D tensors of one length")
        self.register_buffer("threshold", threshold.detach().clone())
        self.register_buffer("direction", direction.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.threshold.numel()
        shape = [c] if x.dim() == 1 else [1, c] + [1] * (x.dim() - 2)
        theta = self.threshold.to(x.dtype).view(shape)
        d = self.direction.to(x.dtype).view(shape)
        return torch.relu(d * (x - theta))

    def extra_repr(self) -> str:
        return f"channels={self.threshold.numel()}"


class SignThreshold(nn.Module):
    r"""``sign(bn(acc))`` as integer comparisons: ``y = -1`` where ``acc`` is past the threshold, else ``+1``.

    ``acc`` is the exact integer accumulator of a binary layer (as float). Per channel
    ``c``: direction +1 gives ``-1`` for ``acc < threshold``; direction -1 gives ``-1`` for
    ``acc > threshold`` (:class:`onebit.thresholds.Thresholds`). Channels are dimension 1.
    """

    def __init__(self, thresholds) -> None:
        super().__init__()
        self.register_buffer("threshold", thresholds.threshold.clone())
        self.register_buffer("direction", thresholds.direction.clone())

    @property
    def thresholds(self):
        from onebit.thresholds import Thresholds

        return Thresholds(self.threshold, self.direction)

    def forward(self, acc: torch.Tensor) -> torch.Tensor:
        negative = self.thresholds.negative(acc, channel_dim=1)
        one = torch.ones((), dtype=acc.dtype, device=acc.device)
        return torch.where(negative, -one, one)

    def extra_repr(self) -> str:
        return f"channels={self.threshold.numel()}"


# ---------------------------------------------------------------------------
# graph: who feeds whom


@dataclass(eq=False)
class _Node:
    op: str  # input | module | function | method | output | other
    target: Any  # qualified module name, function, method name
    module: nn.Module | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    inputs: list["_Node"] = field(default_factory=list)
    users: list["_Node"] = field(default_factory=list)

    def describe(self) -> str:
        if self.op == "module":
            return f"{type(self.module).__name__} '{self.target}'"
        if self.op == "output":
            return f"the output of module '{self.target}'" if self.target else "the model's output"
        if self.op == "input":
            return f"the input of module '{self.target}'" if self.target else "the model's input"
        if self.op == "function":
            return f"{getattr(self.target, '__module__', '') or ''}.{getattr(self.target, '__name__', self.target)}()".lstrip(".")
        if self.op == "method":
            return f"Tensor.{self.target}()"
        return f"module '{self.target}' (not traced into)" if self.target else "an untraced operation"


def _is_leaf(module: nn.Module) -> bool:
    if isinstance(module, (QuantizedLayer, QActivation, quant.Quantizer, _BN, ThresholdedReLU, SignThreshold)):
        return True
    if isinstance(module, nn.Sequential):
        return False
    return next(iter(module.children()), None) is None


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_leaf(m) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Graphs:
    graphs: list[list[_Node]]
    calls: dict[int, int]  # id(module) -> number of call sites
    notes: list[str]


def _build_graphs(model: nn.Module) -> _Graphs:
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
    if _is_leaf(module):
        if isinstance(module, _BN):
            inp = _Node("input", None)
            node = _Node("module", prefix, module, inputs=[inp])
            inp.users.append(node)
            out = _Node("output", None, inputs=[node])
            node.users.append(out)
            graphs.append([inp, node, out])
        return
    items: list[tuple[str, nn.Module]] = []

    def flatten(seq: nn.Sequential, pre: str) -> None:
        for name, child in seq.named_children():
            if isinstance(child, nn.Sequential):
                flatten(child, _join(pre, name))
            else:
                items.append((_join(pre, name), child))

    if isinstance(module, nn.Sequential):
        flatten(module, prefix)
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
    try:
        return _Tracer().trace(module)
    except Exception as error:  # dynamic control flow, unsupported ops, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        notes.append(f"torch.fx could not trace {f'module {prefix!r}' if prefix else 'the model'} ({reason[:160]})")
        return None


def _from_fx(graph: fx.Graph, module: nn.Module, prefix: str) -> list[_Node]:
    mapping: dict[fx.Node, _Node] = {}
    nodes: list[_Node] = []
    kinds = {"placeholder": "input", "call_module": "module", "call_function": "function", "call_method": "method", "output": "output"}
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
# per-channel operations a merge can walk through


def _arg(node: _Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _classify(node: _Node) -> tuple[str, str | None]:
    """(kind, problem): kind in identity, relu, avgpool, maxpool, flatten, layer, other."""
    m = node.module
    if node.op == "module":
        if isinstance(m, _WEIGHT_LAYERS):
            return "layer", None
        if isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)):
            if isinstance(m, nn.Identity) or not m.training:
                return "identity", None
            return "other", "is a dropout layer in train mode"
        if type(m) is nn.ReLU:
            return "relu", None
        if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return "avgpool", None
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            padded = any(int(p) > 0 for p in _as_tuple(m.padding))
            if m.divisor_override is not None:
                return "other", "is an average pooling with divisor_override (not an average of real values)"
            if padded and m.count_include_pad:
                return "other", "is a padded average pooling with count_include_pad=True (border windows average in zeros)"
            return "avgpool", None
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            if getattr(m, "return_indices", False):
                return "other", "is a max pooling that returns indices"
            return "maxpool", None
        if isinstance(m, nn.Flatten):
            if m.start_dim == 1 and m.end_dim == -1:
                return "flatten", None
            return "other", "flattens other dimensions than 1..-1"
        return "other", None
    if node.op == "function":
        fn = node.target
        if fn in (F.relu, torch.relu):
            return "relu", None
        if fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d):
            return "avgpool", None
        if fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
            padding = _arg(node, 3, "padding", 0)
            include = _arg(node, 5, "count_include_pad", True)
            divisor = _arg(node, 6, "divisor_override", None)
            if divisor is not None or (any(int(p) > 0 for p in _as_tuple(padding)) and include):
                return "other", "is a padded average pooling counting the padding"
            return "avgpool", None
        if fn in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d):
            return "maxpool", None
        if fn is torch.flatten:
            if _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1:
                return "flatten", None
            return "other", "flattens other dimensions than 1..-1"
        if fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d):
            if not _arg(node, 2, "training", True):
                return "identity", None
            return "other", "is a dropout that may be active"
        return "other", None
    if node.op == "method":
        if node.target == "relu":
            return "relu", None
        if node.target == "flatten":
            if _arg(node, 1, "start_dim", 0) == 1 and _arg(node, 2, "end_dim", -1) == -1:
                return "flatten", None
            return "other", "flattens other dimensions than 1..-1"
        return "other", None
    return "other", None


def _as_tuple(value: Any) -> tuple:
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value,)


def _weight_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, QuantizedLayer) and layer.weight_quantizer is not None


def _input_quantized(layer: nn.Module) -> bool:
    return isinstance(layer, QuantizedLayer) and layer.input_quantizer is not None


# ---------------------------------------------------------------------------
# BatchNorm as a per-channel affine map


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with bn(x) = s x + t (eval mode)."""
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    s = 1.0 / torch.sqrt(var + float(bn.eps))
    if bn.weight is not None:
        s = bn.weight.detach().double() * s
    t = -mean * s
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return s, t


def _bn_problem(bn: nn.Module, name: str, calls: int) -> str | None:
    if bn.training:
        return "is in train mode (it normalizes with batch statistics); call model.eval() first"
    if bn.running_mean is None or bn.running_var is None:
        return "has no running statistics (track_running_stats=False), so it normalizes with batch statistics even in eval mode"
    if calls > 1:
        return f"is called {calls} times in forward; merging it into one neighbour would change the others"
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
        return "is a lazy BatchNorm that has not been initialized yet"
    return None


@torch.no_grad()
def _set_identity(patch: _Patch, bn: nn.Module) -> None:
    if bn.weight is not None:
        patch.set_tensor(bn, "weight", torch.ones_like(bn.weight))
    if bn.bias is not None:
        patch.set_tensor(bn, "bias", torch.zeros_like(bn.bias))
    patch.set_tensor(bn, "running_mean", torch.zeros_like(bn.running_mean))
    patch.set_tensor(bn, "running_var", torch.ones_like(bn.running_var))
    patch.set_attr(bn, "eps", 0.0)


# ---------------------------------------------------------------------------
# the merges


@dataclass
class _Consumer:
    node: _Node
    scale: torch.Tensor  # float64 [C] (per input channel, or per feature after flatten)
    offset: torch.Tensor
    flattened: bool


@dataclass
class _ReluSite:
    node: _Node  # the relu node
    swap: bool  # True: replace the nn.ReLU module; False: the BatchNorm computes d (x - theta)


class _LeftMerge(Handle):
    def __init__(self, bn: nn.Module, layer: nn.Module, name: str, layer_name: str) -> None:
        super().__init__()
        self.bn, self.layer, self.name, self.layer_name = bn, layer, name, layer_name
        self._patch = _Patch()

    def _apply(self) -> None:
        bn, layer, patch = self.bn, self.layer, self._patch
        s, t = _bn_affine(bn)
        w = layer.weight.detach().double()
        shape = [-1] + [1] * (w.dim() - 1)
        patch.set_tensor(layer, "weight", w * s.view(shape))
        b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(s)
        new_bias = b * s + t
        if layer.bias is not None:
            patch.set_tensor(layer, "bias", new_bias)
        else:
            patch.add_bias(layer, new_bias)
        _set_identity(patch, bn)
        patch.set_attr(bn, "_onebit_merged", True)

    def _undo(self) -> None:
        self._patch.undo()

    def __repr__(self) -> str:
        return f"<merge {self.layer_name} -> {self.name}>"


class _RightMerge(Handle):
    def __init__(self, root: nn.Module, bn: nn.Module, name: str, consumers: list[_Consumer], relus: list[_ReluSite]) -> None:
        super().__init__()
        self.root, self.bn, self.name, self.consumers, self.relus = root, bn, name, consumers, relus
        self._patch = _Patch()

    def _apply(self) -> None:
        patch = self._patch
        s, t = _bn_affine(self.bn)
        direction = torch.where(s < 0, -1.0, 1.0).to(torch.float64)
        theta = torch.where(s == 0, torch.zeros_like(t), -t / torch.where(s == 0, torch.ones_like(s), s))
        for c in self.consumers:
            _merge_into(patch, c.node.module, c.scale, c.offset)
        swaps = [r for r in self.relus if r.swap]
        folded = [r for r in self.relus if not r.swap]
        bn_dtype = self.bn.running_mean.dtype
        for r in swaps:
            patch.replace_module(self.root, r.node.target, ThresholdedReLU(theta.to(bn_dtype), direction.to(bn_dtype)))
        if folded:
            # the ReLU is a function call: the BatchNorm computes d (x - theta) itself
            patch.set_tensor(self.bn, "weight", direction)
            patch.set_tensor(self.bn, "bias", -direction * theta)
            patch.set_tensor(self.bn, "running_mean", torch.zeros_like(self.bn.running_mean))
            patch.set_tensor(self.bn, "running_var", torch.ones_like(self.bn.running_var))
            patch.set_attr(self.bn, "eps", 0.0)
        else:
            _set_identity(patch, self.bn)
        patch.set_attr(self.bn, "_onebit_merged", True)

    def _undo(self) -> None:
        self._patch.undo()

    def __repr__(self) -> str:
        names = ", ".join(c.node.target for c in self.consumers)
        return f"<merge {self.name} -> {names}>"


def _merge_into(patch: _Patch, layer: nn.Module, scale: torch.Tensor, offset: torch.Tensor) -> None:
    """Right merge of ``x -> scale * x + offset`` (per input channel/feature) into ``layer``."""
    w = layer.weight.detach().double()
    old_w = layer.weight.detach().clone()
    old_b = layer.bias.detach().clone() if layer.bias is not None else None
    if isinstance(layer, nn.Linear):
        scale_w, offset_w = scale.view(1, -1), offset.view(1, -1)
    else:
        out_c, in_pg = w.shape[0], w.shape[1]
        groups = layer.groups
        per = out_c // groups
        scale_w = scale.view(groups, 1, in_pg).expand(groups, per, in_pg).reshape(out_c, in_pg)
        offset_w = offset.view(groups, 1, in_pg).expand(groups, per, in_pg).reshape(out_c, in_pg)
        scale_w = scale_w.view(out_c, in_pg, *([1] * (w.dim() - 2)))
        offset_w = offset_w.view(out_c, in_pg, *([1] * (w.dim() - 2)))
    has_offset = bool((offset != 0).any())
    new_w = w * scale_w
    patch.set_tensor(layer, "weight", new_w)
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if has_offset:
        interior = (w * offset_w).flatten(1).sum(dim=1)
        new_b = b + interior
        if layer.bias is not None:
            patch.set_tensor(layer, "bias", new_b)
        else:
            patch.add_bias(layer, new_b)
    if isinstance(layer, _CONV) and _needs_bias_map(layer, has_offset):
        new_b_exact = layer.bias.detach().clone() if layer.bias is not None else None
        patch.forward_hook(layer, _BiasMap(layer, old_w, old_b, offset, layer.weight.detach().clone(), new_b_exact))


def _needs_bias_map(layer: nn.Module, has_offset: bool) -> bool:
    if layer.padding_mode != "zeros":
        return False  # reflect / replicate / circular pad with real (affine) values: constant bias is exact
    if isinstance(layer.padding, str):
        padded = layer.padding == "same" and any(k > 1 for k in layer.kernel_size)
    else:
        padded = any(int(p) > 0 for p in layer.padding)
    if not padded:
        return False
    return has_offset or float(getattr(layer, "pad_value", 0.0)) != 0.0


class _BiasMap:
    """Forward hook adding ``L(T) - L'(0)``: the exact per-position correction of a padded conv."""

    def __init__(self, layer, old_w, old_b, offset, new_w, new_b) -> None:
        self.layer = layer
        self.old_w, self.old_b, self.offset, self.new_w, self.new_b = old_w, old_b, offset, new_w, new_b
        self.cache: dict[tuple, torch.Tensor] = {}

    def _conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        layer = self.layer
        w = w.double()
        b = b.double() if b is not None else None
        if isinstance(layer, QuantizedLayer):
            return QF.qconv(
                x, w, b, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                pad_value=layer.pad_value, padding_mode=layer.padding_mode,
            )
        return layer._conv_forward(x, w, b)

    @torch.no_grad()
    def correction(self, spatial: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (spatial, dtype, device)
        if key not in self.cache:
            c = self.offset.numel()
            image = self.offset.view(1, c, *([1] * len(spatial))).expand(1, c, *spatial).to(device)
            zeros = torch.zeros_like(image)
            corr = self._conv(image, self.old_w.to(device), None if self.old_b is None else self.old_b.to(device))
            corr = corr - self._conv(zeros, self.new_w.to(device), None if self.new_b is None else self.new_b.to(device))
            self.cache[key] = corr[0].to(dtype)
        return self.cache[key]

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ndim = self.old_w.dim() - 2
        spatial = tuple(args[0].shape[-ndim:])
        return output + self.correction(spatial, output.dtype, output.device)


# ---------------------------------------------------------------------------
# planning


class _Plan:
    def __init__(self, model: nn.Module, skip: bool) -> None:
        self.model = model
        self.skip = skip
        self.graphs = _build_graphs(model)
        self.names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}

    def bn_nodes(self) -> list[tuple[_Node, list[_Node]]]:
        out = []
        for g in self.graphs.graphs:
            for n in g:
                if n.op == "module" and isinstance(n.module, _BN):
                    out.append((n, g))
        return out

    def unreached(self) -> list[str]:
        """BatchNorms that no graph calls (e.g. inside an untraceable module)."""
        reached = {id(n.module) for n, _ in self.bn_nodes()}
        return [name for name, m in self.model.named_modules() if isinstance(m, _BN) and id(m) not in reached]

    def fail(self, message: str) -> None:
        if self.skip:
            warnings.warn(message + " Left unchanged.", CanonizationWarning, stacklevel=4)
        else:
            raise UnmergeableError(message + " Pass skip_unmergeable=True to leave it in place.")


def _left_candidate(plan: _Plan, node: _Node) -> tuple[_Node | None, str]:
    bn = node.module
    producer = node.inputs[0] if node.inputs else None
    if producer is None or producer.op != "module" or not isinstance(producer.module, _WEIGHT_LAYERS):
        what = producer.describe() if producer is not None else "nothing"
        return None, f"its input comes from {what}, not a convolution or linear layer"
    layer = producer.module
    desc = producer.describe()
    if plan.graphs.calls.get(id(layer), 0) > 1:
        return None, f"its input layer {desc} is called more than once"
    others = [u for u in producer.users if u is not node]
    if others:
        return None, f"its input layer {desc} also feeds {others[0].describe()}"
    if _weight_quantized(layer):
        return None, (
            f"its input layer {desc} has quantized weights ({type(layer.weight_quantizer).__name__}); "
            "a per-channel scale cannot be folded into them exactly"
        )
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return None, f"its input layer {desc} has {out} outputs, the BatchNorm {bn.num_features} channels"
    return producer, ""


def _right_candidates(plan: _Plan, node: _Node) -> tuple[list[_Consumer], list[_ReluSite], str]:
    bn = node.module
    s, t = _bn_affine(bn)
    consumers: list[_Consumer] = []
    relus: list[_ReluSite] = []
    channels = bn.num_features

    @dataclass
    class State:
        scale: torch.Tensor
        offset: torch.Tensor
        relu: bool = False
        flattened: bool = False

    def walk(n: _Node, state: State, branched: bool) -> str:
        if not n.users:
            return "its output is not used"
        branch = branched or len(n.users) > 1
        for user in n.users:
            kind, problem = _classify(user)
            if len(user.inputs) != 1 and kind != "layer":
                kind, problem = "other", None
            desc = user.describe()
            if kind == "identity":
                err = walk(user, state, branch)
            elif kind == "avgpool":
                if state.flattened:
                    return f"its output is pooled after flattening ({desc})"
                err = walk(user, state, branch)
            elif kind == "maxpool":
                if state.flattened:
                    return f"its output is pooled after flattening ({desc})"
                if not state.relu and bool((s < 0).any()):
                    return f"its output goes to {desc}, and max pooling does not commute with negative BatchNorm scales"
                err = walk(user, state, branch)
            elif kind == "flatten":
                if state.flattened:
                    return f"its output is flattened twice ({desc})"
                err = walk(user, State(state.scale, state.offset, state.relu, True), branch)
            elif kind == "relu":
                if state.relu:
                    err = walk(user, state, branch)  # relu of a non-negative map: identity
                elif state.flattened:
                    return f"its output is flattened before the ReLU {desc}"
                else:
                    swap = user.op == "module" and plan.graphs.calls.get(id(user.module), 0) == 1
                    if not swap and (bn.weight is None or bn.bias is None):
                        return f"the ReLU after it ({desc}) is not a module of its own and the BatchNorm has no affine parameters to hold the threshold"
                    if not swap and branch:
                        return (
                            f"the ReLU after it ({desc}) is not a module of its own and the BatchNorm's output "
                            "also goes elsewhere"
                        )
                    relus.append(_ReluSite(user, swap))
                    after = State(s.abs(), torch.where(s == 0, torch.relu(t), torch.zeros_like(t)), True, False)
                    err = walk(user, after, branch)
            elif kind == "layer":
                err = consumer(user, state)
            else:
                return f"its output goes to {desc}" + (f", which {problem}" if problem else ", which is not a convolution, linear layer or per-channel operation")
            if err:
                return err
        return ""

    def consumer(user: _Node, state: State) -> str:
        layer = user.module
        desc = user.describe()
        if len(user.inputs) != 1:
            return f"its output goes to {desc} together with other inputs"
        if plan.graphs.calls.get(id(layer), 0) > 1:
            return f"its output goes to {desc}, which is called more than once"
        if _input_quantized(layer):
            return (
                f"its output goes to {desc}, whose input is quantized ({type(layer.input_quantizer).__name__}): "
                "a BatchNorm before a sign is a threshold, not a scale (see onebit.canonize.fold_thresholds)"
            )
        if _weight_quantized(layer):
            return (
                f"its output goes to {desc}, whose weights are quantized ({type(layer.weight_quantizer).__name__}); "
                "a per-channel scale cannot be folded into them exactly"
            )
        if isinstance(layer, nn.Linear):
            if state.flattened:
                if layer.in_features % channels:
                    return f"{desc} has {layer.in_features} inputs, not a multiple of the BatchNorm's {channels} channels"
                repeat = layer.in_features // channels
                scale, offset = state.scale.repeat_interleave(repeat), state.offset.repeat_interleave(repeat)
            else:
                if layer.in_features != channels:
                    return f"{desc} has {layer.in_features} inputs, the BatchNorm {channels} channels"
                scale, offset = state.scale, state.offset
        else:
            if state.flattened:
                return f"its output is flattened before {desc}"
            if layer.in_channels != channels:
                return f"{desc} has {layer.in_channels} input channels, the BatchNorm {channels}"
            scale, offset = state.scale, state.offset
        if any(c.node.module is layer for c in consumers):
            return f"its output reaches {desc} twice"
        consumers.append(_Consumer(user, scale, offset, state.flattened))
        return ""

    err = walk(node, State(s, t), False)
    return consumers, relus, err


def _plan_merges(model: nn.Module, skip: bool) -> tuple[list[Handle], _Plan]:
    plan = _Plan(model, skip)
    lefts: list[Handle] = []
    rights: list[Handle] = []
    claimed: set[int] = set()
    for node, _ in plan.bn_nodes():
        bn, name = node.module, node.target
        if getattr(bn, "_onebit_merged", False):
            continue
        problem = _bn_problem(bn, name, plan.graphs.calls.get(id(bn), 0))
        if problem:
            plan.fail(f"BatchNorm '{name}' cannot be merged: it {problem}.")
            continue
        producer, left_reason = _left_candidate(plan, node)
        if producer is not None:
            lefts.append(_LeftMerge(bn, producer.module, name, producer.target))
            continue
        consumers, relus, right_reason = _right_candidates(plan, node)
        if not right_reason and consumers:
            if any(id(c.node.module) in claimed for c in consumers):
                right_reason = "its output layer is already the target of another BatchNorm"
            else:
                claimed.update(id(c.node.module) for c in consumers)
                rights.append(_RightMerge(model, bn, name, consumers, relus))
                continue
        plan.fail(f"BatchNorm '{name}' cannot be merged exactly: {left_reason}; and {right_reason or 'it feeds no layer'}.")
    for name in plan.unreached():
        if not getattr(model.get_submodule(name), "_onebit_merged", False):
            note = f" ({'; '.join(plan.graphs.notes)})" if plan.graphs.notes else ""
            plan.fail(f"BatchNorm '{name}' cannot be merged: its neighbours are unknown{note}.")
    # left merges first: a right merge's bias map is computed from the layer as the left merge left it
    return lefts + rights, plan


# ---------------------------------------------------------------------------
# public API


class Canonizer:
    """A reversible model transformation: ``apply(model)`` changes the model in place and returns a :class:`Handle`."""

    def apply(self, model: nn.Module) -> Handle:
        raise NotImplementedError

    def __call__(self, model: nn.Module) -> Handle:
        return self.apply(model)


class MergeBatchNorm(Canonizer):
    """Merge every eval-mode BatchNorm into its neighbouring convolution or linear layer (see :func:`merge_batchnorm`)."""

    def __init__(self, skip_unmergeable: bool = False) -> None:
        self.skip_unmergeable = skip_unmergeable

    def apply(self, model: nn.Module) -> CompositeHandle:
        handles, _ = _plan_merges(model, self.skip_unmergeable)
        composite = CompositeHandle()
        try:
            for h in handles:
                composite.append(h.register())
        except BaseException:
            composite.remove()
            raise
        return composite

    def __repr__(self) -> str:
        return f"MergeBatchNorm(skip_unmergeable={self.skip_unmergeable})"


def merge_batchnorm(model: nn.Module, *, skip_unmergeable: bool = False) -> CompositeHandle:
    r"""Merge every eval-mode BatchNorm of ``model`` into an adjacent layer, exactly and reversibly.

    Outputs after merging equal the original ones within float32 rounding (1e-5);
    each merged BatchNorm becomes the identity (weight 1, bias 0, running mean 0,
    running variance 1, eps 0). Returns a :class:`CompositeHandle` (one part per merged
    BatchNorm) whose ``remove()`` restores the model bit for bit; use it as a context
    manager. The rules (left, right, through ReLU and pooling, padded convolutions,
    binary layers) are in the module docstring.

    Raises :class:`UnmergeableError` (a ``ValueError``) naming the first BatchNorm that
    cannot be merged exactly, before changing anything; with ``skip_unmergeable=True``
    such BatchNorms are left alone and a :class:`CanonizationWarning` names each.
    """
    return MergeBatchNorm(skip_unmergeable).apply(model)


def canonize(model: nn.Module, canonizers: Sequence[Canonizer]) -> CompositeHandle:
    """Apply several canonizers in order; the returned handle removes them in reverse order."""
    composite = CompositeHandle()
    try:
        for c in canonizers:
            composite.append(c.apply(model))
    except BaseException:
        composite.remove()
        raise
    return composite


# ---------------------------------------------------------------------------
# BatchNorm + sign -> integer thresholds


def _sign_consumer(node: _Node) -> bool:
    """A node that applies a plain sign (+-1 output) to its input first (:func:`onebit.quant.is_sign`)."""
    m = node.module
    if node.op != "module":
        return False
    if isinstance(m, QuantizedLayer):
        return quant.is_sign(m.input_quantizer)
    if isinstance(m, QActivation):
        return quant.is_sign(m.quantizer)
    return quant.is_sign(m)


class _FoldThreshold(Handle):
    def __init__(self, root: nn.Module, name: str, bn: nn.Module, producer: nn.Module, producer_name: str) -> None:
        super().__init__()
        self.root, self.name, self.bn, self.producer, self.producer_name = root, name, bn, producer, producer_name
        self._patch = _Patch()
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


def _fold_plan(model: nn.Module, skip: bool) -> list[_FoldThreshold]:
    plan = _Plan(model, skip)
    folds: list[_FoldThreshold] = []
    for node, _ in plan.bn_nodes():
        bn, name = node.module, node.target
        if getattr(bn, "_onebit_merged", False):
            continue
        # forward: every path must end in a sign, through identities and flatten only
        ends: list[_Node] = []
        stack, bad = [node], None
        while stack and bad is None:
            n = stack.pop()
            if not n.users:
                bad = "its output is not used"
            for u in n.users:
                kind, _ = _classify(u)
                if _sign_consumer(u) and len(u.inputs) == 1:
                    ends.append(u)
                elif kind in ("identity", "flatten") and len(u.inputs) == 1:
                    stack.append(u)
                else:
                    bad = f"its output goes to {u.describe()}, which does not take its sign first"
                    break
        if bad is None and not ends:
            bad = "it feeds no sign"
        if bad is not None:
            # a BatchNorm that feeds no sign is merge_batchnorm's business, not an error here
            if any(_sign_consumer(u) for u in node.users):
                plan.fail(f"BatchNorm '{name}' cannot be folded into thresholds: {bad}.")
            continue
        problem = _bn_problem(bn, name, plan.graphs.calls.get(id(bn), 0))
        if problem:
            plan.fail(f"BatchNorm '{name}' cannot be folded into thresholds: it {problem}.")
            continue
        # backward: the input must be the integer accumulator of a binary layer (max pooling keeps it integer)
        p = node.inputs[0] if node.inputs else None
        while p is not None and _classify(p)[0] in ("identity", "maxpool") and len(p.inputs) == 1:
            p = p.inputs[0]
        layer = p.module if p is not None and p.op == "module" else None
        reason = None
        if not isinstance(layer, QuantizedLayer) or not isinstance(layer, _WEIGHT_LAYERS):
            reason = f"its input comes from {p.describe() if p is not None else 'nothing'}, not from a binary layer's accumulator"
        elif not quant.is_sign(layer.input_quantizer) or not quant.is_sign(layer.weight_quantizer):
            reason = f"{p.describe()} does not binarize both its input and its weights with a plain sign, so its output is not an integer accumulator"
        elif layer.bias is not None:
            reason = f"{p.describe()} has a bias, so its output is not an integer accumulator"
        elif plan.graphs.calls.get(id(layer), 0) != 1:
            reason = f"{p.describe()} is called more than once"
        if reason:
            plan.fail(f"BatchNorm '{name}' cannot be folded into thresholds: {reason}.")
            continue
        folds.append(_FoldThreshold(model, name, bn, layer, p.target))
    return folds


class FoldThresholds(Canonizer):
    """Replace ``binary layer -> [max pool] -> BatchNorm -> sign`` by integer thresholds (see :func:`fold_thresholds`)."""

    def __init__(self, skip_unmergeable: bool = False) -> None:
        self.skip_unmergeable = skip_unmergeable

    def apply(self, model: nn.Module) -> CompositeHandle:
        folds = _fold_plan(model, self.skip_unmergeable)
        composite = CompositeHandle()
        try:
            for f in folds:
                composite.append(f.register())
        except BaseException:
            composite.remove()
            raise
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
