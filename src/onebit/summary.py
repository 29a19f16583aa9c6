r"""What a binary model costs: parameters and memory at their real bit widths, binary vs float MACs.

:func:`summary` runs one forward pass on an example input (eval mode, no gradients,
the model's mode restored afterwards) with hooks on every *layer*: onebit's quantized
layers and ``QActivation``, and every module without children (a quantizer inside a
quantized layer is part of that layer's row). Per layer:

* ``params``: the layer's parameters (its quantizers' included);
* ``binary_params``: parameters that a 1-bit weight quantizer binarizes (the ``weight``
  of a layer whose ``weight_precision`` is 1);
* ``weight_bits`` / ``input_bits``: the precision of the layer's weight and input
  quantizers (32 for float convolutions and linear layers; ``None`` where not applicable);
* ``macs``: multiply-accumulates per example, for convolutions and linear layers::

      conv:    out.numel() * (in_channels / groups) * prod(kernel_size)
      linear:  out.numel() * in_features

  divided by the batch size (the first dimension of the example input), summed over
  every call of the layer;
* ``binary_macs``: the MACs whose two operands are both 1-bit (``input_bits == 1`` and
  ``weight_bits == 1``); all others are ``float_macs``, and of those the ``integer_macs`` have
  both operands quantized below 32 bits (an int8 stem, a 2-bit layer).

Totals (parameters shared between layers are counted once)::

    memory_float_bytes  = 4 * total_params
    memory_packed_bytes = (sum over low-bit weights of numel * weight_bits
                           + 32 * (total_params - low-bit weight params)) / 8
    compression_ratio   = memory_float_bytes / memory_packed_bytes

A *low-bit weight* is the ``weight`` of a quantized layer whose ``weight_precision`` is under 32:
1-bit weights count 1 bit each, ternary 2, ``int8_weight`` 8 (scales, biases and every other
parameter stay float32).

Buffers (BatchNorm statistics) are not counted. ``str(summary)`` is a table (rich) with the
totals; ``onebit summary MODEL_NAME`` prints it for a zoo model.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

from onebit import quant
from onebit.layerkinds import CONVOLUTIONS, WEIGHT_LAYERS
from onebit.nn.layers import QActivation, QuantizedLayer

__all__ = ["LayerSummary", "Summary", "summary"]


@dataclass
class LayerSummary:
    """One row of a :class:`Summary`."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None
    params: int
    binary_params: int
    weight_bits: int | None
    input_bits: int | None
    macs: int
    binary_macs: int
    calls: int = 0

    @property
    def float_macs(self) -> int:
        return self.macs - self.binary_macs

    # long names, for readers who prefer them
    @property
    def parameters(self) -> int:
        return self.params

    @property
    def binary_parameters(self) -> int:
        return self.binary_params

    @property
    def qualified_name(self) -> str:
        return self.name


@dataclass
class Summary:
    """Per-layer rows and totals; ``str()`` renders the table."""

    rows: list[LayerSummary]
    total_params: int
    binary_params: int
    model_name: str = ""
    input_shape: tuple[int, ...] | None = None
    #: parameters of the weights quantized below 32 bits, by bit width: ``{1: n, 2: n, 8: n}``
    lowbit_params: dict[int, int] = field(default_factory=dict)
    _extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def float_params(self) -> int:
        return self.total_params - self.binary_params

    @property
    def memory_float_bytes(self) -> int:
        return 4 * self.total_params

    @property
    def _widths(self) -> dict[int, int]:
        """:attr:`lowbit_params`, or for a summary built without them its binary weights."""
        return self.lowbit_params or ({1: self.binary_params} if self.binary_params else {})

    @property
    def memory_packed_bytes(self) -> int | float:
        lowbit = self._widths
        bits = sum(b * n for b, n in lowbit.items()) + 32 * (self.total_params - sum(lowbit.values()))
        return bits // 8 if bits % 8 == 0 else bits / 8

    @property
    def compression_ratio(self) -> float:
        packed = self.memory_packed_bytes
        return self.memory_float_bytes / packed if packed else 1.0

    @property
    def binary_macs(self) -> int:
        return sum(r.binary_macs for r in self.rows)

    @property
    def float_macs(self) -> int:
        return sum(r.float_macs for r in self.rows)

    @property
    def macs(self) -> int:
        return self.binary_macs + self.float_macs

    @property
    def integer_macs(self) -> int:
        """Non-binary MACs of layers whose inputs and weights are both quantized below 32 bits."""
        return sum(r.float_macs for r in self.rows if _low(r.input_bits) and _low(r.weight_bits))

    def row(self, name: str) -> LayerSummary:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer named {name!r} in the summary")

    def table(self) -> Table:
        title = f"{self.model_name} " if self.model_name else ""
        shape = f"input {_shape(self.input_shape)}" if self.input_shape else ""
        table = Table(
            title=f"{title}{shape}".strip() or None, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False
        )
        for heading, justify in [
            ("Layer", "left"),
            ("Type", "left"),
            ("Output shape", "left"),
            ("Params", "right"),
            ("Binary", "right"),
            ("W bits", "right"),
            ("In bits", "right"),
            ("MACs", "right"),
            ("Binary MACs", "right"),
        ]:
            table.add_column(heading, justify=justify, no_wrap=True)
        for r in self.rows:
            table.add_row(
                r.name,
                r.type,
                _shape(r.output_shape),
                _count(r.params),
                _count(r.binary_params),
                "-" if r.weight_bits is None else str(r.weight_bits),
                "-" if r.input_bits is None else str(r.input_bits),
                _count(r.macs),
                _count(r.binary_macs),
            )
        table.add_section()
        table.add_row(
            "Total",
            "",
            "",
            _count(self.total_params),
            _count(self.binary_params),
            "",
            "",
            _count(self.macs),
            _count(self.binary_macs),
        )
        return table

    def totals_text(self) -> str:
        binary_share = self.binary_macs / self.macs if self.macs else 0.0
        return "\n".join(
            [
                f"Parameters: {self.total_params:,} ({self._params_by_width()})",
                f"Memory:     {_bytes(self.memory_float_bytes)} as float32, {_bytes(self.memory_packed_bytes)} packed "
                f"({self._packed_widths()}): {self.compression_ratio:.2f}x smaller",
                f"MACs:       {self.macs:,} per example ({self.binary_macs:,} binary = {binary_share:.1%}, "
                f"{self._non_binary_macs()})",
            ]
        )

    def _non_binary_macs(self) -> str:
        if not self.integer_macs:
            return f"{self.float_macs:,} float"
        return f"{self.integer_macs:,} integer, {self.float_macs - self.integer_macs:,} float"

    def _params_by_width(self) -> str:
        lowbit = self._widths or {1: 0}  # "0 binary" for a float model
        names = {1: "binary", 2: "ternary"}
        parts = [f"{n:,} {names.get(b, f'{b}-bit')}" for b, n in sorted(lowbit.items())]
        return ", ".join([*parts, f"{self.total_params - sum(lowbit.values()):,} float"])

    def _packed_widths(self) -> str:
        lowbit = self._widths
        if not lowbit:
            return "no low-bit weights"
        names = {1: "binary weights at 1 bit", 2: "ternary weights at 2 bits"}
        return ", ".join(names.get(b, f"{b}-bit weights at {b} bits") for b in sorted(lowbit))

    def __str__(self) -> str:
        buffer = io.StringIO()
        console = Console(file=buffer, width=200, color_system=None, force_terminal=False, highlight=False, emoji=False)
        console.print(self.table())
        console.print(self.totals_text())
        return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()).strip("\n") + "\n"

    def __rich__(self):
        from rich.console import Group
        from rich.text import Text

        return Group(self.table(), Text(self.totals_text()))


def _low(bits: int | None) -> bool:
    return bits is not None and bits < 32


def _shape(shape: Sequence[int] | None) -> str:
    if shape is None:
        return "-"
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _count(n: int) -> str:
    return f"{n:,}" if n else "0"


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{n:g} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}"
    return f"{n} B"


def _is_layer(module: nn.Module) -> bool:
    if isinstance(module, (QuantizedLayer, QActivation)):
        return True
    return next(iter(module.children()), None) is None


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers in ``named_modules`` order, without the inside of onebit layers."""
    out: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, m in model.named_modules():
        if any(name != p and (p == "" or name.startswith(p + ".")) for p in taken):
            continue
        if _is_layer(m):
            out.append((name, m))
            taken.append(name)
    return out


def _bits(module: nn.Module) -> tuple[int | None, int | None]:
    if isinstance(module, QuantizedLayer):
        return module.weight_precision, module.input_precision
    if isinstance(module, WEIGHT_LAYERS):
        return 32, 32
    if any(True for _ in module.parameters()):
        return 32, None
    return None, None


def _binary_weight(module: nn.Module) -> nn.Parameter | None:
    if isinstance(module, QuantizedLayer) and quant.is_binary(module.weight_quantizer):
        return module.weight
    return None


def _lowbit_weight(module: nn.Module) -> tuple[nn.Parameter, int] | None:
    """The weight a quantized layer stores below 32 bits, with its bit width."""
    if isinstance(module, QuantizedLayer) and module.weight_quantizer is not None and module.weight_precision < 32:
        return module.weight, module.weight_precision
    return None


def _macs(module: nn.Module, output: Any) -> int:
    if not isinstance(output, torch.Tensor):
        return 0
    if isinstance(module, CONVOLUTIONS):
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


@torch.no_grad()
def summary(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor], *, name: str = "") -> Summary:
    """Per-layer parameters, bits and MACs of ``model`` on ``example_input`` (batch first).

    See the module docstring for the definitions. The model's parameters, buffers and
    train/eval modes are unchanged afterwards.
    """
    inputs = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        raise TypeError("summary: example_input must be a tensor (or a tuple of tensors) with a batch dimension first")
    if inputs[0].dim() == 0:
        raise ValueError("summary: example_input needs a batch dimension")
    batch = int(inputs[0].shape[0]) or 1

    layers = _layers(model)
    rows: dict[int, LayerSummary] = {}
    order: list[int] = []
    hooks = []

    def make_hook(layer_name: str, module: nn.Module):
        def hook(m: nn.Module, args: Any, output: Any) -> None:
            row = rows[id(m)]
            if row.calls == 0:
                out = (
                    output[0]
                    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor)
                    else output
                )
                row.output_shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
                order.append(id(m))
            row.calls += 1
            macs = _macs(m, output)
            row.macs += macs
            if row.weight_bits == 1 and row.input_bits == 1:
                row.binary_macs += macs

        return hook

    seen: set[int] = set()
    for layer_name, module in layers:
        if id(module) in seen:
            continue  # the same module under two names: one row
        seen.add(id(module))
        w_bits, in_bits = _bits(module)
        binary_w = _binary_weight(module)
        rows[id(module)] = LayerSummary(
            name=layer_name or type(model).__name__,
            type=type(module).__name__,
            output_shape=None,
            params=sum(p.numel() for p in module.parameters()),
            binary_params=binary_w.numel() if binary_w is not None else 0,
            weight_bits=w_bits,
            input_bits=in_bits,
            macs=0,
            binary_macs=0,
        )
        hooks.append(module.register_forward_hook(make_hook(layer_name, module)))

    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        model(*inputs)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode

    for row in rows.values():
        row.macs //= batch
        row.binary_macs //= batch
    called = [rows[i] for i in order]
    uncalled = [r for i, r in rows.items() if i not in set(order) and r.params]
    binary_ids: set[int] = set()
    for _, module in layers:
        w = _binary_weight(module)
        if w is not None:
            binary_ids.add(id(w))
    lowbit_bits: dict[int, int] = {}
    for _, module in layers:
        found = _lowbit_weight(module)
        if found is not None:
            lowbit_bits.setdefault(id(found[0]), found[1])
    unique = {id(p): p for p in model.parameters()}
    lowbit: dict[int, int] = {}
    for i, p in unique.items():
        if i in lowbit_bits:
            lowbit[lowbit_bits[i]] = lowbit.get(lowbit_bits[i], 0) + p.numel()
    return Summary(
        rows=called + uncalled,
        total_params=sum(p.numel() for p in unique.values()),
        binary_params=sum(p.numel() for i, p in unique.items() if i in binary_ids),
        model_name=name,
        input_shape=tuple(inputs[0].shape),
        lowbit_params=dict(sorted(lowbit.items())),
    )
