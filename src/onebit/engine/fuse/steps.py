"""``fuse``: a graph and its tensors -> the list of :class:`~onebit.engine.steps.Step` a packed model runs.

Where graph nodes become calls. It reads the graph and changes nothing in it; a step fusion makes
one native call of several nodes, with the same results:

- ``pack`` read only by one binary convolution: the convolution takes the float input and packs
  it itself (one pass over the threads; the bits stay in the caches); likewise ``pack_features`` read
  only by one binary linear layer;
- ``batch_norm(binary_conv2d(...))`` where the BatchNorm is the convolution's only reader: the
  convolution applies it as it writes its output (:class:`~onebit.engine.steps.Epilogue`),
  rounded as this process's torch rounds it (see :mod:`onebit.engine.torch_rounding`; checked
  per layer, else the BatchNorm stays torch's op);
- ``batch_norm(int8_conv2d(...))`` likewise (:mod:`onebit.engine.graph.int8`), and a ``max_pool2d``
  that alone reads the int8 conv (or its BatchNorm): the pool takes the integer sums, before the
  float epilogue, where that gives torch's pool bit for bit (``graph.int8.integer_max_pool``);
- ``max_pool2d(batch_norm(x))`` where the pool alone reads the BatchNorm (a float conv's, as in a
  ResNet stem): the native pool applies the BatchNorm to the pooled values, pooling ``x`` by each
  channel's direction (``graph.floats.batchnorm_before_pool``: finite nonzero scales, finite shifts,
  no zeros of two signs);
- ``add(binary_conv2d(...), shortcut)`` (or ``add(batch_norm(binary_conv2d(...)), shortcut)``)
  where the add is the only reader: the convolution adds the shortcut as it writes its output,
  as a Bi-Real block does. The fused step runs where the add was, so the shortcut is ready.

Layouts: the native kernels write channels_last, and a step passes its output on as it is. Only an
op whose rounding depends on the memory format (``OpSpec.layout_free`` false: float convs, adaptive
average pools, ...) gets its inputs in the model's own layout (that of the model's input), where it
rounds as the model's op does; every other op's values are the same in any layout. With an NCHW
model, a layout-free op that torch runs faster on channels_last maps (``OpSpec.prefers_channels_last``)
gets its maps in channels_last (``Step.channels_last``), as does one that joins maps that come in both
layouts (``Step.joins_maps``; the packed model checks as it runs; a binary conv reads a float input and
a shortcut in either layout itself): an NCHW value (the output of a float conv) meets channels_last
ones once, and the run goes on in channels_last. A binary conv whose readers all take the model's layout,
or whose output the model returns, writes NCHW directly in an NCHW model (``Step.writes_nchw``); a float
conv that torch rounds the same in channels_last for the input's shape runs there (``Step.layout_probe``).

Thresholds (BatchNorm + sign as integer comparisons) and BatchNorm folding are graph passes before
this stage (:mod:`.thresholds`, :mod:`.batchnorm`): their ops are what the file stores. Each step
also gets its op's runtime state: a weight cache for ops whose kernels keep prepared weights, and
the bound native layer of a binary conv or linear layer (float or thresholded output) or a pool on
bits (operands checked once, a call's numbers once per input shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from onebit.engine import ops, torch_rounding
from onebit.engine.graph import CONV_ATTRS, OPS, attrs
from onebit.engine.graph.binary import LINEAR_OPS
from onebit.engine.graph.floats import batchnorm_before_pool
from onebit.engine.graph.int8 import integer_max_pool
from onebit.engine.layout_probe import LayoutProbe
from onebit.engine.steps import Epilogue, IntegerPool, Step

__all__ = ["fuse", "Fusions"]


@dataclass
class Fusions:
    """The nodes a fusion absorbs, by the index of the convolution that absorbs them."""

    packs: dict[int, dict] = field(default_factory=dict)  #: conv -> the pack node it absorbs
    batchnorms: dict[int, tuple[dict, Epilogue]] = field(default_factory=dict)  #: conv -> (batch_norm, epilogue)
    adds: dict[int, tuple[dict, str]] = field(default_factory=dict)  #: conv -> (the add node, the shortcut)
    pools: dict[int, tuple[dict, IntegerPool]] = field(default_factory=dict)  #: int8 conv -> (max_pool2d, pool)
    #: max pool -> (the batch_norm before it, as the pool's epilogue)
    pooled_batchnorms: dict[int, tuple[dict, Epilogue]] = field(default_factory=dict)

    def absorbed(self, index: dict[str, int]) -> set[int]:
        """The nodes that are no step of their own (a conv with a BatchNorm, an add or a pool runs at the last
        one's place)."""
        out = {index[n["name"]] for n in self.packs.values()} | set(self.adds) | set(self.batchnorms) | set(self.pools)
        out |= {index[pool["name"]] for pool, _ in self.pools.values()}
        out |= {index[bn["name"]] for bn, _ in self.pooled_batchnorms.values()}
        return out | {index[bn["name"]] for bn, _ in self.batchnorms.values()}

    def run_at(self, index: dict[str, int]) -> dict[int, int]:
        """position -> the conv that runs there: at its add or its pool, else at its BatchNorm."""
        at = {index[add["name"]]: i for i, (add, _) in self.adds.items()}
        at.update({index[pool["name"]]: i for i, (pool, _) in self.pools.items()})
        last = set(self.adds) | set(self.pools)
        at.update({index[bn["name"]]: i for i, (bn, _) in self.batchnorms.items() if i not in last})
        return at


def fuse(graph: dict, tensors: dict[str, torch.Tensor], *, native: bool | None = None) -> list[Step]:
    """The steps that run ``graph`` on ``tensors`` (graph key -> tensor), fused as the module says.

    ``native``: fuse for the native kernels (BatchNorm epilogues and bound layers need them);
    by default when they are available."""
    native = ops.native_available() if native is None else native
    nodes = graph["nodes"]
    outputs = set(graph["outputs"])
    index = {node["name"]: i for i, node in enumerate(nodes)}
    fusions = find_fusions(nodes, outputs, tensors, native)
    absorbed, run_at = fusions.absorbed(index), fusions.run_at(index)
    steps = []
    for position in range(len(nodes)):
        if position in absorbed and position not in run_at:
            continue
        steps.append(_step(nodes, run_at.get(position, position), fusions, tensors, native))
    _mark_frees(steps, outputs)
    _mark_nchw_writers(steps, outputs)
    return steps


def find_fusions(nodes: list[dict], outputs: set[str], tensors: dict, native: bool) -> Fusions:
    """Which nodes each binary convolution absorbs (see the module's docstring)."""
    index = {node["name"]: i for i, node in enumerate(nodes)}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for ref in node["inputs"]:
            readers.setdefault(ref, []).append(i)

    def only_reader(i: int) -> dict | None:
        users = readers.get(nodes[i]["name"], [])
        return nodes[users[0]] if len(users) == 1 and nodes[i]["name"] not in outputs else None

    fusions = Fusions()
    for i, node in enumerate(nodes):
        user = only_reader(i)
        if user is None:
            continue
        if node["op"] == "pack" and OPS[user["op"]].packs_input and user["inputs"] == [node["name"]]:
            fusions.packs[index[user["name"]]] = node
        elif node["op"] == "pack_features" and user["op"] in LINEAR_OPS and user["inputs"] == [node["name"]]:
            fusions.packs[index[user["name"]]] = node  # the layer packs its float input itself
        elif node["op"] == "int8_conv2d" and native:
            epilogue = _batchnorm_epilogue(user, tensors) if user["op"] == "batch_norm" else None
            if epilogue is not None:
                fusions.batchnorms[i] = (user, epilogue)
                user = only_reader(index[user["name"]])
            if user is not None and user["op"] == "max_pool2d":
                roles = {role: tensors[key] for role, key in node.get("tensors", {}).items()}
                pool = integer_max_pool(roles, attrs(node), epilogue, attrs(user))
                if pool is not None:
                    fusions.pools[i] = (user, pool)
        elif node["op"] == "batch_norm" and user["op"] == "max_pool2d" and native:
            if not any(bn is node for bn, _ in fusions.batchnorms.values()):  # not a conv's epilogue already
                epilogue = _batchnorm_epilogue(node, tensors)
                if epilogue is not None and batchnorm_before_pool(
                    epilogue.bn_scale, epilogue.bn_shift, epilogue.bn_fma
                ):
                    fusions.pooled_batchnorms[index[user["name"]]] = (node, epilogue)
        elif node["op"] == "binary_conv2d":
            last = node
            if user["op"] == "batch_norm" and native:
                epilogue = _batchnorm_epilogue(user, tensors)
                if epilogue is not None:
                    fusions.batchnorms[i] = (user, epilogue)
                    last, user = user, only_reader(index[user["name"]])
            if user is not None and user["op"] == "add" and len(user["inputs"]) == 2:
                a, b = user["inputs"]
                taken = any(add is user for add, _ in fusions.adds.values())  # add(conv, conv): the first one
                if a != b and user["attrs"].get("alpha", 1.0) == 1.0 and not taken:
                    fusions.adds[i] = (user, b if a == last["name"] else a)
    return fusions


def _step(nodes: list[dict], i: int, fusions: Fusions, tensors: dict, native: bool) -> Step:
    """The step of node ``i`` with what it absorbs, its runtime state and its bound runner."""
    node = nodes[i]
    spec = OPS[node["op"]]
    roles = {role: tensors[key] for role, key in node.get("tensors", {}).items()}
    step = Step(node["op"], node["name"], tuple(node["inputs"]), roles, attrs(node), module=node.get("module", ""))
    step.label = node["op"]
    if i in fusions.packs:
        step.inputs, step.label = tuple(fusions.packs[i]["inputs"]), "pack+" + step.label
    if i in fusions.batchnorms:
        bn, step.epilogue = fusions.batchnorms[i]
        step.output, step.label = bn["name"], step.label + "+batch_norm"
    if i in fusions.pooled_batchnorms:
        bn, step.epilogue = fusions.pooled_batchnorms[i]
        step.inputs, step.label = tuple(bn["inputs"]), "batch_norm+" + step.label
    if i in fusions.pools:
        pool_node, step.pool = fusions.pools[i]
        step.output, step.label = pool_node["name"], step.label + "+max_pool2d"
    if i in fusions.adds:
        add, shortcut = fusions.adds[i]
        step.inputs, step.output, step.label = step.inputs + (shortcut,), add["name"], step.label + "+add"
    if spec.weight_cache:  # the weights, prepared for the kernel, kept between calls
        step.cache = ops.weight_cache()
    if native:  # a native layer with the step's operands checked once, not per call
        step.layer = _bound_layer(step)
    step.relayout = _relayout(node)
    step.model_layout = not spec.layout_free
    step.channels_last = spec.layout_free and spec.prefers_channels_last
    step.joins_maps = spec.layout_free and not spec.packs_input and len(step.inputs) > 1
    step.run = spec.bind(step) if spec.bind is not None else partial(spec.fn, step.tensors, step.attrs)
    if spec.probes_layout:
        step.layout_probe = LayoutProbe(step.run)
    return step


def _bound_layer(step: Step):
    """The native layer a binary conv, linear layer or pool on bits runs as, its operands bound; None for
    other ops."""
    t, a = step.tensors, step.attrs
    if step.op == "binary_conv2d":
        bn = step.epilogue or Epilogue()
        return ops.conv_layer(
            t["weight"],
            scale=t.get("scale"),
            bias=t.get("bias"),
            bn_scale=bn.bn_scale,
            bn_shift=bn.bn_shift,
            bn_fma=bn.bn_fma,
            cache=step.cache,
            **{k: a[k] for k in CONV_ATTRS},
        )
    if step.op == "binary_conv2d_threshold":
        threshold = {k: a[k] for k in ("out_padding", "out_pad_value", "out_groups")}
        return ops.threshold_conv_layer(
            t["weight"],
            thresholds=t["thresholds"],
            direction=t["direction"],
            cache=step.cache,
            **threshold,
            **{k: a[k] for k in CONV_ATTRS},
        )
    if step.op in ("binary_linear", "binary_linear_threshold"):  # a 1x1 conv of a 1x1 map
        out, words = t["weight"].shape
        conv = dict(in_channels=a["in_features"], out_channels=out, kernel_size=1)
        w4 = t["weight"].view(out, 1, 1, words)
        if step.op == "binary_linear":
            return ops.conv_layer(w4, scale=t.get("scale"), bias=t.get("bias"), cache=step.cache, **conv)
        return ops.threshold_conv_layer(
            w4, thresholds=t["thresholds"], direction=t["direction"], cache=step.cache, **conv
        )
    if step.op == "max_pool_bits":
        pool = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "out_padding", "channels")
        return ops.max_pool_bits_layer(t["or_mask"], t["pad_words"], **{k: a[k] for k in pool})
    return None


def _batchnorm_epilogue(bn: dict, tensors: dict) -> Epilogue | None:
    """A ``batch_norm`` node as a convolution's epilogue, or None when the kernels cannot round it as torch does."""
    t = {role: tensors[key] for role, key in bn.get("tensors", {}).items()}
    fused = torch_rounding.batchnorm_epilogue(
        t["running_mean"], t["running_var"], t.get("weight"), t.get("bias"), attrs(bn)["eps"]
    )
    return None if fused is None else Epilogue(*fused)


def _relayout(node: dict) -> str | None:
    """How a step's float output is laid out again: a 1-d conv runs as a 1 x k 2-d conv, and torch's
    conv1d returns a contiguous tensor, while a 2-d conv of an ambiguous ``[N, C, 1, L]`` shape may
    choose channels_last."""
    return "contiguous" if node.get("conv1d") else None


def _mark_nchw_writers(steps: list[Step], outputs: set[str]) -> None:
    """``writes_nchw`` for the float binary convs (with a bound native layer) whose output every reader takes in
    the model's own layout (float convs, adaptive pools) or that the model returns: in an NCHW model they
    write NCHW directly, instead of channels_last copied once more."""
    readers: dict[str, list[Step]] = {}
    for step in steps:
        for ref in step.inputs:
            readers.setdefault(ref, []).append(step)
    for step in steps:
        users = readers.get(step.output, [])
        if step.op == "binary_conv2d" and step.layer is not None and (users or step.output in outputs):
            step.writes_nchw = all(user.model_layout for user in users)


def _mark_frees(steps: list[Step], outputs: set[str]) -> None:
    """Each step's ``free``: the values no later step reads (dropped after it)."""
    last_use: dict[str, int] = {}
    for i, step in enumerate(steps):
        for ref in step.inputs:
            last_use[ref] = i
    for i, step in enumerate(steps):
        step.free = tuple(ref for ref in dict.fromkeys(step.inputs) if last_use.get(ref) == i and ref not in outputs)
