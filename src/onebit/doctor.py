r"""Why a binary network does not learn: one forward and backward pass with hooks, findings per layer.

:func:`doctor` runs the model in train mode on a batch, backpropagates a loss and looks
at every *sign site* and at every parameter's gradient. A sign site is found however
the sign is written: a layer's 1-bit input quantizer, a ``QActivation``, a bare 1-bit
quantizer, a ``torch.sign`` / ``Tensor.sign`` call or a custom ``torch.autograd.Function``
with +-1 (or 0) outputs run anywhere in forward (recorded while the model runs, with a
``TorchFunctionMode``), or a module whose outputs are all in {-1, 0, +1} although its
inputs are not. Each :class:`Finding` names the module whose ``forward`` holds the
problem by its qualified name in ``model.named_modules()`` (``<model>`` for the model's
own ``forward``), its ``kind`` and what to do; root causes come first, then their
consequences on the gradients:

==================== ===================================================================
kind                 detected when
==================== ===================================================================
no_binarization      no sign ran at all: the model is a float network
constant_output      >= 99% of a sign's output positions are the same for every example
                     of the batch (e.g. a ReLU straight into a sign: all +1)
outside_clip         >= 99% of a sign's inputs (or of a layer's latent binary weights)
                     lie where its straight-through estimator passes no gradient
blocked_gradient     a sign whose pseudo-gradient is zero everywhere (``torch.sign``
                     without a straight-through estimator) on >= 99% of its inputs
sign_of_zero         >= 1% of a sign's inputs are exactly 0 (``torch.sign(0) = 0``;
                     onebit's sign gives +1, a hand-written one may not)
zero_gradient        a layer's parameters receive no or an all-zero gradient
nan_gradient         a layer's parameter gradient contains NaN or infinity
exploding_gradient   a layer's gradient RMS is >= 1e4 times the median over layers
vanishing_gradient   going from the output to the input, the gradient RMS drops >= 1e3x
                     from one layer to the next (reported at the first layer after the drop)
mutates_parameter    a module changes a parameter inside ``forward`` (e.g.
                     ``self.weight.data = sign(self.weight.data)``, or a parent clamping
                     its BatchNorms' weights): the module whose code writes is named
                     (not a quantizer calibrating itself on its first training batch:
                     an ``int8`` step while its ``calibrated`` buffer is False)
nan_activation       the first layer whose output contains NaN or infinity
==================== ===================================================================

The pseudo-gradient of each sign is measured, not assumed: the quantizer (or the
custom autograd Function, or ``torch.sign``) is re-run on its recorded input with
autograd, so custom quantizers are covered too. A gradient
counts as passing where it is at least 1e-3 of the quantizer's gradient at 0.

Without ``targets`` the loss is a fixed random projection of the output (it reaches
every output unit, unlike ``sum``, which a final BatchNorm would cancel). With integer
``targets`` and no ``loss_fn`` it is cross-entropy, otherwise mean squared error.

The model is left as it was: parameters, buffers (BatchNorm statistics), ``.grad``
and train/eval modes are restored, and no hook remains.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console, Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from torch import nn
from torch.overrides import TorchFunctionMode

from onebit import quant
from onebit.canonize.handles import ModelSnapshot, preserve
from onebit.nn.layers import QActivation, QuantizedLayer

__all__ = ["Finding", "SignSite", "LayerGradient", "Report", "doctor", "KINDS"]

KINDS = (
    "no_binarization",
    "constant_output",
    "outside_clip",
    "blocked_gradient",
    "sign_of_zero",
    "zero_gradient",
    "nan_gradient",
    "exploding_gradient",
    "vanishing_gradient",
    "mutates_parameter",
    "nan_activation",
)

# kinds that follow from others (reported after the root causes)
CONSEQUENCES = ("zero_gradient", "nan_gradient", "exploding_gradient", "vanishing_gradient")

CONSTANT_FRACTION = 0.99
BLOCKED_FRACTION = 0.99
ZERO_FRACTION = 0.01
EXPLODING_RATIO = 1e4
VANISHING_RATIO = 1e-3


@dataclass
class Finding:
    """One problem: ``layer`` (qualified module name), ``kind`` (one of :data:`KINDS`), ``message`` (what to do)."""

    layer: str
    kind: str
    message: str
    value: float | None = None

    def __str__(self) -> str:
        return f"{self.layer or '<model>'}: {self.kind}: {self.message}"


@dataclass
class SignSite:
    """Statistics of one sign site over the batch."""

    layer: str
    quantizer: str
    inputs: int
    constant: float  # fraction of output positions equal for every example
    blocked: float  # fraction of inputs where the pseudo-gradient is ~0
    zeros: float  # fraction of inputs exactly 0
    mean: float
    std: float
    minimum: float
    maximum: float
    weights: bool = False  # a site on latent weights rather than activations


@dataclass
class LayerGradient:
    """Gradient of one layer's parameters: RMS over all of them, in forward order."""

    layer: str
    type: str
    params: int
    rms: float
    finite: bool
    received: bool


@dataclass
class Report:
    """``ok`` when there are no findings; ``findings``, ``sites`` and ``gradients`` in forward order."""

    findings: list[Finding] = field(default_factory=list)
    sites: list[SignSite] = field(default_factory=list)
    gradients: list[LayerGradient] = field(default_factory=list)
    loss: float = math.nan
    batch: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def of_kind(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def layers(self, kind: str | None = None) -> list[str]:
        return [f.layer for f in self.findings if kind is None or f.kind == kind]

    def _renderables(self) -> list:
        parts: list = []
        head = Text(f"onebit doctor: batch of {self.batch}, loss {self.loss:.4g}, ", style="bold")
        head.append(
            f"{'ok' if self.ok else f'{len(self.findings)} finding' + ('s' if len(self.findings) != 1 else '')}",
            style="green" if self.ok else "red",
        )
        parts.append(head)
        if self.sites:
            t = Table(
                title="sign sites (input statistics; const = outputs equal across the batch)",
                box=box.SIMPLE_HEAD,
                title_justify="left",
                pad_edge=False,
            )
            for h in ("layer", "quantizer", "in mean", "in std", "const", "no grad", "zeros"):
                text = h in ("layer", "quantizer")
                t.add_column(h, justify="left" if text else "right", no_wrap=not text, overflow="fold")
            for s in self.sites:
                t.add_row(
                    s.layer + (" (weights)" if s.weights else ""),
                    s.quantizer,
                    f"{s.mean:.3g}",
                    f"{s.std:.3g}",
                    "-" if s.weights else _pct(s.constant),
                    _pct(s.blocked),
                    _pct(s.zeros),
                )
            parts.append(t)
        if self.gradients:
            t = Table(title="gradients (forward order)", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
            for h in ("layer", "type", "params", "grad RMS"):
                text = h in ("layer", "type")
                t.add_column(h, justify="left" if text else "right", no_wrap=not text, overflow="fold")
            for g in self.gradients:
                rms = "none" if not g.received else ("non-finite" if not g.finite else f"{g.rms:.3g}")
                t.add_row(g.layer, g.type, f"{g.params:,}", rms)
            parts.append(t)
        if self.findings:
            parts.append(Text("findings", style="italic"))
            for f in self.findings:
                line = Text(f"{f.layer or '<model>'}", style="bold")
                line.append(f"  {f.kind}", style="red")
                parts.append(line)
                parts.append(Padding(Text(f.message), (0, 0, 0, 4)))
        else:
            parts.append(
                Text(
                    "No problems found: every sign sees varied, in-range inputs and every layer gets a finite gradient."
                )
            )
        return parts

    def __rich__(self):
        return Group(*self._renderables())

    def __str__(self) -> str:
        buffer = io.StringIO()
        console = Console(file=buffer, width=110, color_system=None, force_terminal=False, highlight=False, emoji=False)
        for r in self._renderables():
            console.print(r)
        return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()).strip("\n") + "\n"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------
# sign sites


def _is_ternary(x: torch.Tensor) -> bool:
    return bool(((x == 1) | (x == -1) | (x == 0)).all())


def _derivative(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fn(x), d fn / dx elementwise) via autograd on a detached copy."""
    with torch.enable_grad():
        x_ = x.detach().clone().requires_grad_(True)
        y = fn(x_)
        if not isinstance(y, torch.Tensor) or not y.requires_grad:
            return (y.detach() if isinstance(y, torch.Tensor) else y), torch.zeros_like(x)
        (g,) = torch.autograd.grad(y.sum(), x_, allow_unused=True)
    return y.detach(), (g if g is not None else torch.zeros_like(x))


def _clip_of(q: Any) -> float | None:
    return getattr(q, "clip", None)


def _quantizer_name(q: Any) -> str:
    if isinstance(q, nn.Module):
        extra = q.extra_repr()
        return f"{type(q).__name__}({extra})" if extra else type(q).__name__
    return getattr(q, "__name__", type(q).__name__)


class _SiteRecord:
    def __init__(self, layer: str, fn: Callable, qname: str, clip: float | None, weights: bool = False) -> None:
        self.layer, self.fn, self.qname, self.clip, self.weights = layer, fn, qname, clip, weights
        self.x: torch.Tensor | None = None


def _site_stats(rec: _SiteRecord, x: torch.Tensor, weights: bool = False) -> tuple[SignSite, torch.Tensor, float]:
    y, d = _derivative(rec.fn, x)
    try:
        _, d0 = _derivative(rec.fn, torch.zeros(1, dtype=x.dtype, device=x.device))
    except Exception:  # a sign with shape requirements (a custom Function): measure at 0 in x's shape
        _, d0 = _derivative(rec.fn, torch.zeros_like(x))
    d0 = float(d0.abs().max()) if d0.numel() else 0.0
    tol = 1e-3 * d0
    blocked = float((d.abs() <= tol).float().mean()) if d.numel() else 0.0
    constant = 0.0
    if not weights and x.dim() >= 1 and x.shape[0] >= 2 and isinstance(y, torch.Tensor):
        same = (y == y[:1]).all(dim=0)
        constant = float(same.float().mean())
    xf = x.detach().float()
    site = SignSite(
        layer=rec.layer,
        quantizer=rec.qname,
        inputs=x.numel(),
        constant=constant,
        blocked=blocked,
        zeros=float((xf == 0).float().mean()),
        mean=float(xf.mean()),
        std=float(xf.std()) if xf.numel() > 1 else 0.0,
        minimum=float(xf.min()),
        maximum=float(xf.max()),
        weights=weights,
    )
    return site, y, d0


def _sign_findings(site: SignSite, y: torch.Tensor, d0: float, clip: float | None) -> list[Finding]:
    out: list[Finding] = []
    name = site.layer
    if not site.weights and site.constant >= CONSTANT_FRACTION:
        values = torch.unique(y).tolist() if isinstance(y, torch.Tensor) and y.numel() < 10_000_000 else []
        what = "+1" if values == [1.0] else ("-1" if values == [-1.0] else "one value per position")
        if site.minimum >= 0:
            why = (
                f"its input is never negative (min {site.minimum:.3g}): a ReLU or another non-negative operation "
                "feeds the sign. Remove that activation or put a BatchNorm between it and the sign"
            )
        elif site.maximum < 0:
            why = (
                f"its input is always negative (max {site.maximum:.3g}). "
                "Put a BatchNorm (or a learnable bias) before the sign"
            )
        else:
            why = (
                "each input position has the same sign for every example "
                f"(input mean {site.mean:.3g}, std {site.std:.3g}). "
                "Normalize the input of the sign per channel with a BatchNorm"
            )
        out.append(
            Finding(
                name,
                "constant_output",
                f"{site.constant:.1%} of the sign's outputs are identical across the batch (all {what}), so it "
                f"carries no information. Cause: {why}.",
                site.constant,
            )
        )
    if site.blocked >= BLOCKED_FRACTION:
        if d0 == 0.0:
            out.append(
                Finding(
                    name,
                    "blocked_gradient",
                    f"the sign passes no gradient ({site.blocked:.1%} of its inputs get a zero pseudo-gradient, "
                    "even at 0): it has no straight-through estimator, like torch.sign. Use "
                    "onebit.quant.Sign ('ste_sign') or another quantizer with a pseudo-gradient.",
                    site.blocked,
                )
            )
        else:
            where = (
                f"outside the straight-through clip |x| <= {clip:g}"
                if clip is not None
                else "where its pseudo-gradient is ~0"
            )
            subject = "latent weights" if site.weights else "inputs"
            fix = (
                "Clip the latent weights to the clip range after each step (or lower the learning rate)"
                if site.weights
                else "Normalize what feeds the sign (a BatchNorm before it) or use a wider clip"
            )
            out.append(
                Finding(
                    name,
                    "outside_clip",
                    f"{site.blocked:.1%} of its {subject} lie {where} (mean {site.mean:.3g}, std {site.std:.3g}), "
                    f"so almost no gradient passes the sign. {fix}.",
                    site.blocked,
                )
            )
    if not site.weights and site.zeros >= ZERO_FRACTION:
        gives_zero = isinstance(y, torch.Tensor) and bool((y == 0).any())
        if gives_zero:
            msg = (
                f"{site.zeros:.1%} of its inputs are exactly 0 and it maps them to 0 (like torch.sign), so those "
                "activations are neither +1 nor -1 and differ from what a packed engine computes. Use "
                "onebit.math.sign / onebit.quant.Sign, which define sign(0) = +1."
            )
            if site.minimum >= 0:
                msg += (
                    f" Its input is never negative (min {site.minimum:.3g}): a ReLU or another non-negative "
                    "operation feeds the sign, which then outputs only 0 and +1. Remove it or put a BatchNorm "
                    "between it and the sign."
                )
        else:
            msg = (
                f"{site.zeros:.1%} of its inputs are exactly 0. onebit's sign maps them to +1, but a hand-written "
                "torch.sign would give 0; zeros usually come from a ReLU before the sign. Put a BatchNorm before it."
            )
        out.append(Finding(name, "sign_of_zero", msg, site.zeros))
    return out


# ---------------------------------------------------------------------------
# signs and parameter writes in code: recorded while the model runs

_SIGN_OPS = frozenset({"sign", "sgn", "sign_", "sgn_"})
_DATA_DESCRIPTOR = torch._C.TensorBase.__dict__["data"]


def _first_tensor(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) and out else out


def _looks_like_sign(x: Any, y: Any) -> bool:
    """``y`` is a +-1/0 float tensor of ``x``'s shape and ``x`` is not (a sign of ``x``)."""
    return (
        isinstance(x, torch.Tensor)
        and isinstance(y, torch.Tensor)
        and x.is_floating_point()
        and y.is_floating_point()
        and y.shape == x.shape
        and y.numel() > 0
        and _is_ternary(y.detach())
        and not _is_ternary(x.detach())
    )


class _Recorder(TorchFunctionMode):
    """Records, while the model runs, the signs written in code (``torch.sign``, ``Tensor.sign``,
    custom autograd Functions with +-1 outputs) and the writes to parameters, each with the module
    whose ``forward`` runs it (the innermost one on the call stack)."""

    def __init__(self, param_at: dict[int, str], skip: Callable[[], bool], sites: list) -> None:
        super().__init__()
        self.param_at, self.skip = param_at, skip
        self.stack: list[tuple[nn.Module, str]] = []
        self.sites = sites  # (_SiteRecord, input) in forward order, shared with the module hooks
        self.writes: dict[str, set[str]] = {}  # module -> qualified parameter names it writes
        self.outputs: dict[int, torch.Tensor] = {}  # sign outputs by id (a sign of a sign is the same site)
        self.in_function = 0
        self.inside: set[int] = set()  # modules on the stack when a sign was recorded

    def _param(self, t: torch.Tensor) -> str | None:
        ptr = t.untyped_storage().data_ptr()
        return self.param_at.get(ptr) if ptr else None

    def _record(self, fn: Callable, qname: str, x: torch.Tensor, out: Any) -> None:
        param = self._param(x)
        if param is not None and not x.requires_grad:
            return  # a sign of `weight.data`: a parameter write, reported as such
        layer = self.stack[-1][1] if self.stack else ""
        rec = _SiteRecord(layer, fn, qname, _clip_of(fn), weights=param is not None)
        rec.x = x.detach().clone()
        self.sites.append((rec, rec.x))
        self.inside.update(id(m) for m, _ in self.stack)
        first = _first_tensor(out)
        if isinstance(first, torch.Tensor):
            self.outputs[id(first)] = first

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if target is not None and name == "__set__" and getattr(func, "__self__", None) is _DATA_DESCRIPTOR:
            self._write(target)
        elif target is not None and name.endswith("_") and not name.endswith("__"):
            self._write(target)
        if name in _SIGN_OPS and target is not None and target.is_floating_point():
            fresh = not self.in_function and id(target) not in self.outputs and not self.skip()
            x = target.detach().clone() if fresh and name.endswith("_") else target
            out = func(*args, **kwargs)
            if fresh:
                self._record(torch.sign, "torch.sign", x, out)
            return out
        return func(*args, **kwargs)

    def _write(self, t: torch.Tensor) -> None:
        param = self._param(t)
        if param is not None:
            layer = self.stack[-1][1] if self.stack else ""
            self.writes.setdefault(layer, set()).add(param)

    def function_applied(self, cls: type, args: tuple, kwargs: dict, out: Any) -> None:
        """A custom autograd Function returned: a sign site when its first output is a sign of
        its first floating-point tensor input."""
        index = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        if index is None or self.skip() or not _looks_like_sign(args[index], _first_tensor(out)):
            return

        def rerun(t: torch.Tensor) -> torch.Tensor:
            return _first_tensor(cls.apply(*args[:index], t, *args[index + 1 :], **kwargs))

        self._record(rerun, cls.__name__, args[index], out)


class _FunctionTap:
    """Within the ``with`` block, report every ``torch.autograd.Function.apply`` to a recorder."""

    def __init__(self, recorder: _Recorder) -> None:
        self.recorder = recorder
        self.original = torch.autograd.Function.__dict__["apply"]

    def __enter__(self) -> _FunctionTap:
        original, recorder = self.original.__func__, self.recorder

        def apply(cls, *args, **kwargs):
            recorder.in_function += 1
            try:
                out = original(cls, *args, **kwargs)
            finally:
                recorder.in_function -= 1
            if not recorder.in_function:
                recorder.function_applied(cls, args, kwargs, out)
            return out

        torch.autograd.Function.apply = classmethod(apply)
        return self

    def __exit__(self, *exc) -> None:
        torch.autograd.Function.apply = self.original


# ---------------------------------------------------------------------------
# the run


def _loss(output: Any, targets: Any, loss_fn: Callable | None) -> torch.Tensor:
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"doctor: the model returned {type(output).__name__}, expected a tensor")
    if loss_fn is not None:
        return loss_fn(output, targets) if targets is not None else loss_fn(output)
    if targets is not None:
        if not targets.is_floating_point() and output.dim() >= 2:
            return F.cross_entropy(output, targets)
        return F.mse_loss(output, targets.to(output.dtype))
    g = torch.Generator().manual_seed(0)
    projection = torch.randn(output.shape, generator=g).to(output.dtype).to(output.device)
    return (output * projection).sum() / max(1, output.shape[0])


class _Probe:
    """The hooks of one doctor run and what they record while the model runs forward.

    ``site_of`` maps a module to its sign site (found by type before the run, or a
    hand-written sign found while it runs); ``handled`` holds the quantizers those sites
    cover; ``sites`` lists ``(site, input)`` in forward order; ``order`` the modules with
    parameters in first-call order; ``mutated`` the parameters each module's forward wrote;
    ``first_nonfinite`` the first leaf whose output is not finite.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.names = {id(m): n for n, m in model.named_modules()}
        self.site_of: dict[int, _SiteRecord] = {}
        self.handled: set[int] = set()
        self.sites: list[tuple[_SiteRecord, torch.Tensor]] = []
        self.order: list[str] = []
        self.mutated: dict[str, list[str]] = {}
        self.first_nonfinite: list[str] = []
        self._find_typed_sites()
        param_at: dict[int, str] = {}
        for full, p in model.named_parameters():
            param_at.setdefault(p.untyped_storage().data_ptr(), full)
        self.recorder = _Recorder(param_at, self._known_site_running, self.sites)

    def _find_typed_sites(self) -> None:
        """Sign sites known by type: 1-bit input quantizers of layers, QActivations, bare 1-bit quantizers."""
        for name, m in self.model.named_modules():
            if isinstance(m, QuantizedLayer) and quant.is_binary(m.input_quantizer):
                q = m.input_quantizer
                self.site_of[id(m)] = _SiteRecord(name, q, _quantizer_name(q), _clip_of(q))
                if isinstance(q, nn.Module):
                    self.handled.add(id(q))
            elif isinstance(m, QActivation) and quant.is_binary(m.quantizer):
                q = m.quantizer
                self.site_of[id(m)] = _SiteRecord(name, q, _quantizer_name(q), _clip_of(q))
                self.handled.add(id(q))
        for name, m in self.model.named_modules():
            if (
                isinstance(m, quant.Quantizer)
                and quant.is_binary(m)
                and id(m) not in self.handled
                and id(m) not in self.site_of
            ):
                if not (isinstance(self.modules.get(name.rpartition(".")[0]), QuantizedLayer)):
                    self.site_of[id(m)] = _SiteRecord(name, m, _quantizer_name(m), _clip_of(m))

    def _known_site_running(self) -> bool:
        """Signs inside onebit's layers and quantizers are sites already."""
        return any(id(m) in self.site_of or id(m) in self.handled for m, _ in self.recorder.stack)

    @contextlib.contextmanager
    def hooks(self) -> Iterator[None]:
        """The pre- and post-forward hooks on every module, removed (with their notes) on exit."""
        handles = []
        try:
            for m in self.model.modules():
                handles.append(m.register_forward_pre_hook(self._pre_hook))
                handles.append(m.register_forward_hook(self._post_hook))
            yield
        finally:
            for h in handles:
                h.remove()
            for m in self.model.modules():
                m.__dict__.pop("_doctor_before", None)

    def forward(self, args: tuple, train: bool) -> Any:
        """Run the model in train (or eval) mode with the hooks and the recorder;
        the parameter writes join ``mutated``."""
        self.model.train(train)
        with self.recorder, _FunctionTap(self.recorder):
            output = self.model(*args)
        self.recorder.outputs.clear()
        for layer, written in self.recorder.writes.items():
            self.mutated.setdefault(layer, []).extend(sorted(written))
        return output

    def _pre_hook(self, m: nn.Module, a: tuple) -> None:
        self.recorder.stack.append((m, self.names.get(id(m), "")))
        own = list(m._parameters.items())
        m.__dict__["_doctor_before"] = [(n, p, p.detach().clone()) for n, p in own if p is not None]
        rec = self.site_of.get(id(m))
        if rec is not None and rec.x is None and a and isinstance(a[0], torch.Tensor):
            rec.x = a[0].detach().clone()
            self.sites.append((rec, rec.x))

    def _post_hook(self, m: nn.Module, a: tuple, out: Any) -> None:
        name = self.names.get(id(m), "")
        if self.recorder.stack and self.recorder.stack[-1][0] is m:
            self.recorder.stack.pop()
        before = m.__dict__.pop("_doctor_before", [])
        self._note_writes(m, name, before)
        if before and name not in self.order:
            self.order.append(name)
        leaf = next(iter(m.children()), None) is None or isinstance(m, (QuantizedLayer, QActivation))
        if leaf and isinstance(out, torch.Tensor) and out.is_floating_point() and not self.first_nonfinite:
            if not bool(torch.isfinite(out).all()):
                self.first_nonfinite.append(name)
        if leaf:
            self._note_handwritten_sign(m, name, a, out)

    def _note_writes(self, m: nn.Module, name: str, before: list) -> None:
        """The module's own parameters that its forward replaced or changed."""
        for pname, p, value in before:
            now = m._parameters.get(pname)
            changed = now is not p
            if not changed and now is not None:
                d = now.detach()
                changed = bool(((d != value) & ~(torch.isnan(d) & torch.isnan(value))).any())
            if changed:
                self.mutated.setdefault(name, []).append(f"{name}.{pname}" if name else pname)

    def _note_handwritten_sign(self, m: nn.Module, name: str, a: tuple, out: Any) -> None:
        """A leaf module with ternary outputs from non-ternary inputs of the same shape is a sign site."""
        if (
            id(m) not in self.site_of
            and id(m) not in self.handled
            and id(m) not in self.recorder.inside
            and isinstance(out, torch.Tensor)
            and a
            and isinstance(a[0], torch.Tensor)
            and a[0].is_floating_point()
            and out.shape == a[0].shape
            and out.numel()
            and not isinstance(m, (quant.Quantizer, QuantizedLayer))
            and _is_ternary(out.detach())
            and not _is_ternary(a[0].detach())
        ):
            rec = _SiteRecord(name, m, type(m).__name__, _clip_of(m))
            rec.x = a[0].detach().clone()
            self.site_of[id(m)] = rec
            self.sites.append((rec, rec.x))


def _gradients(
    saved: ModelSnapshot, output: Any, targets: Any, loss_fn: Callable | None
) -> tuple[float, dict[int, torch.Tensor | None]]:
    """(loss, {id(parameter): its gradient}) for the parameters the model had before forward, from
    ``torch.autograd.grad`` (``.grad`` is not touched)."""
    loss = _loss(output, targets, loss_fn)
    trainable = [p for p, _ in saved.parameters.values() if p.requires_grad]
    grads = torch.autograd.grad(loss, trainable, allow_unused=True) if loss.requires_grad else [None] * len(trainable)
    return float(loss.detach()), {id(p): g for p, g in zip(trainable, grads)}


def _note_writes_outside_forward(probe: _Probe, saved: ModelSnapshot) -> None:
    """Parameters changed, or replaced, by someone other than their owner's forward (a parent's)."""
    mutated, names = probe.mutated, probe.names
    reported = {full for written in mutated.values() for full in written}
    for full, (p, value) in saved.parameters.items():
        module_name, _, pname = full.rpartition(".")
        if full in reported:
            continue
        d = p.detach()
        if bool(((d != value) & ~(torch.isnan(d) & torch.isnan(value))).any()):
            mutated.setdefault(module_name, []).append(full)
    for m_, pname, p in saved.slots:
        if m_._parameters.get(pname) is not p and names.get(id(m_), "") not in mutated:
            owner_name = names.get(id(m_), "")
            mutated.setdefault(owner_name, []).append(f"{owner_name}.{pname}" if owner_name else pname)


def _sign_sites(probe: _Probe, saved: ModelSnapshot) -> tuple[list[SignSite], list[Finding]]:
    """Statistics and findings of every recorded sign site, then of the latent weights of 1-bit weight quantizers."""
    site_list: list[SignSite] = []
    findings: list[Finding] = []
    for rec, x in probe.sites:
        site, y, d0 = _site_stats(rec, x, weights=rec.weights)
        site_list.append(site)
        findings += _sign_findings(site, y, d0, rec.clip)
    for name, m in probe.model.named_modules():
        if isinstance(m, QuantizedLayer) and quant.is_binary(m.weight_quantizer) and name in probe.order:
            q = m.weight_quantizer
            rec = _SiteRecord(name, q, _quantizer_name(q), _clip_of(q))
            site, y, d0 = _site_stats(rec, saved.parameters[f"{name}.weight" if name else "weight"][1], weights=True)
            site_list.append(site)
            findings += _sign_findings(site, y, d0, rec.clip)
    return site_list, findings


def _layer_gradients(probe: _Probe, grad_of: dict[int, torch.Tensor | None]) -> list[LayerGradient]:
    """Gradient RMS per layer with trainable parameters, in forward order (then layers never called)."""
    order = probe.order
    never_called = [
        n for n, m in probe.model.named_modules() if n not in order and any(True for _ in m.parameters(recurse=False))
    ]
    layer_grads: list[LayerGradient] = []
    for name in order + never_called:
        m = probe.modules[name]
        own = [p for p in m.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        gs = [grad_of.get(id(p)) for p in own]
        received = any(g is not None for g in gs)
        flat = torch.cat([g.detach().flatten().double() for g in gs if g is not None]) if received else torch.zeros(0)
        finite = bool(torch.isfinite(flat).all()) if received else True
        rms = float(flat.pow(2).mean().sqrt()) if received and finite and flat.numel() else 0.0
        layer_grads.append(LayerGradient(name, type(m).__name__, sum(p.numel() for p in own), rms, finite, received))
    return layer_grads


def _calibrating_modules(model: nn.Module) -> set[str]:
    """Names of the modules that set their parameters from their first training batch: a ``calibrate``
    method and a ``calibrated`` buffer still False (``int8`` quantizers)."""
    return {
        name
        for name, m in model.named_modules()
        if callable(getattr(m, "calibrate", None))
        and isinstance(getattr(m, "calibrated", None), torch.Tensor)
        and not bool(m.calibrated)
    }


def _drop_calibrations(mutated: dict[str, list[str]], calibrating: set[str]) -> None:
    """Forget the writes of a first-batch calibration (parameters owned by a ``calibrating`` module)."""
    for layer in list(mutated):
        kept = [w for w in mutated[layer] if w.rpartition(".")[0] not in calibrating]
        if kept:
            mutated[layer] = kept
        else:
            del mutated[layer]


def _mutation_findings(mutated: dict[str, list[str]]) -> list[Finding]:
    findings = []
    for name, written in mutated.items():
        prefix = f"{name}." if name else ""
        own = sorted({w[len(prefix) :] for w in written if w.startswith(prefix) and "." not in w[len(prefix) :]})
        others = sorted({w for w in written if w[len(prefix) :] not in own or not w.startswith(prefix)})
        what = ", ".join(
            [f"its parameter(s) {', '.join(own)}"] * bool(own)
            + [f"the parameter(s) {', '.join(others)}"] * bool(others)
        )
        findings.append(
            Finding(
                name,
                "mutates_parameter",
                f"its forward changes {what} (e.g. `self.weight.data = sign(self.weight.data)` or "
                "`bn.weight.data.clamp_(...)`): the optimizer then updates the written values instead "
                "of the latent weights (binarized weights never change sign again). Compute the "
                "binary or clamped value as a new tensor in forward (as onebit.nn layers do) and "
                "leave the parameter alone.",
            )
        )
    return findings


def _nonfinite_findings(first_nonfinite: list[str]) -> list[Finding]:
    if not first_nonfinite:
        return []
    return [
        Finding(
            first_nonfinite[0],
            "nan_activation",
            "is the first layer whose output contains NaN or infinity; check its inputs and "
            "parameters (a division by a zero variance, a log of a non-positive value, an "
            "overflowing scale).",
        )
    ]


def _no_binarization() -> Finding:
    return Finding(
        "",
        "no_binarization",
        "no sign ran in forward: no onebit quantizer, torch.sign / Tensor.sign, custom autograd "
        "Function with +-1 outputs or module with +-1 outputs, so this is a float network. "
        "Binarize with onebit.nn layers (QConv2d, QLinear, QActivation) or onebit.quant "
        "quantizers, or check that the binary path is taken in train mode.",
    )


def _in_report_order(findings: list[Finding], order: list[str]) -> list[Finding]:
    """Root causes first (in forward order), then what they cause on the gradients."""
    rank = {n: i for i, n in enumerate(order)}
    return sorted(
        findings,
        key=lambda f: (
            f.kind != "no_binarization",
            f.kind in CONSEQUENCES,
            rank.get(f.layer, -1 if f.layer == "" else len(rank)),
            KINDS.index(f.kind),
        ),
    )


def doctor(
    model: nn.Module,
    inputs: torch.Tensor | Sequence[torch.Tensor],
    targets: torch.Tensor | None = None,
    loss_fn: Callable | None = None,
    *,
    train: bool = True,
) -> Report:
    """Run ``model`` forward and backward on ``inputs`` and report why it may not learn.

    Args:
        inputs: a batch (first dimension) or a tuple of positional inputs; use at least a
            few dozen examples so that per-example statistics mean something.
        targets, loss_fn: see the module docstring for the loss used.
        train: run in train mode (default; BatchNorm uses batch statistics as in training).

    Returns a :class:`Report`; ``report.ok`` is True when there are no findings. The model is
    put back as it was (:func:`onebit.canonize.preserve`), and no hook remains.
    """
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    batch = int(args[0].shape[0]) if args and isinstance(args[0], torch.Tensor) and args[0].dim() else 0
    calibrating = _calibrating_modules(model) if train else set()
    with preserve(model) as saved:
        probe = _Probe(model)
        with probe.hooks():
            output = probe.forward(args, train)
            loss_value, grad_of = _gradients(saved, output, targets, loss_fn)
            _note_writes_outside_forward(probe, saved)
            _drop_calibrations(probe.mutated, calibrating)
            site_list, findings = _sign_sites(probe, saved)
            layer_grads = _layer_gradients(probe, grad_of)
            findings += _gradient_findings(layer_grads, set(probe.order))
            findings += _mutation_findings(probe.mutated)
            findings += _nonfinite_findings(probe.first_nonfinite)
    if not site_list:
        findings.append(_no_binarization())
    findings = _in_report_order(findings, probe.order)
    return Report(findings=findings, sites=site_list, gradients=layer_grads, loss=loss_value, batch=batch)


def _gradient_findings(layers: list[LayerGradient], called: set[str]) -> list[Finding]:
    out: list[Finding] = []
    for g in layers:
        if not g.received:
            why = (
                "it is not used in forward"
                if g.layer not in called
                else "its output does not reach the loss (detached?)"
            )
            out.append(Finding(g.layer, "zero_gradient", f"its parameters receive no gradient: {why}.", 0.0))
        elif not g.finite:
            out.append(
                Finding(
                    g.layer,
                    "nan_gradient",
                    "its parameter gradient contains NaN or infinity; look for the first nan_activation, a "
                    "log/sqrt/division of bad values, or lower the learning rate.",
                    math.nan,
                )
            )
        elif g.rms == 0.0:
            out.append(
                Finding(
                    g.layer,
                    "zero_gradient",
                    "its parameters receive an all-zero gradient, so it does not learn: something between it "
                    "and the loss blocks the gradient (a sign without straight-through estimator, inputs "
                    "outside a sign's clip, a dead ReLU).",
                    0.0,
                )
            )
    healthy = [g for g in layers if g.received and g.finite and g.rms > 0]
    if len(healthy) >= 2:
        median = sorted(g.rms for g in healthy)[len(healthy) // 2]
        for g in healthy:
            if g.rms >= EXPLODING_RATIO * median:
                out.append(
                    Finding(
                        g.layer,
                        "exploding_gradient",
                        f"its gradient RMS {g.rms:.3g} is {g.rms / median:.3g}x the median over layers "
                        f"({median:.3g}); normalize its input (BatchNorm), lower the learning rate or clip "
                        "gradients.",
                        g.rms,
                    )
                )
        # walk from the output to the input: where does the gradient collapse?
        chain = [g for g in healthy if g.layer in called]
        for shallow, deep in zip(reversed(chain[:-1]), reversed(chain[1:])):
            if shallow.rms <= VANISHING_RATIO * deep.rms:
                out.append(
                    Finding(
                        shallow.layer,
                        "vanishing_gradient",
                        f"the gradient RMS falls from {deep.rms:.3g} at '{deep.layer}' to {shallow.rms:.3g} here "
                        f"({deep.rms / shallow.rms:.3g}x smaller), so this layer and the ones before it barely "
                        f"learn. Look between '{shallow.layer}' and '{deep.layer}' for a sign whose inputs "
                        "lie outside its clip or a saturated activation.",
                        shallow.rms,
                    )
                )
                break
    return out
