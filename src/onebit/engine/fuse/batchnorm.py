"""BatchNorm folding: a ``batch_norm`` into the scale and bias of the binary convolution before it.

``bn(acc * scale + bias) = acc * scale' + bias'`` with ``scale' = scale * g``,
``bias' = (bias - mean) * g + beta``, ``g = gamma / sqrt(var + eps)``, computed in float64
(:func:`onebit.batchnorm.batchnorm_affine`, a missing bias as zeros) and rounded once to float32.
One op less, equal to the model up to float rounding, not bit for bit: it runs only when asked
(``pack(..., fold_batchnorm=True)``), on a ``binary_conv2d`` with a per-channel scale (magnitude-aware
weights) whose only reader is the ``batch_norm``.
"""

from __future__ import annotations

import torch
from torch import nn

from onebit.batchnorm import batchnorm_affine
from onebit.engine.fuse.rewrite import GraphView, Rewrite, node_tensors, tensor_key

__all__ = ["batchnorm_module", "fold_batchnorm", "folded_scale_bias"]


def batchnorm_module(node: dict, tensors: dict[str, torch.Tensor], features: bool = False) -> nn.Module:
    """A ``batch_norm`` node as an eval-mode ``nn.BatchNorm2d`` (``nn.BatchNorm1d`` with ``features``:
    on ``[N, C]``) holding the node's own tensors."""
    roles = node_tensors(node, tensors)
    attrs = node["attrs"]
    bn = (nn.BatchNorm1d if features else nn.BatchNorm2d)(attrs["num_features"], eps=attrs["eps"], affine=False)
    bn.running_mean, bn.running_var = roles["running_mean"], roles["running_var"]
    for role in ("weight", "bias"):
        if roles.get(role) is not None:
            setattr(bn, role, nn.Parameter(roles[role], requires_grad=False))
    return bn.eval()


def folded_scale_bias(
    bn: nn.Module, scale: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale', bias')`` in float32 with ``bn(acc * scale + bias) = acc * scale' + bias'`` (module docstring)."""
    if bias is None:
        bias = torch.zeros(bn.num_features, dtype=torch.float64)
    new_scale, new_bias = batchnorm_affine(bn, scale, bias)
    return new_scale.float().contiguous(), new_bias.float().contiguous()


def fold_batchnorm(graph: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """``binary_conv2d`` (with a scale) -> ``batch_norm`` as one ``binary_conv2d`` with the folded
    scale and bias; readers of the BatchNorm read the conv. A new graph and tensors."""
    view = GraphView(graph)
    rewrite = Rewrite()
    for conv in graph["nodes"]:
        if conv["op"] != "binary_conv2d" or "scale" not in conv["tensors"]:
            continue
        bn = view.only_reader(conv)
        if bn is None or bn["op"] != "batch_norm" or bn["attrs"]["num_features"] != conv["attrs"]["out_channels"]:
            continue
        roles = node_tensors(conv, tensors)
        scale, bias = folded_scale_bias(batchnorm_module(bn, tensors), roles["scale"], roles.get("bias"))
        name = conv["name"]
        keys = {
            "weight": conv["tensors"]["weight"],
            "scale": tensor_key(name, "scale"),
            "bias": tensor_key(name, "bias"),
        }
        rewrite.replace[name] = [{**conv, "tensors": keys}]
        rewrite.tensors.update({keys["scale"]: scale, keys["bias"]: bias})
        rewrite.remove.add(bn["name"])
        rewrite.rename[bn["name"]] = name
    return rewrite.apply(graph, tensors)
