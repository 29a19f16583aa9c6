"""Thresholds: a BatchNorm + sign between two binary layers as per-channel integer comparisons.

A binary layer's accumulator ``acc`` is an integer in ``[-K, K]``. When its value goes, alone,
through a ``batch_norm`` (or a canonized model's ``sign_threshold``) to one ``pack`` read only by
binary layers, those layers only see ``sign(bn(acc * scale + bias))``, which is
``acc < threshold`` (direction +1) or ``acc > threshold`` (direction -1) per channel
(:func:`onebit.thresholds.batchnorm_sign_thresholds`, evaluated on every integer of the range, so
bit for bit the model's decision). The layer then writes its readers' packed input itself::

    binary_conv2d -> batch_norm | sign_threshold -> pack -> binary convs
        => binary_conv2d_threshold (its readers' padding, pad value and groups) -> binary convs
    binary_conv2d -> max_pool2d -> batch_norm | sign_threshold -> pack -> binary convs
        => binary_conv2d_threshold (unpadded) -> max_pool_bits -> binary convs
    binary_linear -> batch_norm | sign_threshold -> pack_features -> binary linears
        => binary_linear_threshold -> binary linears

The max pool of thresholded bits is exact: ``max(acc) < thr`` iff every ``acc < thr``, and
``max(acc) > thr`` iff any ``acc > thr``, so it is an AND of the bits (direction +1) or an OR (-1).
A ``sign_threshold`` holds thresholds on the exact accumulator: it fuses after a layer without
scale or bias, its thresholds clamped to ``[-K - 1, K + 1]`` (the same decisions in int32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from onebit import quant
from onebit.engine import ops
from onebit.engine.fuse.batchnorm import batchnorm_module
from onebit.engine.fuse.rewrite import GraphView, Rewrite, node_tensors, tensor_key
from onebit.sign_chain import find_sign_chain
from onebit.thresholds import accumulator_bound, batchnorm_sign_thresholds

__all__ = ["ThresholdChain", "find_threshold_chain", "fuse_thresholds"]


@dataclass(frozen=True)
class _Family:
    """The ops of one kind of binary layer: the layer, its thresholded form, the pack its readers read, the readers."""

    layer: str
    fused: str
    pack: str
    readers: tuple[str, ...]


_CONV = _Family("binary_conv2d", "binary_conv2d_threshold", "pack", ("binary_conv2d", "binary_conv2d_threshold"))
_LINEAR = _Family(
    "binary_linear", "binary_linear_threshold", "pack_features", ("binary_linear", "binary_linear_threshold")
)
_FAMILIES = {family.layer: family for family in (_CONV, _LINEAR)}
#: what a pack applies to its input before it packs it
_PACK_SIGN = quant.Sign()


@dataclass(frozen=True)
class ThresholdChain:
    """The nodes one thresholded layer replaces: the layer, its max pool (convolutions), the
    ``batch_norm`` / ``sign_threshold`` and the pack its readers read."""

    layer: dict
    pool: dict | None
    decision: dict
    pack: dict

    @property
    def linear(self) -> bool:
        return self.layer["op"] == _LINEAR.layer


def fuse_thresholds(graph: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Every chain of the module's docstring as the thresholded layer; a new graph and tensors."""
    view = GraphView(graph)
    rewrite = Rewrite()
    for node in graph["nodes"]:
        chain = find_threshold_chain(view, node)
        if chain is not None:
            _fuse(view, chain, tensors, rewrite)
    return rewrite.apply(graph, tensors)


def find_threshold_chain(view: GraphView, layer: dict) -> ThresholdChain | None:
    """The chain from binary ``layer`` to its readers' pack (:func:`onebit.sign_chain.find_sign_chain`
    on the engine graph), when the layer and its max pool have one reader each, the BatchNorm's only
    reader is one pack, and that pack's readers are all binary layers of the layer's family; else None."""
    family = _FAMILIES.get(layer["op"])
    first = None if family is None else view.only_reader(layer)
    if first is None:
        return None
    pool = first if first["op"] == "max_pool2d" and family is _CONV else None
    decision = first if pool is None else view.only_reader(pool)
    if decision is None or not _decides_signs(decision, layer):
        return None
    chain = find_sign_chain(_SignChainView(view), decision)
    if chain.problem is not None or chain.source is not layer or len(chain.readers) != 1:
        return None
    pack = chain.readers[0]
    readers = view.readers_of(pack)
    if pack["op"] != family.pack or not readers or pack["name"] in view.outputs:
        return None
    if not all(r["op"] in family.readers and r["inputs"] == [pack["name"]] for r in readers):
        return None
    return ThresholdChain(layer, pool, decision, pack)


class _SignChainView:
    """The engine graph as a :class:`~onebit.sign_chain.ChainView`: a ``pack`` / ``pack_features``
    takes the sign of its input first (its bit is set where the value is negative, as a sign
    quantizer gives -1); between a layer and its BatchNorm one ``max_pool2d`` read once; nothing
    after the BatchNorm. A graph output is a reader that takes no sign."""

    _PACKS = ("pack", "pack_features")
    _OUTPUT = {"name": "", "op": "output", "inputs": []}

    def __init__(self, view: GraphView) -> None:
        self.view = view

    def inputs(self, node: dict) -> list[dict]:
        return [self.view.nodes[ref] for ref in node["inputs"] if ref in self.view.nodes]

    def users(self, node: dict) -> list[dict]:
        return self.view.readers_of(node) + ([self._OUTPUT] if node["name"] in self.view.outputs else [])

    def module(self, node: dict) -> nn.Module | None:
        return _PACK_SIGN if node["op"] in self._PACKS else None

    def reads_alone(self, node: dict, value: dict) -> bool:
        return node["inputs"] == [value["name"]]

    def crosses_before(self, node: dict) -> bool:
        return node["op"] == "max_pool2d" and self.view.only_reader(node) is not None

    def crosses_after(self, node: dict) -> bool:
        return False

    def describe(self, node: dict) -> str:
        return f"{node['op']} '{node['name']}'"


def _decides_signs(node: dict, layer: dict) -> bool:
    """``node`` becomes integer thresholds after ``layer``: a ``batch_norm`` on its channels, or a
    ``sign_threshold`` on its channels after a layer without scale and bias (the exact accumulator)."""
    a = layer["attrs"]
    channels = a["out_features"] if layer["op"] == _LINEAR.layer else a["out_channels"]
    if node["op"] == "batch_norm":
        return node["attrs"]["num_features"] == channels
    if node["op"] == "sign_threshold":
        return node["attrs"]["channels"] == channels and not {"scale", "bias"} & set(layer["tensors"])
    return False


def _accumulator_bound(layer: dict) -> int:
    a = layer["attrs"]
    if layer["op"] == _LINEAR.layer:
        return int(a["in_features"])
    return accumulator_bound(a["in_channels"], a["groups"], a["kernel_size"])


def thresholds_of(chain: ThresholdChain, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 thresholds, int8 directions) of the chain's BatchNorm (derived, after the layer's scale
    and bias) or ``sign_threshold`` (given, clamped to the accumulator's reachable range)."""
    bound = _accumulator_bound(chain.layer)
    given = node_tensors(chain.decision, tensors)
    if chain.decision["op"] == "sign_threshold":
        thr, direction = given["thresholds"].to(torch.int64).clamp(-bound - 1, bound + 1), given["direction"]
    else:
        layer = node_tensors(chain.layer, tensors)
        bn = batchnorm_module(chain.decision, tensors, features=chain.linear)
        th = batchnorm_sign_thresholds(bn, bound, scale=layer.get("scale"), bias=layer.get("bias"))
        thr, direction = th.threshold, th.direction
    return thr.to(torch.int32).contiguous(), direction.to(torch.int8).contiguous()


def _node(name: str, op: str, inputs: list[str], attrs: dict, tensors: dict, module: str | None) -> dict:
    node = {"name": name, "op": op, "inputs": inputs, "attrs": attrs, "tensors": tensors}
    if module:
        node["module"] = module
    return node


def _written_layout(chain: ThresholdChain) -> dict:
    """The packed layout a thresholded conv writes: its readers' padding, pad value and groups."""
    if chain.linear:
        return {}
    pack = chain.pack["attrs"]
    return {"out_padding": list(pack["padding"]), "out_pad_value": pack["pad_value"], "out_groups": pack["groups"]}


def _fuse(view: GraphView, chain: ThresholdChain, tensors: dict, rewrite: Rewrite) -> None:
    """Record the chain's thresholded layer (and pooled bits) in the layer's place; the pack's
    readers read it instead."""
    layer, name = chain.layer, chain.layer["name"]
    thr, direction = thresholds_of(chain, tensors)
    keys = {"weight": layer["tensors"]["weight"]}
    keys.update(thresholds=tensor_key(name, "thresholds"), direction=tensor_key(name, "direction"))
    rewrite.tensors.update({keys["thresholds"]: thr, keys["direction"]: direction})
    out = _written_layout(chain)
    written = out if chain.pool is None else {**out, "out_padding": [0, 0], "out_pad_value": 0.0}
    family = _LINEAR if chain.linear else _CONV
    fused = [_node(name, family.fused, layer["inputs"], {**layer["attrs"], **written}, keys, layer.get("module"))]
    if chain.pool is not None:
        fused.append(_pooled_bits(view, chain.pool, name, direction, out, rewrite))
        rewrite.remove.add(chain.pool["name"])
    rewrite.replace[name] = fused
    rewrite.remove.update((chain.decision["name"], chain.pack["name"]))
    rewrite.rename[chain.pack["name"]] = fused[-1]["name"]


def _pooled_bits(view: GraphView, pool: dict, bits: str, direction: torch.Tensor, out: dict, rewrite: Rewrite) -> dict:
    """The ``max_pool_bits`` node of ``pool`` on the thresholded bits ``bits``: an AND where the
    direction is +1, an OR where it is -1 (``or_mask``); padding reads as ``out_pad_value``'s sign."""
    c, g = int(direction.numel()), out["out_groups"]
    or_signs = torch.where(direction.view(1, c, 1, 1) < 0, -1.0, 1.0).to(torch.float32)
    or_mask = ops.pack_activations(or_signs.contiguous(), (0, 0), 0.0, g).view(g, -1).contiguous()
    pad_signs = torch.full((1, c, 1, 1), -1.0 if out["out_pad_value"] < 0 else 1.0)
    pad_words = ops.pack_activations(pad_signs, (0, 0), 0.0, g).view(g, -1).contiguous()
    name = view.fresh_name(f"{pool['name']}_bits")
    keys = {"or_mask": tensor_key(name, "or_mask"), "pad_words": tensor_key(name, "pad_words")}
    rewrite.tensors.update({keys["or_mask"]: or_mask, keys["pad_words"]: pad_words})
    p = pool["attrs"]
    attrs = {"channels": c, **{k: p[k] for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}, **out}
    return _node(name, "max_pool_bits", [bits], attrs, keys, pool.get("module"))
