r"""BatchNorm merged into a neighbouring convolution or linear layer, exactly and reversibly.

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

A left merge is tried first, a right merge second; left merges are registered first, so
a right merge's bias map is computed from the layer as the left merge left it. A
BatchNorm in train mode, without running statistics, called more than once, or whose
neighbours do not allow an exact merge raises :class:`UnmergeableError` naming it and
why, before anything is changed; ``skip_unmergeable=True`` leaves such BatchNorms alone
with a :class:`CanonizationWarning` instead. A BatchNorm before a layer with a quantized
input (a sign) is a threshold, not a scale (:mod:`onebit.canonize.fold`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onebit.batchnorm import batchnorm_affine
from onebit.canonize.adjacency import (
    _bn_problem,
    _classify,
    _input_quantized,
    _Node,
    _Plan,
    _weight_quantized,
)
from onebit.canonize.handles import Canonizer, CompositeHandle, Handle, Patch, register_all
from onebit.layerkinds import CONVOLUTIONS, WEIGHT_LAYERS
from onebit.nn import functional as QF
from onebit.nn.layers import QuantizedLayer
from onebit.nn.thresholded import ThresholdedReLU

__all__ = ["MergeBatchNorm", "merge_batchnorm"]


# ---------------------------------------------------------------------------
# BatchNorm as a per-channel affine map


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, t) in float64 with bn(x) = s x + t (eval mode): ``s = gamma * (1 / sqrt(var + eps))``,
    ``t = beta - mean * s`` (:func:`onebit.batchnorm.batchnorm_affine`)."""
    return batchnorm_affine(bn, reciprocal=True)


@torch.no_grad()
def _set_affine(patch: Patch, bn: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    """Make ``bn`` compute ``weight * x + bias`` (statistics 0 and 1, eps 0);
    a None keeps an absent parameter absent."""
    if weight is not None:
        patch.set_tensor(bn, "weight", weight)
    if bias is not None:
        patch.set_tensor(bn, "bias", bias)
    patch.set_tensor(bn, "running_mean", torch.zeros_like(bn.running_mean))
    patch.set_tensor(bn, "running_var", torch.ones_like(bn.running_var))
    patch.set_attr(bn, "eps", 0.0)


def _set_identity(patch: Patch, bn: nn.Module) -> None:
    weight = torch.ones_like(bn.weight) if bn.weight is not None else None
    bias = torch.zeros_like(bn.bias) if bn.bias is not None else None
    _set_affine(patch, bn, weight, bias)


# ---------------------------------------------------------------------------
# the merges


@dataclass
class _Consumer:
    """A layer a right merge changes, and the map it takes: ``x -> scale * x + offset`` per input."""

    node: _Node
    scale: torch.Tensor  # float64 [C] (per input channel, or per feature after flatten)
    offset: torch.Tensor
    flattened: bool


@dataclass
class _ReluSite:
    """A ReLU between a BatchNorm and the layers it is merged into."""

    node: _Node  # the relu node
    swap: bool  # True: replace the nn.ReLU module; False: the BatchNorm computes d (x - theta)


class _LeftMerge(Handle):
    """``layer -> bn`` becomes ``layer' -> identity``: ``W'[o] = s[o] W[o]``, ``b' = s b + t``."""

    def __init__(self, bn: nn.Module, layer: nn.Module, name: str, layer_name: str) -> None:
        super().__init__()
        self.bn, self.layer, self.name, self.layer_name = bn, layer, name, layer_name
        self._patch = Patch()

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
    """``bn -> [relu, pooling, flatten] -> layers`` becomes ``identity (or d (x - theta)) -> ... -> layers'``."""

    def __init__(
        self, root: nn.Module, bn: nn.Module, name: str, consumers: list[_Consumer], relus: list[_ReluSite]
    ) -> None:
        super().__init__()
        self.root, self.bn, self.name, self.consumers, self.relus = root, bn, name, consumers, relus
        self._patch = Patch()

    def _apply(self) -> None:
        patch = self._patch
        s, t = _bn_affine(self.bn)
        direction = torch.where(s < 0, -1.0, 1.0).to(torch.float64)
        theta = torch.where(s == 0, torch.zeros_like(t), -t / torch.where(s == 0, torch.ones_like(s), s))
        for c in self.consumers:
            _merge_into(patch, c.node.module, c.scale, c.offset)
        bn_dtype = self.bn.running_mean.dtype
        for r in self.relus:
            if r.swap:
                patch.replace_module(
                    self.root, r.node.target, ThresholdedReLU(theta.to(bn_dtype), direction.to(bn_dtype))
                )
        if any(not r.swap for r in self.relus):
            # the ReLU is a function call: the BatchNorm computes d (x - theta) itself
            _set_affine(patch, self.bn, direction, -direction * theta)
        else:
            _set_identity(patch, self.bn)
        patch.set_attr(self.bn, "_onebit_merged", True)

    def _undo(self) -> None:
        self._patch.undo()

    def __repr__(self) -> str:
        names = ", ".join(c.node.target for c in self.consumers)
        return f"<merge {self.name} -> {names}>"


def _per_weight(layer: nn.Module, w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per-input-channel ``values`` laid out like ``w``
    (``[out, in / groups, *kernel]``, or ``[1, in]`` for a linear layer)."""
    if isinstance(layer, nn.Linear):
        return values.view(1, -1)
    out_c, in_pg = w.shape[0], w.shape[1]
    groups = layer.groups
    per = out_c // groups
    expanded = values.view(groups, 1, in_pg).expand(groups, per, in_pg).reshape(out_c, in_pg)
    return expanded.view(out_c, in_pg, *([1] * (w.dim() - 2)))


def _merge_into(patch: Patch, layer: nn.Module, scale: torch.Tensor, offset: torch.Tensor) -> None:
    """Right merge of ``x -> scale * x + offset`` (per input channel/feature) into ``layer``."""
    w = layer.weight.detach().double()
    old_w = layer.weight.detach().clone()
    old_b = layer.bias.detach().clone() if layer.bias is not None else None
    has_offset = bool((offset != 0).any())
    patch.set_tensor(layer, "weight", w * _per_weight(layer, w, scale))
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if has_offset:
        interior = (w * _per_weight(layer, w, offset)).flatten(1).sum(dim=1)
        new_b = b + interior
        if layer.bias is not None:
            patch.set_tensor(layer, "bias", new_b)
        else:
            patch.add_bias(layer, new_b)
    if isinstance(layer, CONVOLUTIONS) and _needs_bias_map(layer, has_offset):
        new_b_exact = layer.bias.detach().clone() if layer.bias is not None else None
        patch.forward_hook(layer, _BiasMap(layer, old_w, old_b, offset, layer.weight.detach().clone(), new_b_exact))


def _needs_bias_map(layer: nn.Module, has_offset: bool) -> bool:
    """A zero-padded convolution whose border sees a non-zero offset (or pad value): a constant bias is wrong there."""
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
                x,
                w,
                b,
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                groups=layer.groups,
                pad_value=layer.pad_value,
                padding_mode=layer.padding_mode,
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
            corr = corr - self._conv(
                zeros, self.new_w.to(device), None if self.new_b is None else self.new_b.to(device)
            )
            self.cache[key] = corr[0].to(dtype)
        return self.cache[key]

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        ndim = self.old_w.dim() - 2
        spatial = tuple(args[0].shape[-ndim:])
        return output + self.correction(spatial, output.dtype, output.device)


# ---------------------------------------------------------------------------
# planning


def _left_candidate(plan: _Plan, node: _Node) -> tuple[_Node | None, str]:
    """(the layer to merge the BatchNorm of ``node`` into, "") or (None, why there is none)."""
    bn = node.module
    producer = node.inputs[0] if node.inputs else None
    if producer is None or producer.op != "module" or not isinstance(producer.module, WEIGHT_LAYERS):
        what = producer.describe() if producer is not None else "nothing"
        return None, f"its input comes from {what}, not a convolution or linear layer"
    layer = producer.module
    desc = producer.describe()
    if plan.calls(layer) > 1:
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


@dataclass
class _MapSoFar:
    """The BatchNorm's map as it reaches a node: ``x -> scale * x + offset`` per channel (float64),
    after a ReLU (then non-negative, with ``scale = |s|``) and/or a flatten."""

    scale: torch.Tensor
    offset: torch.Tensor
    relu: bool = False
    flattened: bool = False


class _RightMergeSearch:
    """Where the output of a BatchNorm goes, for a right merge.

    Walks forward from the BatchNorm through per-channel steps (identities, pooling,
    flatten, a ReLU) to every convolution or linear layer that its output reaches.
    ``consumers`` are those layers with the map each takes, ``relus`` the ReLUs crossed, and
    ``problem`` is "" when every path ends in a layer that can take the map exactly, else
    why not (the first reason found).
    """

    def __init__(self, plan: _Plan, node: _Node) -> None:
        self.plan = plan
        self.bn = node.module
        self.channels = self.bn.num_features
        self.scale, self.offset = _bn_affine(self.bn)
        self.consumers: list[_Consumer] = []
        self.relus: list[_ReluSite] = []
        self.problem = self._walk(node, _MapSoFar(self.scale, self.offset), False)

    def _walk(self, node: _Node, state: _MapSoFar, branched: bool) -> str:
        """Follow every user of ``node``; ``branched`` once the output has gone two ways."""
        if not node.users:
            return "its output is not used"
        branched = branched or len(node.users) > 1
        for user in node.users:
            problem = self._step(user, state, branched)
            if problem:
                return problem
        return ""

    def _step(self, user: _Node, state: _MapSoFar, branched: bool) -> str:
        kind, problem = _classify(user)
        if len(user.inputs) != 1 and kind != "layer":
            kind, problem = "other", None
        desc = user.describe()
        if kind == "identity":
            return self._walk(user, state, branched)
        if kind in ("avgpool", "maxpool"):
            return self._through_pooling(user, kind, state, branched)
        if kind == "flatten":
            if state.flattened:
                return f"its output is flattened twice ({desc})"
            return self._walk(user, _MapSoFar(state.scale, state.offset, state.relu, True), branched)
        if kind == "relu":
            return self._through_relu(user, state, branched)
        if kind == "layer":
            return self._into_layer(user, state)
        return f"its output goes to {desc}" + (
            f", which {problem}" if problem else ", which is not a convolution, linear layer or per-channel operation"
        )

    def _through_pooling(self, user: _Node, kind: str, state: _MapSoFar, branched: bool) -> str:
        """Average pooling commutes with the map; max pooling only while it is non-decreasing."""
        desc = user.describe()
        if state.flattened:
            return f"its output is pooled after flattening ({desc})"
        if kind == "maxpool" and not state.relu and bool((self.scale < 0).any()):
            return f"its output goes to {desc}, and max pooling does not commute with negative BatchNorm scales"
        return self._walk(user, state, branched)

    def _through_relu(self, user: _Node, state: _MapSoFar, branched: bool) -> str:
        """``relu(s x + t) = |s| relu(d (x - theta))``: ``|s|`` goes on, the rest stays at the ReLU."""
        desc = user.describe()
        if state.relu:
            return self._walk(user, state, branched)  # relu of a non-negative map: identity
        if state.flattened:
            return f"its output is flattened before the ReLU {desc}"
        swap = user.op == "module" and self.plan.calls(user.module) == 1
        if not swap and (self.bn.weight is None or self.bn.bias is None):
            return (
                f"the ReLU after it ({desc}) is not a module of its own "
                "and the BatchNorm has no affine parameters to hold the threshold"
            )
        if not swap and branched:
            return (
                f"the ReLU after it ({desc}) is not a module of its own and the BatchNorm's output also goes elsewhere"
            )
        self.relus.append(_ReluSite(user, swap))
        s, t = self.scale, self.offset
        after = _MapSoFar(s.abs(), torch.where(s == 0, torch.relu(t), torch.zeros_like(t)), True, False)
        return self._walk(user, after, branched)

    def _into_layer(self, user: _Node, state: _MapSoFar) -> str:
        layer = user.module
        desc = user.describe()
        if len(user.inputs) != 1:
            return f"its output goes to {desc} together with other inputs"
        if self.plan.calls(layer) > 1:
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
        per_input = self._per_input(layer, desc, state)
        if isinstance(per_input, str):
            return per_input
        if any(c.node.module is layer for c in self.consumers):
            return f"its output reaches {desc} twice"
        self.consumers.append(_Consumer(user, *per_input, state.flattened))
        return ""

    def _per_input(self, layer: nn.Module, desc: str, state: _MapSoFar) -> tuple[torch.Tensor, torch.Tensor] | str:
        """(scale, offset) per input of ``layer`` (a channel's repeated over its features after a flatten),
        or why they do not fit."""
        channels = self.channels
        if isinstance(layer, nn.Linear):
            if not state.flattened:
                if layer.in_features != channels:
                    return f"{desc} has {layer.in_features} inputs, the BatchNorm {channels} channels"
                return state.scale, state.offset
            if layer.in_features % channels:
                return f"{desc} has {layer.in_features} inputs, not a multiple of the BatchNorm's {channels} channels"
            repeat = layer.in_features // channels
            return state.scale.repeat_interleave(repeat), state.offset.repeat_interleave(repeat)
        if state.flattened:
            return f"its output is flattened before {desc}"
        if layer.in_channels != channels:
            return f"{desc} has {layer.in_channels} input channels, the BatchNorm {channels}"
        return state.scale, state.offset


def _plan_merges(model: nn.Module, skip_unmergeable: bool) -> list[Handle]:
    """One unregistered merge per BatchNorm that can be merged (left merges first); the others fail or warn."""
    plan = _Plan(model, skip_unmergeable)
    lefts: list[Handle] = []
    rights: list[Handle] = []
    claimed: set[int] = set()  # ids of the layers a right merge changes
    for node in plan.bn_nodes():
        bn, name = node.module, node.target
        if getattr(bn, "_onebit_merged", False):
            continue
        problem = _bn_problem(bn, name, plan.calls(bn))
        if problem:
            plan.fail(f"BatchNorm '{name}' cannot be merged: it {problem}.")
            continue
        producer, left_reason = _left_candidate(plan, node)
        if producer is not None:
            lefts.append(_LeftMerge(bn, producer.module, name, producer.target))
            continue
        search = _RightMergeSearch(plan, node)
        right_reason = search.problem
        if not right_reason and search.consumers:
            targets = {id(c.node.module) for c in search.consumers}
            if targets & claimed:
                right_reason = "its output layer is already the target of another BatchNorm"
            else:
                claimed |= targets
                rights.append(_RightMerge(model, bn, name, search.consumers, search.relus))
                continue
        plan.fail(
            f"BatchNorm '{name}' cannot be merged exactly: {left_reason}; and {right_reason or 'it feeds no layer'}."
        )
    for name in plan.unreached():
        if not getattr(model.get_submodule(name), "_onebit_merged", False):
            note = f" ({'; '.join(plan.graphs.notes)})" if plan.graphs.notes else ""
            plan.fail(f"BatchNorm '{name}' cannot be merged: its neighbours are unknown{note}.")
    # left merges first: a right merge's bias map is computed from the layer as the left merge left it
    return lefts + rights


# ---------------------------------------------------------------------------
# public API


class MergeBatchNorm(Canonizer):
    """Merge every eval-mode BatchNorm into its neighbouring convolution or linear layer
    (see :func:`merge_batchnorm`)."""

    def __init__(self, skip_unmergeable: bool = False) -> None:
        self.skip_unmergeable = skip_unmergeable

    def apply(self, model: nn.Module) -> CompositeHandle:
        return register_all(_plan_merges(model, self.skip_unmergeable))

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
