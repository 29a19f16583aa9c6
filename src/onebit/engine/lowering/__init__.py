"""Lowering: an eval-mode onebit/torch model -> the packed engine's graph.

The model is traced with ``torch.fx`` (onebit's layers and quantizers are leaves).
Each traced node becomes graph ops (see :mod:`onebit.engine.graph`):

- a *binary* ``QConv2d`` / ``QLinear`` (1-bit sign input quantizer -- ``ste_sign``,
  ``approx_sign``, ``swish_sign`` -- and sign or magnitude-aware sign weights)
  becomes ``pack`` + ``binary_conv2d`` / ``pack_features`` + ``binary_linear``, on
  1-bit weights with an optional per-channel float scale (the magnitude-aware alpha);
  a ``QConv1d`` (and a float ``Conv1d``) is a ``1 x k`` 2-d conv between two reshapes;
- the chain *binary conv -> [MaxPool2d] -> BatchNorm -> only binary convs with one
  input layout* keeps its output packed: the BatchNorm and the next layer's sign become
  per-channel integer thresholds (:mod:`onebit.thresholds`) and the conv writes the
  next conv's packed, padded input directly (``binary_conv2d_threshold``; with a max
  pool: integer conv, max pool of the accumulators, ``threshold_pack``);
- everything else runs as the model's own float ops on copies of its parameters;
  a binary conv the packed kernels cannot run (e.g. ``padding_mode='reflect'``) runs
  as sign + float conv of its quantized weight, exactly as the model does.

Unsupported modules or functions raise :class:`UnsupportedModelError` naming the node.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from onebit import quant
from onebit.engine import ops
from onebit.math import sign as onebit_sign
from onebit.nn import functional as QF
from onebit.nn.bitlinear import BitLinear
from onebit.nn.layers import QActivation, QConv1d, QConv2d, QLinear, QuantizedLayer
from onebit.engine import bitplanes
from onebit.quant_lowbit import Absmax8, DoReFaSymmetric, Ternary
from onebit.nn.twist import TwistConv2d
from onebit.thresholds import accumulator_bound, batchnorm_sign_thresholds

__all__ = ["lower", "UnsupportedModelError", "is_sign_quantizer"]


class UnsupportedModelError(ValueError):
    """The model contains a module, function or configuration the packed engine cannot run."""


def is_sign_quantizer(q: Any) -> bool:
    """True for quantizers whose forward is exactly :func:`onebit.math.sign` (:func:`onebit.quant.is_sign`)."""
    return quant.is_sign(q)


def _binary_weight(q: Any) -> bool:
    return quant.has_sign_levels(q)


#: modules that are the identity in eval mode: dropped before lowering, so that patterns see through them
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantizedLayer, QActivation, quant.Quantizer)) or _is_sign_threshold(m):
            return True
        return super().is_leaf_module(m, qualname)


def _pair(v) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    return [int(x) for x in v]


def _conv_attrs(m: nn.Module, kernel_size, stride, padding, dilation, pad_value: float) -> dict:
    """The attributes of a 2-d conv node (``binary_conv2d``; ``conv2d`` / ``qconv2d`` add their padding
    mode) of layer ``m`` (its channels and groups) with this geometry: pairs as lists."""
    return {
        "in_channels": int(m.in_channels),
        "out_channels": int(m.out_channels),
        "kernel_size": _pair(kernel_size),
        "stride": _pair(stride),
        "padding": padding if isinstance(padding, str) else _pair(padding),
        "dilation": _pair(dilation),
        "groups": int(m.groups),
        "pad_value": float(pad_value),
    }


def _t(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach().to(torch.float32).contiguous().clone()


class _Lowering:
    def __init__(self, model: nn.Module, example: torch.Tensor, fold_batchnorm: bool = False):
        self.model = model
        self.fold_batchnorm = fold_batchnorm
        self.fallbacks: list[dict[str, str]] = []  # binary layers that run in float, with the reason
        self.sign_source: dict[str, str] = {}  # a sign op's output value -> the float value it signs
        self.packed_signs: set[fx.Node] = set()  # sign activations that exist only as packed thresholds
        tracer = _Tracer()
        if tracer.is_leaf_module(model, ""):
            model = nn.Sequential(model)  # a single layer: trace it as a call, not through its forward
        self.modules = dict(model.named_modules())
        try:
            fx_graph = tracer.trace(model)
        except Exception as error:
            raise UnsupportedModelError(
                f"the model cannot be traced with torch.fx ({type(error).__name__}: {error}); the packed engine "
                "needs a traceable forward (no data-dependent Python control flow)"
            ) from error
        self.gm = fx.GraphModule(tracer.root, fx_graph)
        self.modules = dict(self.gm.named_modules())
        _drop_identities(self.gm, self.modules)
        from torch.fx.passes.shape_prop import ShapeProp

        try:
            with torch.no_grad():
                ShapeProp(self.gm).propagate(example)
        except Exception as error:
            root = error.__cause__ or error
            raise ValueError(
                f"the model fails on example_input of shape {list(example.shape)}: {type(root).__name__}: {root}"
            ) from error
        self.nodes: list[dict] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.value: dict[fx.Node, str] = {}
        self.packed: dict[tuple, str] = {}  # (float value name | fx node, layout) -> packed value name
        self.skip: set[fx.Node] = set()
        self.names: set[str] = {"input"}
        self.example = example

    # -- helpers ------------------------------------------------------------

    def _name(self, base: str) -> str:
        base = base.replace(".", "_") or "v"
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def emit(self, base: str, op: str, inputs: list[str], attrs: dict | None = None, tensors: dict | None = None,
             module: str | None = None) -> str:
        name = self._name(base)
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
        return UnsupportedModelError(
            f"the packed engine does not support {self._where(node)}{': ' + why if why else ''}"
        )

    def arg(self, node: fx.Node, a: Any) -> str:
        if not isinstance(a, fx.Node):
            raise self.unsupported(node, f"expected a tensor argument, got {a!r}")
        if a not in self.value:
            raise self.unsupported(node, f"its input '{a.name}' is not a float tensor the engine computes")
        return self.value[a]

    def _shape(self, node: fx.Node):
        meta = node.meta.get("tensor_meta")
        return None if meta is None or not hasattr(meta, "shape") else tuple(meta.shape)

    # -- binary layers ------------------------------------------------------

    def binary_input(self, node: fx.Node | None, m: nn.Module) -> bool:
        """The layer's quantized input is +-1: a sign input quantizer, or none (the "NoAct" pattern)
        on a value that is the output of a sign (e.g. a ``QActivation('ste_sign')``)."""
        if is_sign_quantizer(m.input_quantizer):
            return True
        if m.input_quantizer is not None or node is None or not isinstance(node.args[0], fx.Node):
            return False
        return node.args[0] in self.packed_signs or self.value.get(node.args[0]) in self.sign_source

    def binary_conv_kind(self, m: nn.Module, node: fx.Node | None = None, input_binary: bool | None = None) -> str | None:
        """'packed' for a binary QConv2d the kernels run, 'float' for one that runs simulated, None otherwise."""
        if not isinstance(m, QConv2d):
            return None
        if input_binary is None:
            input_binary = self.binary_input(node, m)
        if not input_binary or not _binary_weight(m.weight_quantizer):
            return None
        if m.padding_mode != "zeros":
            return "float"
        if m.padding == "valid":
            return "packed"
        pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
        if pad[0] != pad[1] or pad[2] != pad[3]:
            return "float"
        return "packed"

    def conv_layout(self, m: nn.Module) -> tuple:
        pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
        return ((pad[2], pad[0]), float(m.pad_value), int(m.groups), int(m.in_channels))

    def packed_input(self, node: fx.Node, src: Any, layout: tuple) -> str:
        key = (src, layout)
        if key in self.packed:
            return self.packed[key]
        name = self.arg(node, src)
        name = self.sign_source.get(name, name)  # pack(sign(x)) == pack(x): the same bits
        vkey = (name, layout)
        if vkey not in self.packed:
            padding, pad_value, groups, _ = layout
            self.packed[vkey] = self.emit(
                f"{name}_packed", "pack", [name], {"padding": list(padding), "pad_value": pad_value, "groups": groups}
            )
        return self.packed[vkey]

    def weight_factors(self, m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(levels, scale)`` of the layer's weight quantizer (:meth:`onebit.quant.Quantizer.factor`),
        computed as the layer computes them; a 1-d conv's levels as the ``1 x k`` kernel it runs as."""
        with torch.no_grad():
            levels, scale = QF.weight_factors(m.weight.detach().to(torch.float32), m.weight_quantizer)
        if levels.dim() == 3:
            levels = levels.unsqueeze(2)
        return levels.detach(), None if scale is None else _t(scale.reshape(-1))

    def binary_weights(self, m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(packed sign weights, per-output-channel magnitude scale or None)."""
        levels, scale = self.weight_factors(m)
        return ops.pack_weights(levels.contiguous(), getattr(m, "groups", 1)), scale

    def float_layer_tensors(self, m: nn.Module) -> dict[str, torch.Tensor | None]:
        """The tensors of a quantized layer run in float: its weight levels (as bits when they are
        +-1: a file stores binary weights as bits whatever the layer's input), scale and bias."""
        if _binary_weight(m.weight_quantizer):
            bits, scale = self.binary_weights(m)
            return {"weight_bits": bits, "scale": scale, "bias": _t(m.bias)}
        levels, scale = self.weight_factors(m)  # float weights (no quantizer) are their own levels
        return {"weight": _t(levels), "scale": scale, "bias": _t(m.bias)}

    def note_fallback(self, node: fx.Node, m: nn.Module, why: str | None = None) -> None:
        """Record a layer with binary weights or a binary input that runs in float, and why."""
        binary_in, binary_w = self.binary_input(node, m), _binary_weight(m.weight_quantizer)
        if not (binary_in or binary_w):
            return
        if why is None:
            if not binary_in:
                q = m.input_quantizer
                why = ("its input is float (input_quantizer=None on a value that is not the output of a sign)"
                       if q is None else f"its input quantizer {type(q).__name__} is not a sign")
            elif not binary_w:
                q = m.weight_quantizer
                why = ("its weights are float (weight_quantizer=None)" if q is None
                       else f"its weight quantizer {type(q).__name__} does not give +-1 levels")
            else:
                why = "the packed kernels do not run this configuration"
        self.fallbacks.append({"module": str(node.target), "reason": why})

    def threshold_chain(self, node: fx.Node, m: nn.Module):
        """(pool node | None, bn node, consumer layout, sign node | None) when conv -> [maxpool] -> BN ->
        binary convs only, or conv -> [maxpool] -> BN -> one sign (``QActivation``) -> convs without
        input quantizer and with binary weights only (the NoAct pattern)."""
        users = list(node.users)
        if len(users) != 1:
            return None
        nxt, pool = users[0], None
        if nxt.op == "call_module" and type(self.modules[nxt.target]) is nn.MaxPool2d:
            p = self.modules[nxt.target]
            if p.return_indices or len(nxt.users) != 1:
                return None
            pool, nxt = nxt, next(iter(nxt.users))
        if nxt.op != "call_module" or len(nxt.args) != 1:
            return None
        bn = self.modules[nxt.target]
        if _is_sign_threshold(bn):
            # canonized (onebit.canonize.fold_thresholds): thresholds on the exact accumulator
            if bn.threshold.numel() != m.out_channels or m.bias is not None or not is_sign_quantizer(m.weight_quantizer):
                return None
        elif type(bn) is not nn.BatchNorm2d or bn.running_mean is None or bn.num_features != m.out_channels:
            return None
        if pool is not None and pool.args[0] is not node:
            return None
        if nxt.args[0] is not (pool or node):
            return None
        consumers, sign_node = list(nxt.users), None
        if len(consumers) == 1 and self._is_sign_activation(consumers[0], nxt):
            sign_node = consumers[0]
            consumers = list(sign_node.users)
        if not consumers:
            return None
        source = sign_node or nxt
        layouts = set()
        for c in consumers:
            if c.op != "call_module" or len(c.args) != 1 or c.kwargs or c.args[0] is not source:
                return None
            cm = self.modules[c.target]
            noact = sign_node is not None and getattr(cm, "input_quantizer", 0) is None
            if self.binary_conv_kind(cm, input_binary=True if noact else None) != "packed":
                return None
            layouts.add(self.conv_layout(cm))
        if len(layouts) != 1:
            return None
        return pool, nxt, layouts.pop(), sign_node

    def _is_sign_activation(self, node: fx.Node, src: fx.Node) -> bool:
        """``node`` is a module applying a sign to ``src`` alone (a ``QActivation``, or a sign quantizer)."""
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs or node.args[0] is not src:
            return False
        m = self.modules[node.target]
        return is_sign_quantizer(m.quantizer if isinstance(m, QActivation) else m)

    def is_binary_linear(self, m: nn.Module) -> bool:
        return isinstance(m, QLinear) and is_sign_quantizer(m.input_quantizer) and _binary_weight(m.weight_quantizer)

    def linear_threshold_chain(self, node: fx.Node, m: QLinear) -> fx.Node | None:
        """The BatchNorm1d node when binary linear -> BatchNorm1d -> only binary linear layers."""
        shape = self._shape(node)
        if len(node.users) != 1 or shape is None or len(shape) != 2:
            return None
        bn_node = next(iter(node.users))
        if bn_node.op != "call_module" or len(bn_node.args) != 1 or bn_node.args[0] is not node:
            return None
        bn = self.modules[bn_node.target]
        if _is_sign_threshold(bn):
            if bn.threshold.numel() != m.out_features or m.bias is not None or not is_sign_quantizer(m.weight_quantizer):
                return None
        elif type(bn) is not nn.BatchNorm1d or bn.running_mean is None or bn.num_features != m.out_features:
            return None
        consumers = list(bn_node.users)
        if not consumers:
            return None
        for c in consumers:
            if c.op != "call_module" or len(c.args) != 1 or c.kwargs or c.args[0] is not bn_node:
                return None
            if not self.is_binary_linear(self.modules[c.target]):
                return None
        return bn_node

    def thresholds_of(self, module: nn.Module, bound: int, scale, bias) -> tuple[torch.Tensor, torch.Tensor]:
        """(int32 thresholds, int8 directions) of a BatchNorm (derived) or a canonized SignThreshold (given)."""
        if _is_sign_threshold(module):
            thr, direction = module.threshold.detach(), module.direction.detach()
            # the kernels compare int32: clamp to the reachable range, which keeps every decision
            thr = thr.to(torch.int64).clamp(-bound - 1, bound + 1)
        else:
            th = batchnorm_sign_thresholds(module, bound, scale=scale, bias=bias)
            thr, direction = th.threshold, th.direction
        return thr.to(torch.int32).contiguous(), direction.to(torch.int8).contiguous()

    def single_batchnorm_user(self, node: fx.Node, channels: int) -> fx.Node | None:
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if user.op != "call_module" or len(user.args) != 1 or user.kwargs or user.args[0] is not node:
            return None
        bn = self.modules[user.target]
        if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or bn.num_features != channels:
            return None
        return user

    def lower_binary_conv(self, node: fx.Node, m: QConv2d) -> None:
        chain = self.threshold_chain(node, m)
        layout = self.conv_layout(m)
        xp = self.packed_input(node, node.args[0], layout)
        wp, scale = self.binary_weights(m)
        bias = _t(m.bias)
        conv = _conv_attrs(m, m.kernel_size, m.stride, layout[0], m.dilation, m.pad_value)
        if chain is None and scale is not None and self.fold_batchnorm:
            bn_node = self.single_batchnorm_user(node, m.out_channels)
            if bn_node is not None:
                # fold_batchnorm=True: the following BatchNorm goes into the per-channel scale and
                # bias (one op less; equal to the model up to float rounding, not bit for bit)
                bn = self.modules[bn_node.target]
                scale, bias = _fold_batchnorm(bn, scale, bias)
                self.value[bn_node] = self.emit(
                    node.name, "binary_conv2d", [xp], conv, {"weight": wp, "scale": scale, "bias": bias}, node.target
                )
                self.skip.add(bn_node)
                return
        if chain is None:
            self.value[node] = self.emit(node.name, "binary_conv2d", [xp], conv, {"weight": wp, "scale": scale, "bias": bias}, node.target)
            return
        pool, bn_node, out_layout, sign_node = chain
        bound = accumulator_bound(m.in_channels, m.groups, m.kernel_size)
        thr, direction = self.thresholds_of(self.modules[bn_node.target], bound, scale, bias)
        out = {"out_padding": list(out_layout[0]), "out_pad_value": out_layout[1], "out_groups": out_layout[2]}
        if pool is None:
            packed = self.emit(
                node.name, "binary_conv2d_threshold", [xp], {**conv, **out},
                {"weight": wp, "thresholds": thr, "direction": direction}, node.target,
            )
        else:
            # max(acc) < thr iff all acc < thr; max(acc) > thr iff any acc > thr: threshold every
            # position, then pool the bits (AND for direction +1, OR for -1)
            c, g = int(m.out_channels), out_layout[2]
            bits = self.emit(
                node.name, "binary_conv2d_threshold", [xp],
                {**conv, "out_padding": [0, 0], "out_pad_value": 0.0, "out_groups": g},
                {"weight": wp, "thresholds": thr, "direction": direction}, node.target,
            )
            p = self.modules[pool.target]
            stride = p.stride if p.stride is not None else p.kernel_size
            or_signs = torch.where(direction.view(1, c, 1, 1) < 0, -1.0, 1.0).to(torch.float32)
            or_mask = ops.pack_activations(or_signs.contiguous(), (0, 0), 0.0, g).view(g, -1).contiguous()
            pad_signs = torch.full((1, c, 1, 1), -1.0 if out["out_pad_value"] < 0 else 1.0)
            pad_words = ops.pack_activations(pad_signs, (0, 0), 0.0, g).view(g, -1).contiguous()
            attrs = {"channels": c, "kernel_size": _pair(p.kernel_size), "stride": _pair(stride),
                     "padding": _pair(p.padding), "dilation": _pair(p.dilation), "ceil_mode": bool(p.ceil_mode), **out}
            packed = self.emit(
                f"{pool.name}_bits", "max_pool_bits", [bits], attrs, {"or_mask": or_mask, "pad_words": pad_words},
                pool.target,
            )
            self.skip.add(pool)
        self.skip.add(bn_node)
        self.packed[(bn_node, out_layout)] = packed
        if sign_node is not None:  # the NoAct convs read the thresholded bits as their +-1 input
            self.skip.add(sign_node)
            self.packed_signs.add(sign_node)
            self.packed[(sign_node, out_layout)] = packed

    def lower_qconv1d(self, node: fx.Node, m: QConv1d) -> None:
        """A QConv1d is a 2-d convolution of ``[N, C, 1, L]`` with a ``1 x k`` kernel (as torch runs it).

        Binary (+-1 input, sign or magnitude-aware weights) and zero-padded alike on both sides:
        packed. Otherwise as the model runs it: quantized input, float conv of the weight levels.
        """
        binary = self.binary_input(node, m) and _binary_weight(m.weight_quantizer)
        pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
        packable = m.padding_mode == "zeros" and pad[0] == pad[1]
        x = self.arg(node, node.args[0])
        if not (binary and packable):
            why = None
            if binary:
                why = (f"padding_mode={m.padding_mode!r} (the packed kernels pad with a constant)"
                       if m.padding_mode != "zeros" else f"asymmetric padding {m.padding!r}")
            self.note_fallback(node, m, why)
            x, divisor = self.layer_input(node, m, x)
            self.value[node] = self.emit_qconv1d(node, m, x, divisor)
            return
        x = self.sign_source.get(x, x)
        x2d, conv = self.conv1d_as_2d(node, m, x, float(m.pad_value))
        xp = self.emit(f"{x2d}_packed", "pack", [x2d],
                       {"padding": conv["padding"], "pad_value": conv["pad_value"], "groups": conv["groups"]})
        wp, scale = self.binary_weights(m)  # [Co, 1, k, Wg]: the 1 x k kernel
        y = self.emit(node.name, "binary_conv2d", [xp], conv, {"weight": wp, "scale": scale, "bias": _t(m.bias)},
                      node.target)
        self.nodes[-1]["conv1d"] = True  # its output takes the layout torch's conv1d gives
        self.value[node] = self.emit(f"{node.name}_1d", "reshape", [y], {"shape": [int(m.out_channels), -1]})

    def lower_twist(self, node: fx.Node, m: TwistConv2d) -> None:
        """``TwistConv2d``, step by step as the layer computes it (``onebit.nn.twist``).

        Per pass: the quantized input, its channels rolled by one group (``permute``), the
        grouped 3x3 conv (packed when the input quantizer is a sign and the weights binary, else
        the float conv of the weight levels, then the scale), the two twist convs ``K_x``, ``K_y``
        as float convs of the +-1 input (small integer kernels: exact), and
        ``y + X * gx + Y * gy``. When the layer iterates: ``z = x + f(x) / n``, ``n - 1`` times
        ``z = z + f(z) / n``, then ``z - x``.
        """
        binary = is_sign_quantizer(m.input_quantizer) and _binary_weight(m.weight_quantizer)
        if not binary:
            self.note_fallback(node, m)
        groups, stride = int(m.groups), _pair(m.stride)
        conv = _conv_attrs(m, 3, stride, 1, 1, 0.0)
        float_conv = {**conv, "explicit_padding": [1, 1, 1, 1], "padding_mode": "zeros"}
        with torch.no_grad():
            twists = [_t(k) for k in m.twist_kernels()] if m.twist else []
        packed_weight, scale = self.binary_weights(m) if binary else (None, None)
        layer_tensors = None if binary else {k: v for k, v in self.float_layer_tensors(m).items() if v is not None}

        def step(v: str, k: int) -> str:
            base = f"{node.name}_step{k}" if m.iterates else node.name
            if m.input_quantizer is not None:
                v = self.lower_quantizer(node, m.input_quantizer, v)
            if m.permute:
                v = self.emit(f"{base}_roll", "roll", [v], {"shifts": int(m.in_channels // groups), "dim": 1})
            if binary:
                xp = self.emit(f"{v}_packed", "pack", [v], {"padding": [1, 1], "pad_value": 0.0, "groups": groups})
                y = self.emit(base, "binary_conv2d", [xp], conv, {"weight": packed_weight, "scale": scale}, node.target)
            else:
                y = self.emit(base, "qconv2d", [v], float_conv, layer_tensors, node.target)
            if not twists:
                return y
            gx, gy = (self.emit(f"{base}_{axis}", "conv2d", [v], float_conv, {"weight": kernel}, node.target)
                      for axis, kernel in zip("xy", twists))
            return self.emit(f"{base}_twist", "twist_mix", [y, gx, gy], module=node.target)

        x = self.arg(node, node.args[0])
        if not m.iterates:
            self.value[node] = step(x, 0)
            return
        n = float(m.iters)
        z = x
        for k in range(m.iters):
            f = self.emit(f"{node.name}_step{k}_div", "div", [step(z, k)], {"other": n})
            z = self.emit(f"{node.name}_iter{k}", "add", [z, f], {"other": 0.0, "alpha": 1.0}, module=node.target)
        self.value[node] = self.emit(f"{node.name}_out", "add", [z, x], {"other": 0.0, "alpha": -1.0}, module=node.target)

    def lower_float_qconv(self, node: fx.Node, m: QConv2d, x: str) -> str:
        """A QConv2d run as the model runs it (:func:`onebit.nn.functional.qconv`): quantize the
        input, float conv of the weight levels, then scale and bias."""
        why = None
        if self.binary_conv_kind(m, node) == "float":
            why = (f"padding_mode={m.padding_mode!r} (the packed kernels pad with a constant)"
                   if m.padding_mode != "zeros" else f"asymmetric padding {m.padding!r}")
        self.note_fallback(node, m, why)
        x, divisor = self.layer_input(node, m, x)
        attrs = {**self.float_conv_attrs(m, float(m.pad_value)), "input_divisor": divisor}
        return self.emit(node.name, "qconv2d", [x], attrs, self.float_layer_tensors(m), node.target)

    def layer_input(self, node: fx.Node, m: nn.Module, x: str) -> tuple[str, float | None]:
        """A float-run layer's quantized input as the layer computes with it (see
        :func:`onebit.nn.functional.qconv`): the integers and their divisor when the input
        quantizer factors them out (``dorefa``, ``dorefa_sym``; zero padding for a conv), else the
        quantizer's output and None."""
        q = m.input_quantizer
        if q is None:
            return x, None
        divisor = _integer_divisor(q)
        if divisor is None or (not isinstance(m, QLinear) and float(m.pad_value) != 0.0):
            return self.lower_quantizer(node, q, x), None
        attrs = {"kind": "dorefa" if isinstance(q, quant.DoReFa) else "dorefa_sym", "bits": int(q.precision),
                 "clip": _clip(q)}  # fmt: skip
        return self.emit(f"{node.name}_int", "quantize_int", [x], attrs), divisor

    def bitplane_codes(self, m: nn.Module, node: fx.Node) -> tuple | None:
        """(input code, weight code) of a k-bit or ternary layer the bit-plane conv runs, else None:
        integer inputs (``dorefa``, ``dorefa_sym``) and integer weight levels (signs, ternary,
        ``dorefa_weight``), zero padding on both sides, exact integer sums."""
        act, weight = bitplanes.input_code(m.input_quantizer), bitplanes.weight_code(m.weight_quantizer)
        if act is None or weight is None:
            return None
        if isinstance(m, QConv2d):
            if m.padding_mode != "zeros" or float(m.pad_value) != 0.0:
                return None
            pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
            if pad[0] != pad[1] or pad[2] != pad[3]:
                return None
            taps = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            in_shape = self._shape(node.args[0])
            if in_shape is None or len(in_shape) != 2:
                return None
            taps = m.in_features
        largest = max(abs(v) for v in act.levels) * max(abs(v) for v in weight.levels)
        return (act, weight) if taps * largest < 1 << 24 else None  # exact in float32

    def lower_bitplane(self, node: fx.Node, m: nn.Module, codes: tuple) -> None:
        """A k-bit / ternary layer -> one ``bitplane_conv2d`` (a linear layer as a 1 x 1 conv of [N, F])."""
        act, wcode = codes
        x = self.arg(node, node.args[0])
        levels, scale = self.weight_factors(m)
        if isinstance(m, QConv2d):
            pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
            conv = _conv_attrs(m, m.kernel_size, m.stride, (pad[2], pad[0]), m.dilation, 0.0)
            groups = int(m.groups)
        else:
            levels = levels[:, :, None, None]
            conv = {"in_channels": int(m.in_features), "out_channels": int(m.out_features), "kernel_size": [1, 1],
                    "stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1, "pad_value": 0.0}  # fmt: skip
            groups = 1
        planes = bitplanes.stack_weight_planes(levels.contiguous(), wcode, 1, groups)
        q = m.input_quantizer
        attrs = {
            **conv, "quantizer": "dorefa" if isinstance(q, quant.DoReFa) else "dorefa_sym", "clip": _clip(q),
            "act_kind": act.kind, "act_bits": act.bits, "weight_kind": wcode.kind, "weight_bits": wcode.bits,
            "input_divisor": _integer_divisor(q),
        }  # fmt: skip
        tensors = {
            "weight": ops.pack_weights(planes, groups),
            "plane_sums": wcode.split(levels).sum(dim=(2, 3, 4)).to(torch.int32).contiguous(),
            "scale": scale, "bias": _t(m.bias),
        }  # fmt: skip
        self.value[node] = self.emit(node.name, "bitplane_conv2d", [x], attrs, tensors, node.target)
        if isinstance(m, QLinear):
            self.nodes[-1]["linear"] = True  # a 2-d output, contiguous as torch's linear gives it

    def emit_conv(self, node: fx.Node, m: nn.Conv2d, x: str, weight: torch.Tensor, pad_value: float) -> str:
        attrs = self.float_conv_attrs(m, pad_value)
        return self.emit(node.name, "conv2d", [x], attrs, {"weight": weight, "bias": _t(m.bias)}, node.target)

    def float_conv_attrs(self, m: nn.Conv2d, pad_value: float) -> dict:
        return {
            **_conv_attrs(m, m.kernel_size, m.stride, m.padding, m.dilation, pad_value),
            "explicit_padding": list(QF.explicit_padding(m.padding, m.kernel_size, m.dilation)),
            "padding_mode": m.padding_mode,
        }

    def conv1d_as_2d(self, node: fx.Node, m: nn.Conv1d, x: str, pad_value: float) -> tuple[str, dict]:
        """``x`` reshaped to ``[N, C, 1, L]`` and the attributes of the ``1 x k`` 2-d conv a 1-d conv is
        (its padding is ``[0, before]``: callers check that ``before == after`` or say otherwise)."""
        pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
        x2d = self.emit(f"{node.name}_2d", "reshape", [x], {"shape": [int(m.in_channels), 1, -1]})
        return x2d, _conv_attrs(m, (1, m.kernel_size[0]), (1, m.stride[0]), (0, pad[0]), (1, m.dilation[0]), pad_value)

    def emit_conv1d(self, node: fx.Node, m: nn.Conv1d, x: str, weight: torch.Tensor, pad_value: float) -> str:
        """A 1-d conv as torch computes it: a 2-d conv of ``[N, C, 1, L]`` with a ``1 x k`` kernel."""
        x2d, attrs = self.conv1d_float_attrs(node, m, x, pad_value)
        tensors = {"weight": weight.unsqueeze(2).contiguous(), "bias": _t(m.bias)}
        y = self.emit(node.name, "conv2d", [x2d], attrs, tensors, node.target)
        self.nodes[-1]["conv1d"] = True  # its output takes the layout torch's conv1d gives
        return self.emit(f"{node.name}_1d", "reshape", [y], {"shape": [int(m.out_channels), -1]})

    def emit_qconv1d(self, node: fx.Node, m: QConv1d, x: str, divisor: float | None = None) -> str:
        """A quantized 1-d conv run in float: ``qconv2d`` of ``[N, C, 1, L]`` with a ``1 x k`` kernel."""
        x2d, attrs = self.conv1d_float_attrs(node, m, x, float(m.pad_value))
        attrs["input_divisor"] = divisor
        y = self.emit(node.name, "qconv2d", [x2d], attrs, self.float_layer_tensors(m), node.target)
        self.nodes[-1]["conv1d"] = True  # its output takes the layout torch's conv1d gives
        return self.emit(f"{node.name}_1d", "reshape", [y], {"shape": [int(m.out_channels), -1]})

    def conv1d_float_attrs(self, node: fx.Node, m: nn.Conv1d, x: str, pad_value: float) -> tuple[str, dict]:
        pad = QF.explicit_padding(m.padding, m.kernel_size, m.dilation)
        x2d, conv = self.conv1d_as_2d(node, m, x, pad_value)
        return x2d, {
            **conv,
            "padding": conv["padding"] if pad[0] == pad[1] else "same",
            "explicit_padding": [int(pad[0]), int(pad[1]), 0, 0],
            "padding_mode": m.padding_mode,
        }

    def lower_quantizer(self, node: fx.Node, q: Any, x: str) -> str:
        if is_sign_quantizer(q):
            out = self.emit(f"{node.name}_sign", "sign", [x])
            self.sign_source[out] = self.sign_source.get(x, x)  # sign(sign(x)) = sign(x)
            return out
        if isinstance(q, quant.DoReFa):
            return self.emit(f"{node.name}_dorefa", "dorefa", [x], {"bits": int(q.precision)})
        if isinstance(q, DoReFaSymmetric):
            return self.emit(f"{node.name}_dorefa_sym", "dorefa_sym", [x], {"bits": int(q.precision), "clip": _clip(q)})
        raise self.unsupported(node, f"quantizer {type(q).__name__} has no engine op")

    def lower_qlinear(self, node: fx.Node, m: QLinear) -> None:
        binary = self.binary_input(node, m) and _binary_weight(m.weight_quantizer)
        in_shape = self._shape(node.args[0])
        why = None
        if binary and (in_shape is None or len(in_shape) != 2):
            binary = False  # [N, ..., features]: run as torch runs it
            why = f"its input has rank {len(in_shape) if in_shape else '?'} (packed linear layers take [N, features])"
        if binary:
            layout = ("features", int(m.in_features))
            xp = self.packed.get((node.args[0], layout))
            if xp is None:
                x = self.arg(node, node.args[0])
                x = self.sign_source.get(x, x)
                key = (x, layout)
                if key not in self.packed:
                    self.packed[key] = self.emit(
                        f"{x}_packed", "pack_features", [x], {"features": int(m.in_features)}, module=node.target
                    )
                xp = self.packed[key]
            wp, scale = self.binary_weights(m)
            bias = _t(m.bias)
            attrs = {"in_features": int(m.in_features), "out_features": int(m.out_features)}
            bn_node = self.linear_threshold_chain(node, m)
            if bn_node is None:
                self.value[node] = self.emit(
                    node.name, "binary_linear", [xp], attrs, {"weight": wp, "scale": scale, "bias": bias}, node.target
                )
                return
            thr, direction = self.thresholds_of(self.modules[bn_node.target], int(m.in_features), scale, bias)
            packed = self.emit(
                node.name, "binary_linear_threshold", [xp], attrs,
                {"weight": wp, "thresholds": thr, "direction": direction}, node.target,
            )
            self.skip.add(bn_node)
            self.packed[(bn_node, ("features", int(m.out_features)))] = packed
            return
        self.note_fallback(node, m, why)
        x, divisor = self.layer_input(node, m, self.arg(node, node.args[0]))
        attrs = {"in_features": int(m.in_features), "out_features": int(m.out_features), "input_divisor": divisor}
        self.value[node] = self.emit(node.name, "qlinear", [x], attrs, self.float_layer_tensors(m), node.target)

    def lower_ternary_linear(self, node: fx.Node, m: QLinear) -> None:
        """A ``BitLinear`` (or a ``QLinear`` with ``absmax8`` input and ``ternary`` weights) -> one
        ``ternary_linear`` op: [RMSNorm], int8 tokens, 2-bit weights, exact integer sums."""
        f = int(m.in_features)
        if f > 1 << 17:
            raise self.unsupported(node, f"in_features={f} > 131072: its integer sums are not exact in float32")
        x = self.arg(node, node.args[0])
        levels, gamma = self.weight_factors(m)
        norm = isinstance(m, BitLinear) and m.norm
        attrs = {"in_features": f, "out_features": int(m.out_features), "norm": bool(norm),
                 "eps": float(m.eps) if isinstance(m, BitLinear) else 1e-5}  # fmt: skip
        tensors = {"weight": ops.pack_ternary_weights(levels.contiguous()), "scale": gamma, "bias": _t(m.bias)}
        self.value[node] = self.emit(node.name, "ternary_linear", [x], attrs, tensors, node.target)

    # -- float modules ------------------------------------------------------

    def lower_module_op(self, node: fx.Node, m: nn.Module, x: str) -> str:
        """Emit the float op of a parameter-free or simple module (:data:`EMITTERS`); returns the value name."""
        emitter = EMITTERS.get(type(m))
        if emitter is not None:
            return emitter(self, node, m, x)
        if _is_sign_threshold(m):
            return self.emit(
                node.name, "sign_threshold", [x], {"channels": int(m.threshold.numel())},
                {"thresholds": m.threshold.detach().to(torch.int64).clamp(-(2**31), 2**31 - 1).to(torch.int32).contiguous(),
                 "direction": m.direction.detach().to(torch.int8).contiguous()},
                node.target,
            )
        if isinstance(m, QActivation):
            return self.lower_quantizer(node, m.quantizer, x)
        if isinstance(m, quant.Quantizer):
            return self.lower_quantizer(node, m, x)
        raise self.unsupported(node)

    # -- the walk -----------------------------------------------------------

    def run(self) -> dict:
        graph_input = None
        output = None
        for node in self.gm.graph.nodes:
            if node in self.skip:
                continue
            if node.op == "placeholder":
                if graph_input is not None:
                    raise UnsupportedModelError("the packed engine supports models with one tensor input")
                graph_input = node
                self.value[node] = "input"
            elif node.op == "call_module":
                self.lower_call_module(node)
            elif node.op == "call_function":
                self.lower_call_function(node)
            elif node.op == "call_method":
                self.lower_call_method(node)
            elif node.op == "output":
                output = node.args[0]
            else:
                raise self.unsupported(node, "model attributes used as tensors in forward")
        if isinstance(output, fx.Node):
            outputs, kind = [self.arg(output, output)], "tensor"
        elif isinstance(output, (tuple, list)) and output and all(isinstance(o, fx.Node) for o in output):
            outputs, kind = [self.arg(o, o) for o in output], type(output).__name__
        else:
            raise UnsupportedModelError("the model's output must be a tensor or a tuple/list of tensors")
        shape = tuple(self.example.shape)
        return {
            "input": {"name": "input", "rank": len(shape), "channels": int(shape[1]), "dtype": "float32",
                      "example_shape": list(shape)},
            "nodes": _live_nodes(self.nodes, outputs),
            "outputs": outputs,
            "output_kind": kind,
            "fallbacks": self.fallbacks,
        }

    def lower_call_module(self, node: fx.Node) -> None:
        m = self.modules[node.target]
        if len(node.args) != 1 or node.kwargs:
            raise self.unsupported(node, "expected one positional tensor argument")
        codes = self.bitplane_codes(m, node) if isinstance(m, (QConv2d, QLinear)) else None
        if codes is not None:
            self.lower_bitplane(node, m, codes)
            return
        if isinstance(m, QConv2d):
            kind = self.binary_conv_kind(m, node)
            if kind == "packed":
                self.lower_binary_conv(node, m)
            else:
                self.value[node] = self.lower_float_qconv(node, m, self.arg(node, node.args[0]))
            return
        if is_ternary_linear(m):
            self.lower_ternary_linear(node, m)
            return
        if isinstance(m, QLinear):
            self.lower_qlinear(node, m)
            return
        if isinstance(m, QConv1d):
            self.lower_qconv1d(node, m)
            return
        if isinstance(m, TwistConv2d):
            self.lower_twist(node, m)
            return
        if isinstance(m, QuantizedLayer):
            raise self.unsupported(node, "only 1-d and 2-d convolutions and linear layers are supported")
        if type(m) in _IDENTITIES:
            self.value[node] = self.arg(node, node.args[0])
            return
        self.value[node] = self.lower_module_op(node, m, self.arg(node, node.args[0]))

    def lower_call_function(self, node: fx.Node) -> None:
        f, args, kw = node.target, node.args, node.kwargs
        name = node.name
        if f in (operator.add, torch.add, operator.iadd):
            alpha = float(kw.get("alpha", 1.0))
            a, b = args[0], args[1]
            if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                self.value[node] = self.emit(name, "add", [self.arg(node, a), self.arg(node, b)], {"other": 0.0, "alpha": alpha})
            elif isinstance(a, fx.Node) and isinstance(b, (int, float)):
                self.value[node] = self.emit(name, "add", [self.arg(node, a)], {"other": float(b), "alpha": alpha})
            elif isinstance(b, fx.Node) and isinstance(a, (int, float)) and alpha == 1.0:
                self.value[node] = self.emit(name, "add", [self.arg(node, b)], {"other": float(a), "alpha": 1.0})
            else:
                raise self.unsupported(node)
        elif f in (operator.mul, torch.mul, operator.imul):
            a, b = args[0], args[1]
            if isinstance(a, fx.Node) and isinstance(b, fx.Node):
                self.value[node] = self.emit(name, "mul", [self.arg(node, a), self.arg(node, b)], {"other": 1.0})
            elif isinstance(a, fx.Node) and isinstance(b, (int, float)):
                self.value[node] = self.emit(name, "mul", [self.arg(node, a)], {"other": float(b)})
            elif isinstance(b, fx.Node) and isinstance(a, (int, float)):
                self.value[node] = self.emit(name, "mul", [self.arg(node, b)], {"other": float(a)})
            else:
                raise self.unsupported(node)
        elif f is torch.cat:
            tensors = args[0]
            dim = kw.get("dim", args[1] if len(args) > 1 else 0)
            self.value[node] = self.emit(name, "cat", [self.arg(node, t) for t in tensors], {"dim": int(dim)})
        elif f is torch.flatten:
            start = kw.get("start_dim", args[1] if len(args) > 1 else 0)
            end = kw.get("end_dim", args[2] if len(args) > 2 else -1)
            self.value[node] = self.emit(name, "flatten", [self.arg(node, args[0])], {"start_dim": int(start), "end_dim": int(end)})
        elif f in (F.relu, torch.relu):
            self.value[node] = self.emit(name, "relu", [self.arg(node, args[0])])
        elif f in (torch.sigmoid, F.sigmoid):
            self.value[node] = self.emit(name, "sigmoid", [self.arg(node, args[0])])
        elif f in (torch.tanh, F.tanh):
            self.value[node] = self.emit(name, "tanh", [self.arg(node, args[0])])
        elif f is onebit_sign:
            self.value[node] = self.emit(name, "sign", [self.arg(node, args[0])])
        elif f is F.hardtanh:
            lo = float(kw.get("min_val", args[1] if len(args) > 1 else -1.0))
            hi = float(kw.get("max_val", args[2] if len(args) > 2 else 1.0))
            self.value[node] = self.emit(name, "hardtanh", [self.arg(node, args[0])], {"min_val": lo, "max_val": hi})
        elif f is F.adaptive_avg_pool2d:
            size = kw.get("output_size", args[1] if len(args) > 1 else None)
            self.value[node] = self.emit(name, "adaptive_avg_pool2d", [self.arg(node, args[0])], {"output_size": _pair(size)})
        else:
            raise self.unsupported(node)

    def lower_call_method(self, node: fx.Node) -> None:
        method, args = node.target, node.args
        if method == "size":
            if not all(u.op == "call_method" and u.target in ("view", "reshape") for u in node.users):
                raise self.unsupported(node, "tensor sizes are only supported as arguments of view/reshape")
            return
        if method in ("view", "reshape"):
            shape, in_shape = self._shape(node), self._shape(args[0]) if isinstance(args[0], fx.Node) else None
            if shape is None or in_shape is None or not shape or shape[0] != in_shape[0]:
                raise self.unsupported(node, "only reshapes that keep the batch dimension are supported")
            self.value[node] = self.emit(node.name, "reshape", [self.arg(node, args[0])], {"shape": list(shape[1:])})
        elif method == "flatten":
            start = node.kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
            end = node.kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
            self.value[node] = self.emit(node.name, "flatten", [self.arg(node, args[0])], {"start_dim": int(start), "end_dim": int(end)})
        elif method == "relu":
            self.value[node] = self.emit(node.name, "relu", [self.arg(node, args[0])])
        elif method in ("add", "__add__") and len(args) == 2 and isinstance(args[1], fx.Node) and not node.kwargs:
            self.value[node] = self.emit(node.name, "add", [self.arg(node, args[0]), self.arg(node, args[1])], {"other": 0.0, "alpha": 1.0})
        elif method in ("contiguous",):
            self.value[node] = self.arg(node, args[0])
        else:
            raise self.unsupported(node)



# ---------------------------------------------------------------------------
# float modules: one emitter per module type, emitter(lowering, node, module, input value) -> value


def _op(op: str, attrs=lambda m: {}):
    """The emitter of a module that is one graph op with attributes ``attrs(m)`` and no tensors."""

    def emitter(low: _Lowering, node: fx.Node, m: nn.Module, x: str) -> str:
        return low.emit(node.name, op, [x], attrs(m), module=node.target)

    return emitter


def _emit_max_pool(low: _Lowering, node: fx.Node, m: nn.MaxPool2d, x: str) -> str:
    if m.return_indices:
        raise low.unsupported(node, "return_indices=True")
    stride = m.stride if m.stride is not None else m.kernel_size
    attrs = {"kernel_size": _pair(m.kernel_size), "stride": _pair(stride), "padding": _pair(m.padding),
             "dilation": _pair(m.dilation), "ceil_mode": bool(m.ceil_mode)}  # fmt: skip
    return low.emit(node.name, "max_pool2d", [x], attrs, module=node.target)


def _emit_avg_pool(low: _Lowering, node: fx.Node, m: nn.AvgPool2d, x: str) -> str:
    stride = m.stride if m.stride is not None else m.kernel_size
    attrs = {"kernel_size": _pair(m.kernel_size), "stride": _pair(stride), "padding": _pair(m.padding),
             "ceil_mode": bool(m.ceil_mode), "count_include_pad": bool(m.count_include_pad),
             "divisor_override": m.divisor_override}  # fmt: skip
    return low.emit(node.name, "avg_pool2d", [x], attrs, module=node.target)


def _emit_adaptive_pool(low: _Lowering, node: fx.Node, m: nn.Module, x: str) -> str:
    out = low._shape(node)
    if out is None or len(out) != 4:
        raise low.unsupported(node, "expected a 4-D output")
    if isinstance(m, nn.AdaptiveMaxPool2d) and m.return_indices:
        raise low.unsupported(node, "return_indices=True")
    size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size, m.output_size)
    if any(s is None for s in size):
        size = tuple(out[2 + i] if s is None else s for i, s in enumerate(size))
    op = "adaptive_avg_pool2d" if isinstance(m, nn.AdaptiveAvgPool2d) else "adaptive_max_pool2d"
    return low.emit(node.name, op, [x], {"output_size": _pair(size)}, module=node.target)


def _emit_batch_norm(low: _Lowering, node: fx.Node, m: nn.Module, x: str) -> str:
    if m.running_mean is None or m.running_var is None:
        raise low.unsupported(node, "BatchNorm without running statistics (track_running_stats=False)")
    return low.emit(
        node.name, "batch_norm", [x], {"num_features": int(m.num_features), "eps": float(m.eps)},
        {"running_mean": _t(m.running_mean), "running_var": _t(m.running_var), "weight": _t(m.weight), "bias": _t(m.bias)},
        node.target,
    )  # fmt: skip


def _emit_softmax(low: _Lowering, node: fx.Node, m: nn.Softmax, x: str) -> str:
    if m.dim is None:
        raise low.unsupported(node, "Softmax needs an explicit dim")
    return low.emit(node.name, "softmax", [x], {"dim": int(m.dim)}, module=node.target)


def _emit_linear(low: _Lowering, node: fx.Node, m: nn.Linear, x: str) -> str:
    attrs = {"in_features": int(m.in_features), "out_features": int(m.out_features)}
    return low.emit(node.name, "linear", [x], attrs, {"weight": _t(m.weight), "bias": _t(m.bias)}, node.target)


#: the float modules the engine runs as graph ops, by exact type
EMITTERS = {
    nn.MaxPool2d: _emit_max_pool,
    nn.AvgPool2d: _emit_avg_pool,
    nn.AdaptiveAvgPool2d: _emit_adaptive_pool,
    nn.AdaptiveMaxPool2d: _emit_adaptive_pool,
    nn.Flatten: _op("flatten", lambda m: {"start_dim": int(m.start_dim), "end_dim": int(m.end_dim)}),
    nn.BatchNorm1d: _emit_batch_norm,
    nn.BatchNorm2d: _emit_batch_norm,
    nn.ReLU: _op("relu"),
    nn.ReLU6: _op("relu6"),
    nn.LeakyReLU: _op("leaky_relu", lambda m: {"negative_slope": float(m.negative_slope)}),
    nn.Hardtanh: _op("hardtanh", lambda m: {"min_val": float(m.min_val), "max_val": float(m.max_val)}),
    nn.PReLU: lambda low, node, m, x: low.emit(node.name, "prelu", [x], {}, {"weight": _t(m.weight)}, node.target),
    nn.Sigmoid: _op("sigmoid"),
    nn.Tanh: _op("tanh"),
    nn.Softmax: _emit_softmax,
    nn.Conv2d: lambda low, node, m, x: low.emit_conv(node, m, x, _t(m.weight), 0.0),
    nn.Conv1d: lambda low, node, m, x: low.emit_conv1d(node, m, x, _t(m.weight), 0.0),
    nn.Linear: _emit_linear,
}


def _integer_divisor(q: Any) -> float | None:
    """The divisor ``s`` of an input quantizer's ``integer_factor`` (one number: ``dorefa``,
    ``dorefa_sym``), as the float32 value the layer divides by; None for any other quantizer."""
    if not isinstance(q, (quant.DoReFa, DoReFaSymmetric)):
        return None
    with torch.no_grad():
        _, s = q.integer_factor(torch.zeros(1))
    return float(s)


def _clip(q: Any) -> float:
    """``dorefa_sym``'s clip as a float (1.0, unused, for ``dorefa``)."""
    return float(q.clip_value()) if isinstance(q, DoReFaSymmetric) else 1.0


def is_ternary_linear(m: nn.Module) -> bool:
    """A linear layer the ``ternary_linear`` kernels run: ``absmax8`` input, ``ternary`` weights."""
    return isinstance(m, QLinear) and isinstance(m.input_quantizer, Absmax8) and isinstance(m.weight_quantizer, Ternary)


def _is_sign_threshold(m: nn.Module) -> bool:
    """A :class:`onebit.canonize.SignThreshold` (imported lazily: canonization is optional here)."""
    if type(m).__name__ != "SignThreshold":
        return False
    try:
        from onebit.canonize import SignThreshold
    except ImportError:
        return False
    return isinstance(m, SignThreshold)


def _drop_identities(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Remove eval-mode identities (Identity, Dropout, ``.contiguous()``) so that patterns see through them."""
    for node in list(gm.graph.nodes):
        identity = (
            node.op == "call_module" and type(modules.get(node.target)) in _IDENTITIES and len(node.args) == 1
        ) or (node.op == "call_method" and node.target == "contiguous" and len(node.args) == 1 and not node.kwargs)
        if identity and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _live_nodes(nodes: list[dict], outputs: list[str]) -> list[dict]:
    """The nodes an output depends on, in order (every op is pure: e.g. a sign whose only
    reader packed its source instead is dropped)."""
    live = set(outputs)
    for node in reversed(nodes):
        if node["name"] in live:
            live.update(node["inputs"])
    return [node for node in nodes if node["name"] in live]


def _fold_batchnorm(bn: nn.BatchNorm2d, scale: torch.Tensor, bias: torch.Tensor | None):
    """``bn(acc * scale + bias) = acc * scale' + bias'`` (computed in float64, rounded once to float32)."""
    g = bn.weight.detach().double() if bn.weight is not None else torch.ones(bn.num_features, dtype=torch.float64)
    g = g / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros(bn.num_features, dtype=torch.float64)
    b = bias.double() if bias is not None else torch.zeros_like(g)
    new_scale = (scale.double() * g).float().contiguous()
    new_bias = ((b - bn.running_mean.detach().double()) * g + beta).float().contiguous()
    return new_scale, new_bias


def lower(
    model: nn.Module, example_input: torch.Tensor, *, fold_batchnorm: bool = False
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Trace ``model`` and return ``(graph, tensors)`` for :class:`~onebit.engine.PackedModel`.

    ``graph["fallbacks"]`` lists the layers with binary weights or a binary input that run
    in float, each with the reason."""
    lowering = _Lowering(model, example_input, fold_batchnorm)
    graph = lowering.run()
    live = {key for node in graph["nodes"] for key in node.get("tensors", {}).values()}
    return graph, {key: t for key, t in lowering.tensors.items() if key in live}
