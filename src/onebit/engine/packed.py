"""``PackedModel``: a model lowered to the packed engine's graph, runnable and savable."""

from __future__ import annotations

import copy
import os
import time
import warnings
from typing import Any

import torch
from torch import nn

from onebit.engine import fileformat, ops
from onebit.engine import graph as G
from onebit.engine.fuse import fuse
from onebit.engine.kernels.memory_formats import NATIVE_MIN_ELEMENTS
from onebit.engine.kernels.registry import direct
from onebit.engine.steps import Step

__all__ = ["PackedModel", "pack", "load", "Step", "InputError", "FallbackWarning"]

_F32 = torch.float32


class InputError(TypeError, ValueError):
    """A call with an input the model cannot take (wrong type, dtype, rank, channels or device).

    Both a ``TypeError`` and a ``ValueError``, so either ``except`` catches it."""


class PackedModel(nn.Module):
    """A bit-packed, inference-only twin of a onebit model.

    ``forward(x)`` takes the float32 input the original model takes (``[N, C, H, W]``,
    any strides) and returns what the original model returns, bit for bit: binary layers
    compute the layers' own arithmetic (exact integer sums, then scale and bias) and every
    other op is the model's own torch op on the same values in the same memory format
    (``pack(..., fold_batchnorm=True)`` trades that for one op less per block: equal up to
    float rounding). :attr:`fallbacks` lists binary layers that run in float.

    Build one with :func:`onebit.engine.pack`, save it with :meth:`save`, load it with
    :func:`onebit.engine.load`. Calls from several threads at once are safe: a call keeps
    all its intermediate values to itself.
    """

    def __init__(self, graph: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        G.validate(graph, tensors)
        self.graph = copy.deepcopy(graph)
        self._keys: dict[str, str] = {}
        for key, t in tensors.items():
            attr = "t_" + "".join(c if c.isalnum() or c == "_" else "_" for c in key)
            while attr in self._buffers:
                attr += "_"
            self.register_buffer(attr, t)
            self._keys[key] = attr
        self._place_in_huge_pages()
        self._steps = self._compile()

    def _place_in_huge_pages(self) -> None:
        """Tensors of 2 MiB or more (weights a call may stream from memory) into transparent huge pages."""
        for name, t in self._buffers.items():
            if t is not None:
                self._buffers[name] = ops.in_huge_pages(t)

    def __getstate__(self):  # copies and pickles rebuild the steps (they hold native weight caches)
        state = dict(super().__getstate__())
        state.pop("_steps", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._place_in_huge_pages()  # a copy's tensors are new allocations
        self._steps = self._compile()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._steps = self._compile()  # steps hold tensor references: refresh after .to() & co
        return out

    def _compile(self) -> list[Step]:
        """The :class:`Step` list :meth:`forward` runs: the graph fused (see :mod:`onebit.engine.fuse`); the
        graph's input and outputs read once, for the calls."""
        spec = self.graph["input"]
        self._input_name = spec["name"]
        self._input_spec = (spec["rank"], spec["channels"], 1 if spec.get("channel_dim", 1) == 1 else -1)
        self._output_names = tuple(self.graph["outputs"])
        self._output_kind = self.graph.get("output_kind", "tensor")
        return fuse(self.graph, self.named_graph_tensors())

    # -- running ------------------------------------------------------------

    @property
    def fallbacks(self) -> list[dict[str, str]]:
        """The layers with binary weights or a binary input that run in float: ``[{module, reason}]``."""
        return [dict(f) for f in self.graph.get("fallbacks", [])]

    @property
    def input_channels(self) -> int:
        return int(self.graph["input"]["channels"])

    def _check_input(self, x: Any) -> None:
        rank, channels, channel_dim = self._input_spec
        if type(x) is torch.Tensor and x.dtype is _F32 and x.is_cpu:  # the common case first, quickly
            if x.dim() == rank and x.shape[channel_dim] == channels:
                return
        if not isinstance(x, torch.Tensor):
            raise InputError(f"PackedModel: expected a torch.Tensor input, got {type(x).__name__}")
        if x.dtype != torch.float32:
            raise InputError(f"PackedModel: expected a float32 input, got {x.dtype}")
        if x.device.type != "cpu":
            raise InputError(f"PackedModel: the packed engine runs on the CPU, got an input on {x.device}")
        if channel_dim == -1:  # [N, ..., F] read by linear layers: the other dims are free
            if x.dim() != rank or x.shape[-1] != channels:
                dims = "[N, " + "".join(f"L{i}, " for i in range(1, rank - 1)) + "F]"
                raise InputError(
                    f"PackedModel: expected input of shape {dims} with F = {channels} features, "
                    f"got shape {list(x.shape)}"
                )
        elif x.dim() != rank or x.shape[1] != channels:
            dims = {4: "[N, C, H, W]", 3: "[N, C, L]", 2: "[N, F]"}.get(rank, f"rank {rank}")
            what = f"F = {channels} features" if rank == 2 else f"C = {channels} channels"
            raise InputError(f"PackedModel: expected input of shape {dims} with {what}, got shape {list(x.shape)}")

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        fmt = _memory_format(x)
        return self._output(self._run(x, fmt), fmt)

    def _run(
        self, x: torch.Tensor, fmt: torch.memory_format, times: list[list[float]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Run the steps on ``x``, the model's layout being ``fmt``: the values left (the outputs); each step's
        time appended to ``times``."""
        env: dict[str, torch.Tensor] = {self._input_name: x}
        nchw = fmt is torch.contiguous_format
        for k, step in enumerate(self._steps):
            args = [env[i] for i in step.inputs]
            if nchw and step.keeps_layout:
                pass  # it rounds as the model's layout on its input as it comes (run with model_format)
            elif step.model_layout:  # an op that rounds by layout runs in the model's own
                args = (
                    _channels_last(args) if nchw and _same_in_channels_last(step, args) else _in_format_all(args, fmt)
                )
            elif nchw and (step.channels_last or (step.joins_maps and _mixed_layouts(args))):
                args = _channels_last(args)
            start = time.perf_counter() if times is not None else 0.0
            try:
                if nchw and step.keeps_layout:
                    out = step.run(*args, model_format=fmt)
                else:
                    out = step.run(*args, memory_format=fmt) if nchw and step.writes_nchw else step.run(*args)
            except (RuntimeError, ValueError) as error:
                raise InputError(
                    f"PackedModel: {_where(step)} cannot take the input of shape {list(x.shape)}: {error}"
                ) from error
            env[step.output] = out if step.relayout is None else out.contiguous()
            if times is not None:
                times[k].append(time.perf_counter() - start)
            for ref in step.free:
                del env[ref]
        return env

    def _output(self, env: dict[str, torch.Tensor], fmt: torch.memory_format):
        """The graph's outputs, as the model returns them (4-d ones in the model's memory format)."""
        kind = self._output_kind
        if kind == "tensor":
            return _in_format(env[self._output_names[0]], fmt)
        outs = [_in_format(env[o], fmt) for o in self._output_names]
        return tuple(outs) if kind == "tuple" else outs

    class Profile(list):
        """:meth:`profile`'s rows (``{name, op, module, ms, share}`` dicts, a list as any other)
        that print as a table: one line per step, then the total."""

        def __rich__(self):
            from rich import box
            from rich.table import Table

            total = sum(r["ms"] for r in self)
            t = Table(
                title=f"packed model profile: {len(self)} steps, {total:.3f} ms",
                box=box.SIMPLE_HEAD,
                title_justify="left",
                pad_edge=False,
            )
            for h in ("step", "op", "module", "ms", "share"):
                t.add_column(h, justify="right" if h in ("ms", "share") else "left", overflow="fold")
            for r in self:
                t.add_row(str(r["name"]), str(r["op"]), str(r["module"] or ""), f"{r['ms']:.3f}", f"{r['share']:.1%}")
            t.add_section()
            t.add_row("total", "", "", f"{total:.3f}", "100.0%" if self else "")
            return t

        def __str__(self) -> str:
            import io as _io

            from rich.console import Console

            buffer = _io.StringIO()
            Console(file=buffer, width=120, color_system=None, force_terminal=False, highlight=False).print(self)
            return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()).strip("\n") + "\n"

        def __repr__(self) -> str:
            return f"Profile({list.__repr__(self)})"

    @torch.no_grad()
    def profile(self, x: torch.Tensor, repeat: int = 10) -> PackedModel.Profile:
        """Time every step on ``x``: a list of ``{name, op, module, ms, share}``, median over ``repeat`` runs,
        that prints as a table (``print(packed.profile(x))``).

        A step is a graph node, or a binary convolution with the packing of its input
        (op ``pack+binary_conv2d``), which run as one native call."""
        self._check_input(x)
        times: list[list[float]] = [[] for _ in self._steps]
        for _ in range(max(1, repeat)):
            self._run(x, _memory_format(x), times)
        rows = []
        for k, step in enumerate(self._steps):
            ts = sorted(times[k])
            rows.append({"name": step.output, "op": step.label, "module": step.module, "ms": 1e3 * ts[len(ts) // 2]})
        total = sum(r["ms"] for r in rows) or 1.0
        for r in rows:
            r["share"] = r["ms"] / total
        return PackedModel.Profile(rows)

    # -- files --------------------------------------------------------------

    def named_graph_tensors(self) -> dict[str, torch.Tensor]:
        """The graph's tensors by their graph key (packed weights in their kernel layout)."""
        return {key: getattr(self, attr) for key, attr in self._keys.items()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the model to one safetensors file (atomically); see :mod:`onebit.engine.fileformat`."""
        fileformat.write(path, self.graph, self.named_graph_tensors())

    def extra_repr(self) -> str:
        counts: dict[str, int] = {}
        for node in self.graph["nodes"]:
            counts[node["op"]] = counts.get(node["op"], 0) + 1
        return ", ".join(f"{op}: {n}" for op, n in counts.items())


def _where(step: Step) -> str:
    """A step as an error names it: its model's module, else its value."""
    return f"layer '{step.module}' (op {step.label})" if step.module else f"op {step.output!r} ({step.label})"


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format torch's convolutions give their outputs for input ``x``."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _in_format(value: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """A 4-d ``value`` laid out as the model's own tensor is in memory format ``fmt`` (float32 ones
    copied by the engine's native copy); other ranks as they are.

    torch's convolutions choose their path by the strides, and a shape with unit dimensions
    (``[N, C, 1, 1]``) is contiguous in both formats. With an NCHW input every tensor of the model
    has the plain contiguous strides, so a value gets exactly those. With a channels_last input the
    model's ambiguous tensors take whichever strides its ops give, as the packed model's values do
    (they come from the same ops on the same formats): a value already contiguous in
    channels_last is kept as it is."""
    if value.dim() != 4:
        return value
    if fmt == torch.contiguous_format:
        if value.stride() == _contiguous_strides(value.shape):
            return value
        if value.is_contiguous():  # ambiguous: the same memory order with other strides
            return value.clone(memory_format=torch.contiguous_format)
    elif value.is_contiguous(memory_format=fmt):
        return value
    if value.dtype == torch.float32 and value.device.type == "cpu" and direct(value):
        if value.numel() >= NATIVE_MIN_ELEMENTS:  # smaller copies are quicker in torch than a checked native call
            return ops.relayout(value, fmt)
    return value.contiguous(memory_format=fmt)


def _in_format_all(args: list, fmt: torch.memory_format) -> list:
    return [_in_format(a, fmt) for a in args]


def _same_in_channels_last(step: Step, args: list) -> bool:
    """Whether a layout-bound step gives the model's NCHW bits on channels_last inputs too: a float conv
    that torch runs with the same summation order in both layouts for this shape (asked of torch once per
    shape, :class:`~onebit.engine.layout_probe.LayoutProbe`); eager float32 calls only."""
    if step.layout_probe is None or len(args) != 1:
        return False
    x = args[0]
    if not (type(x) is torch.Tensor and x.dtype == torch.float32 and x.dim() == 4 and direct(x)):
        return False
    # a map with one channel or one pixel is contiguous in both formats, and torch's conv picks its path by
    # the strides it happens to have: it keeps the model's
    return x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and step.layout_probe(x)


def _mixed_layouts(args: list) -> bool:
    """Whether a step's 4-d maps come in both layouts (an NCHW one meets a channels_last one)."""
    nchw = other = False
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() == 4:
            if a.is_contiguous():
                nchw = True
            else:
                other = True
    return nchw and other


def _channels_last(args: list) -> list:
    """A layout-free step's inputs with its 4-d maps in channels_last memory (the values are the same)."""
    return [_in_format(a, torch.channels_last) if isinstance(a, torch.Tensor) else a for a in args]


def _contiguous_strides(shape: torch.Size) -> tuple[int, int, int, int]:
    """The strides torch gives a new contiguous ``[N, C, H, W]`` tensor."""
    _, c, h, w = shape
    return (c * h * w, h * w, w, 1)


def load(path: str | os.PathLike) -> PackedModel:
    """Load a :class:`PackedModel` saved with :meth:`PackedModel.save` (checked as
    :func:`onebit.engine.fileformat.read` describes; :class:`~onebit.engine.FormatError` when invalid)."""
    graph, tensors = fileformat.read(path)
    try:
        return PackedModel(graph, tensors)
    except G.GraphError as error:
        raise fileformat.format_error(path, str(error)) from None


def pack(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    strict: bool = False,
    fold_batchnorm: bool = False,
) -> PackedModel:
    """Lower an eval-mode onebit/torch model to a :class:`PackedModel`.

    ``example_input``: a float32 ``[N, C, H, W]`` (or ``[N, F]``) tensor the model accepts;
    it fixes the input rank and channel count (for an input read only by linear layers,
    ``[N, ..., F]``, the feature count: its other dimensions stay free) and is run once
    through the model to record shapes. Raises ``ValueError`` (:class:`~onebit.engine.UnsupportedModelError`)
    naming the first module the engine cannot run.

    Every binary layer -- a +-1 input (a sign input quantizer, or a sign right before a
    layer without one) and sign or magnitude-aware weights, with or without a bias -- runs
    on the packed kernels, bit-identical to the model (``fl(fl(acc * scale) + bias)``, the
    layers' own arithmetic). A layer with binary weights or a binary input that cannot
    (e.g. a float input, ``padding_mode='reflect'``) runs in float as the model computes
    it, its +-1 weights still stored as bits; :attr:`PackedModel.fallbacks` lists each with
    the reason. ``strict=False`` warns once, naming them; ``strict=True`` raises an
    :class:`~onebit.engine.UnsupportedModelError` naming every one.

    ``fold_batchnorm=True``: a binary conv with magnitude-aware weights followed by a
    BatchNorm gets the BatchNorm folded into its per-channel scale and bias (one op less;
    equal to the model up to float rounding, no longer bit for bit). The default keeps the
    BatchNorm as the model's own op: bit-identical.

    """
    from onebit.engine.lowering import UnsupportedModelError, lower

    if not isinstance(model, nn.Module):
        raise TypeError(f"pack: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.dtype != torch.float32:
        raise InputError("pack: example_input must be a float32 tensor")
    if not 2 <= example_input.dim() <= 5:
        raise InputError(
            f"pack: example_input must be batched, e.g. [N, C, H, W], got shape {list(example_input.shape)}"
        )
    # modules whose forward depends on the mode: BatchNorm (batch statistics) and dropout
    mode_dependent = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    training = [
        name or type(model).__name__
        for name, m in model.named_modules()
        if m.training and isinstance(m, mode_dependent)
    ]
    if training:
        raise ValueError(f"pack: the model must be in eval mode (call model.eval()); '{training[0]}' is training")
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        if p.device.type != "cpu" or (p.is_floating_point() and p.dtype != torch.float32):
            raise ValueError(f"pack: the packed engine runs float32 CPU models; '{name}' is {p.dtype} on {p.device}")
    graph, tensors = lower(model, example_input, fold_batchnorm=fold_batchnorm)
    fallbacks = graph.get("fallbacks", [])
    if fallbacks:
        listing = "; ".join(f"'{f['module']}': {f['reason']}" for f in fallbacks)
        if strict:
            raise UnsupportedModelError(
                f"pack(strict=True): {len(fallbacks)} binary layer(s) would run in float: {listing}"
            )
        warnings.warn(f"pack: {len(fallbacks)} binary layer(s) run in float: {listing}", FallbackWarning, stacklevel=2)
    return PackedModel(graph, tensors)


class FallbackWarning(UserWarning):
    """A binary layer of a packed model runs in float (see :attr:`PackedModel.fallbacks`)."""
