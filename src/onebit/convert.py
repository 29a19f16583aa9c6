"""Float -> binary conversion of whole models."""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable

from torch import nn

from onebit import quant
from onebit.nn.float_layers import check_float_layers, quantizers
from onebit.nn.layers import QConv1d, QConv2d, QConv3d, QLinear, QuantizedLayer

__all__ = ["binarize", "name_layers"]

_COUNTERPART: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QConv1d,
    nn.Conv2d: QConv2d,
    nn.Conv3d: QConv3d,
    nn.Linear: QLinear,
}


def binarize(
    model: nn.Module,
    *,
    input_quantizer: quant.QuantizerLike = "ste_sign",
    weight_quantizer: quant.QuantizerLike = "ste_sign",
    keep_first: bool = True,
    keep_last: bool = True,
    exclude: Iterable[str] = (),
    weight_bits: int | None = None,
    float_layers: str = "float",
) -> nn.Module:
    """Return a copy of ``model`` whose convolutions and linear layers are binary.

    Every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` becomes ``QConv1d/2d/3d`` / ``QLinear`` with
    the same hyperparameters (stride, padding, dilation, groups, bias, padding mode),
    dtype, device and copied weights, computing
    ``conv(pad(q_in(x), 0), q_w(W)) + bias``. The original model is not modified.

    Args:
        input_quantizer, weight_quantizer: anything :func:`onebit.quant.get` accepts;
            ``input_quantizer=None`` keeps inputs float (binary weights only).
        keep_first, keep_last: leave the first / last such layer (in ``named_modules``
            order) float, as binary networks usually do.
        exclude: qualified module names (or glob patterns such as ``"head.*"``) to keep float;
            one string is one pattern. A module excluded under any of its names stays float.
        weight_bits: k-bit weights instead: ``k > 1`` replaces ``weight_quantizer`` by
            :class:`onebit.quant.DoReFaWeight` (``bits=k``, levels symmetric around 0, e.g.
            {-1, -1/3, +1/3, +1} at 2 bits); ``1`` or None keeps ``weight_quantizer``.
        float_layers: what the layers left out (``keep_first``, ``keep_last``, ``exclude``) become:
            ``"float"`` (unchanged) or ``"int8"`` (``QConv``/``QLinear`` with ``int8`` inputs and
            ``int8_weight`` weights, :mod:`onebit.nn.float_layers`); a layer whose integer sum could
            pass 2^24 (over 1040 taps) is refused with its name.

    A module reachable under several names (``self.b = self.a``) is converted once, and the
    result holds that one binary module under every name, so the tie is kept.
    """
    if weight_bits is not None:
        if not isinstance(weight_bits, int) or weight_bits < 1:
            raise ValueError(f"binarize: weight_bits must be a positive integer, got {weight_bits!r}")
        if weight_bits > 1:
            weight_quantizer = quant.DoReFaWeight(bits=weight_bits)
    check_float_layers(float_layers, "binarize: float_layers")
    exclude = [exclude] if isinstance(exclude, str) else list(exclude)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in _COUNTERPART or isinstance(module, QuantizedLayer)
    ]
    # every name of every module: a module reachable under several names (tied) has them all
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    all_names = [name for names in aliases.values() for name in names]
    for pattern in exclude:
        if not isinstance(pattern, str):
            raise TypeError(f"binarize: exclude takes module names or glob patterns, got {pattern!r}")
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_names):
            raise ValueError(f"binarize: exclude names {pattern!r}, which matches no module of the model")
    if not candidates:
        return copy.deepcopy(model)

    keep = set()
    if keep_first:
        keep.add(candidates[0][0])
    if keep_last:
        keep.add(candidates[-1][0])
    keep |= {
        name
        for name, module in candidates
        if any(fnmatch.fnmatchcase(alias, p) for alias in aliases[id(module)] for p in exclude)
    }

    result = copy.deepcopy(model)  # deepcopy keeps ties: a module shared by two parents stays shared
    replacements: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(module of result) -> (it, its binary twin)
    for name, module in candidates:
        if isinstance(module, QuantizedLayer) or (name in keep and float_layers == "float"):
            continue
        original = result.get_submodule(name)
        if name in keep:
            replacement = _kept_counterpart(original, name or type(model).__name__, float_layers)
        else:
            replacement = _binary_counterpart(original, input_quantizer, weight_quantizer)
        replacement._onebit_name = name or type(model).__name__
        if name == "":
            return replacement
        replacements[id(original)] = (original, replacement)
    for parent in list(result.modules()):  # every place a converted module sits, under each of its names
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)][1])
    return result


def name_layers(model: nn.Module) -> nn.Module:
    """Record each onebit layer's qualified name, so its input errors name it."""
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            module._onebit_name = name
    return model


def _kept_counterpart(layer: nn.Module, name: str, float_layers: str) -> nn.Module:
    """A kept layer as ``float_layers`` asks (its quantized counterpart with those quantizers)."""
    try:
        return _binary_counterpart(layer, **quantizers(float_layers))
    except ValueError as error:
        raise ValueError(
            f"binarize: float_layers={float_layers!r} cannot make layer {name!r} {float_layers}: {error}"
        ) from None


def _binary_counterpart(layer: nn.Module, input_quantizer, weight_quantizer) -> nn.Module:
    cls = _COUNTERPART[type(layer)]
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    quantizers = {
        "input_quantizer": copy.deepcopy(quant.get(input_quantizer)),
        "weight_quantizer": copy.deepcopy(quant.get(weight_quantizer)),
    }
    if cls is QLinear:
        new = QLinear(layer.in_features, layer.out_features, layer.bias is not None, **factory, **quantizers)
    else:
        new = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            layer.padding_mode,
            **factory,
            **quantizers,
        )
    missing, unexpected = new.load_state_dict(layer.state_dict(), strict=False)  # the quantizers keep their own state
    if unexpected or any(not key.startswith(("input_quantizer.", "weight_quantizer.")) for key in missing):
        raise RuntimeError(
            f"binarize: {type(layer).__name__} and {cls.__name__} differ in state: {missing + unexpected}"
        )
    new.train(layer.training)
    new.weight.requires_grad_(layer.weight.requires_grad)
    if layer.bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new
