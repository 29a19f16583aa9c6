"""Pictures of binary networks (matplotlib, Agg; no pyplot state): weights, feature maps, curves, sign flips.

* :func:`binary_weights`: the +-1 pattern a layer really computes with (its weight
  quantizer applied, not the latent floats), beside a histogram of the latent weights
  with the straight-through clip marked; a float layer shows its weights as they are;
* :func:`record_weights` and :func:`weights_animation`: every layer's latent and
  binarized weights recorded per epoch (``onebit train`` does it), played as a GIF;
* :func:`feature_maps`: a layer's output (or the quantized input it sees) for one input;
* :func:`training_curves`: losses and accuracy from a run's ``history.csv``;
* :func:`weight_flips`: the fraction of binary weights that changed sign per epoch,
  recorded during training by a :class:`FlipRecorder`.

Every function returns a :class:`matplotlib.figure.Figure` and, given ``path``, writes
it as a PNG atomically (temporary file + rename, :mod:`onebit.io`).
"""

from __future__ import annotations

import csv
import functools
import io as _io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator, PercentFormatter
from torch import nn

from onebit import io, quant
from onebit.math import sign
from onebit.nn.layers import QuantizedLayer
from onebit.optim import FlipCounter

__all__ = [
    "save",
    "binary_layers",
    "binary_weights",
    "weight_layers",
    "record_weights",
    "recorded_layers",
    "weights_animation",
    "feature_maps",
    "training_curves",
    "read_history",
    "FlipRecorder",
    "weight_flips",
]

NEG, POS = "#1f3b73", "#e9c46a"  # -1 dark blue, +1 gold
BINARY_CMAP = ListedColormap([NEG, POS], name="onebit_binary").with_extremes(bad="#ffffff")


def save(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> str:
    """Write ``fig`` to ``path`` as PNG, atomically; returns the path."""
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    io.atomic_write_bytes(path, buffer.getvalue())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # a picture is an ordinary file, not a private temporary
    return os.fspath(path)


def _done(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        save(fig, path)
    return fig


# ---------------------------------------------------------------------------
# weights


def binary_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers whose weights are quantized to 1 bit, in ``named_modules`` order."""
    return [
        n for n, m in model.named_modules() if isinstance(m, QuantizedLayer) and quant.is_binary(m.weight_quantizer)
    ]


def weight_layers(model: nn.Module) -> list[str]:
    """Qualified names of the layers with a weight of 2 or more dimensions (convolutions, linear
    layers; float or quantized), in ``named_modules`` order."""
    return [
        n
        for n, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2
    ]


def _layer(model: nn.Module, layer: str | nn.Module | None, need_binary: bool = False) -> tuple[str, nn.Module]:
    if isinstance(layer, nn.Module):
        names = {id(m): n for n, m in model.named_modules()}
        return names.get(id(layer), type(layer).__name__), layer
    if layer is None:
        candidates = binary_layers(model) or (weight_layers(model) if need_binary else [])
        if not candidates:
            raise ValueError(
                "the model has no layer with weights; name a layer"
                if need_binary
                else "the model has no layer with 1-bit weights; name a layer"
            )
        layer = candidates[0]
    modules = dict(model.named_modules())
    if layer not in modules:
        hint = ", ".join(binary_layers(model)[:8]) if need_binary else ", ".join(n for n in list(modules)[1:9])
        raise ValueError(f"no layer named {layer!r} in the model; e.g. {hint}")
    return layer, modules[layer]


def _tile(weights: np.ndarray, max_rows: int, max_cols: int) -> tuple[np.ndarray, tuple[int, int]]:
    """[O, I, *k] -> a 2-D image of kernels (one row per output channel), NaN gaps between kernels."""
    if weights.ndim == 2:
        return weights[: max_rows * 4, : max_cols * 4], (weights.shape[0], weights.shape[1])
    o, i = weights.shape[:2]
    k = (
        weights.reshape(o, i, -1, weights.shape[-1])
        if weights.ndim > 3
        else weights.reshape(o, i, 1, weights.shape[-1])
    )
    ro, ri = min(o, max_rows), min(i, max_cols)
    kh, kw = k.shape[2], k.shape[3]
    image = np.full((ro * (kh + 1) - 1, ri * (kw + 1) - 1), np.nan)
    for a in range(ro):
        for b in range(ri):
            image[a * (kh + 1) : a * (kh + 1) + kh, b * (kw + 1) : b * (kw + 1) + kw] = k[a, b]
    return image, (o, i)


def binary_weights(
    model: nn.Module,
    layer: str | nn.Module | None = None,
    path: str | os.PathLike | None = None,
    *,
    max_channels: int = 16,
) -> Figure:
    """The +-1 weights layer ``layer`` computes with, beside a histogram of its latent float weights.

    Left: ``sign(q_w(W))`` as an image, one row of kernels per output channel
    (columns: input channels; a 3-D kernel's depth slices are stacked), at most
    ``max_channels`` of each. Right: the latent ``W`` with the quantizer's clip marked.
    A float layer (no weight quantizer, e.g. ``nn.Conv2d``) shows its weights on a
    diverging scale instead. ``layer`` defaults to the first layer with 1-bit weights
    (else the first layer with weights).
    """
    name, module = _layer(model, layer, need_binary=True)
    if not isinstance(getattr(module, "weight", None), torch.Tensor) or module.weight.dim() < 2:
        raise ValueError(f"layer {name!r} ({type(module).__name__}) has no convolution or linear weight")
    quantizer = getattr(module, "weight_quantizer", None)
    binary = quant.is_binary(quantizer)
    with torch.no_grad():
        latent = module.weight.detach().float().cpu()
        used = module.quantized_weight().detach().float().cpu() if quantizer is not None else latent
        if binary:
            used = sign(used)
    pattern = used.numpy()
    fig = Figure(figsize=(11.5, 5.2), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.2, 1])
    if pattern.ndim == 2:
        cap = 16 * max_channels
        ro, ri = min(pattern.shape[0], cap), min(pattern.shape[1], cap)
        image = pattern[:ro, :ri]
        shown = f"{ro} of {pattern.shape[0]} outputs x {ri} of {pattern.shape[1]} inputs"
        left.set_xlabel("input feature")
        left.set_ylabel("output feature")
        aspect = "auto"
    else:
        image, (o, i) = _tile(pattern, max_channels, max_channels)
        kernel = "x".join(str(k) for k in pattern.shape[2:])
        shown = f"{min(o, max_channels)} of {o} outputs x {min(i, max_channels)} of {i} inputs, {kernel} kernels"
        left.set_xlabel("input channel (one kernel each)")
        left.set_ylabel("output channel")
        step = pattern.shape[-1] + 1
        left.set_xticks(
            np.arange(min(i, max_channels)) * step + (pattern.shape[-1] - 1) / 2,
            labels=[str(c) for c in range(min(i, max_channels))],
            fontsize=6,
        )
        rstep = (pattern.shape[-2] + 1) if pattern.ndim > 3 else 2
        rk = pattern.shape[-2] if pattern.ndim > 3 else 1
        left.set_yticks(
            np.arange(min(o, max_channels)) * rstep + (rk - 1) / 2,
            labels=[str(c) for c in range(min(o, max_channels))],
            fontsize=6,
        )
        left.tick_params(length=0)
        aspect = "equal"
    if binary:
        left.imshow(
            np.ma.masked_invalid(image), cmap=BINARY_CMAP, vmin=-1, vmax=1, interpolation="nearest", aspect=aspect
        )
        plus = float((used > 0).float().mean())
        left.set_title(
            f"binary weights used in forward: -1 (blue) {1 - plus:.1%}, +1 (gold) {plus:.1%}\n{shown}", fontsize=9
        )
    else:
        top = float(np.nanmax(np.abs(image))) or 1.0
        shown_image = left.imshow(
            np.ma.masked_invalid(image), cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest", aspect=aspect
        )
        fig.colorbar(shown_image, ax=left, shrink=0.8, label="weight value")
        what = (
            "float weights (no weight quantizer)"
            if quantizer is None
            else f"{quant.precision_of(quantizer)}-bit weights used in forward"
        )
        left.set_title(f"{what}\n{shown}", fontsize=9)
    values = latent.flatten().numpy()
    data_lim = float(np.abs(values).max()) or 1.0
    clip = getattr(quantizer, "clip", None)
    lim = max(data_lim, 1.15 * clip) if clip is not None else data_lim
    bins = np.linspace(-data_lim, data_lim, 81)
    right.set_xlim(-1.05 * lim, 1.05 * lim)
    arrows = ("  (-> -1)", "  (-> +1)") if binary else ("", "")
    right.hist(values[values < 0], bins=bins, color=NEG, label=f"latent w < 0{arrows[0]}")
    right.hist(values[values >= 0], bins=bins, color="#d8b65c", label=f"latent w >= 0{arrows[1]}")
    if clip is not None:
        outside = float((latent.abs() > clip).float().mean())
        for k, c in enumerate((-clip, clip)):
            right.axvline(
                c,
                color="#b22222",
                linestyle="--",
                linewidth=1,
                label=f"clip |w| <= {clip:g}: {outside:.1%} outside (no gradient)" if k == 0 else None,
            )
    right.set_title(f"latent float weights ({values.size:,}; std {values.std():.3g})", fontsize=10)
    right.set_xlabel("weight value")
    right.set_ylabel("count")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False, ncol=2)
    qname = type(quantizer).__name__ if quantizer is not None else "none: a float layer"
    fig.suptitle(f"layer {name} ({type(module).__name__}, weight quantizer {qname})", fontsize=11)
    return _done(fig, path)


# ---------------------------------------------------------------------------
# weights over training: recorded per epoch, played as an animation

WEIGHTS_DIR = "weights"  # in a run directory: one safetensors file per recorded epoch
SAMPLE = 4096  # latent values kept per layer and epoch for the histogram


def _kernel_slice(w: torch.Tensor, max_channels: int) -> torch.Tensor:
    if w.dim() == 2:
        return w[: 16 * max_channels, : 16 * max_channels]
    return w[:max_channels, :max_channels]


@torch.no_grad()
def record_weights(model: nn.Module, directory: str | os.PathLike, epoch: int, *, max_channels: int = 16) -> str:
    """Write every weight layer's weights (float layers included) after ``epoch`` epochs
    (0: the initial weights) to
    ``directory/weights/epoch_NNNN.safetensors``: per layer ``LAYER.latent`` (the first
    ``max_channels`` output x input channels of the latent weight), ``LAYER.used`` (the same
    slice of the weight the layer computes with, for a layer with a weight quantizer) and
    ``LAYER.sample`` (up to 4096 evenly spaced latent values, for the histogram). Returns the path."""
    tensors: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    for name in weight_layers(model):
        m = modules[name]
        w = m.weight.detach().float().cpu()
        key = name or "model"
        tensors[f"{key}.latent"] = _kernel_slice(w, max_channels).contiguous()
        if getattr(m, "weight_quantizer", None) is not None:
            used = m.quantized_weight().detach().float().cpu()
            tensors[f"{key}.used"] = _kernel_slice(used, max_channels).contiguous()
        flat = w.flatten()
        step = max(1, flat.numel() // SAMPLE)
        tensors[f"{key}.sample"] = flat[::step][:SAMPLE].contiguous()
    target = os.path.join(os.fspath(directory), WEIGHTS_DIR, f"epoch_{int(epoch):04d}.safetensors")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    io.save_tensors(target, tensors, metadata={"epoch": str(int(epoch))})
    return target


def _recorded(run_dir: str | os.PathLike) -> list[tuple[int, dict[str, torch.Tensor]]]:
    folder = os.path.join(os.fspath(run_dir), WEIGHTS_DIR)
    files = (
        sorted(f for f in os.listdir(folder) if f.startswith("epoch_") and f.endswith(".safetensors"))
        if os.path.isdir(folder)
        else []
    )
    if not files:
        raise ValueError(
            f"{os.fspath(run_dir)}: no recorded weights in {WEIGHTS_DIR}/ (`onebit train --out DIR` "
            "records them after every epoch; or call onebit.plot.record_weights)"
        )
    return [(int(f[len("epoch_") : -len(".safetensors")]), io.load_tensors(os.path.join(folder, f))) for f in files]


def recorded_layers(run_dir: str | os.PathLike) -> list[str]:
    """The layers whose weights a run recorded, in model order."""
    _, first = _recorded(run_dir)[0]
    return [k[: -len(".latent")] for k in first if k.endswith(".latent")]


def _frame(fig: Figure) -> Any:
    from PIL import Image

    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, facecolor="white")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def weights_animation(
    run_dir: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    layer: str | None = None,
    seconds_per_epoch: float = 0.6,
) -> list:
    """An animated GIF of one layer's weights over training, one frame per recorded epoch (as
    bitorch's weight callback shows them): the latent weights on a diverging scale, the
    binarized weights the layer computes with (for a quantized layer), and the histogram of the
    latent weights, with colour scales and axes fixed across frames. Float layers are allowed.

    ``run_dir`` holds ``weights/epoch_NNNN.safetensors`` (:func:`record_weights`); ``layer``
    defaults to the first layer with a weight quantizer, else the first recorded layer. Writes
    ``path`` (atomically) when given; returns the frames (PIL images)."""
    epochs = _recorded(run_dir)
    layers = recorded_layers(run_dir)
    if layer is None:
        quantized = [n for n in layers if f"{n}.used" in epochs[0][1]]
        layer = (quantized or layers)[0]
    if layer not in layers:
        raise ValueError(f"no recorded layer {layer!r}; recorded: {', '.join(layers[:12])}")
    frames_data = [(e, t[f"{layer}.latent"], t.get(f"{layer}.used"), t[f"{layer}.sample"]) for e, t in epochs]
    top = max(float(lat.abs().max()) for _, lat, _, _ in frames_data) or 1.0
    lim = max(float(smp.abs().max()) for _, _, _, smp in frames_data) or 1.0
    bins = np.linspace(-lim, lim, 61)
    ymax = max(np.histogram(smp.numpy(), bins=bins)[0].max() for _, _, _, smp in frames_data) * 1.1 or 1.0
    quantized = frames_data[0][2] is not None
    images = []
    for epoch, latent, used, sample in frames_data:
        fig = Figure(figsize=(12.5 if quantized else 9.0, 4.4), layout="constrained")
        axes = fig.subplots(1, 3 if quantized else 2, width_ratios=[1, 1, 1.1] if quantized else [1, 1.1])
        lat_img, (o, i) = _tile(latent.numpy(), 16, 16)
        shown = axes[0].imshow(
            np.ma.masked_invalid(lat_img), cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest", aspect="auto"
        )
        fig.colorbar(shown, ax=axes[0], shrink=0.85, label="latent weight")
        axes[0].set_title(f"latent weights ({o} x {i} channels shown)", fontsize=9)
        for ax in axes[: 2 if quantized else 1]:
            ax.set_xlabel("input channel (kernels side by side)")
            ax.set_ylabel("output channel")
            ax.set_xticks([])
            ax.set_yticks([])
        if quantized:
            u = used.numpy()
            binary = bool(np.isin(np.sign(u), (-1, 1)).all() and np.unique(np.abs(u).round(6)).size <= u.shape[0])
            u_img, _ = _tile(np.sign(u) if binary else u, 16, 16)
            if binary:
                axes[1].imshow(
                    np.ma.masked_invalid(u_img),
                    cmap=BINARY_CMAP,
                    vmin=-1,
                    vmax=1,
                    interpolation="nearest",
                    aspect="auto",
                )
                plus = float((used > 0).float().mean())
                axes[1].set_title(f"binarized: -1 (blue) {1 - plus:.0%}, +1 (gold) {plus:.0%}", fontsize=9)
            else:
                peak = float(np.nanmax(np.abs(u_img))) or 1.0
                axes[1].imshow(
                    np.ma.masked_invalid(u_img),
                    cmap="RdBu_r",
                    vmin=-peak,
                    vmax=peak,
                    interpolation="nearest",
                    aspect="auto",
                )
                axes[1].set_title(f"quantized: {len(np.unique(u))} levels", fontsize=9)
        hist_ax = axes[-1]
        values = sample.numpy()
        hist_ax.hist(values[values < 0], bins=bins, color=NEG)
        hist_ax.hist(values[values >= 0], bins=bins, color="#d8b65c")
        hist_ax.set_xlim(-lim, lim)
        hist_ax.set_ylim(0, ymax)
        hist_ax.set_xlabel("latent weight value")
        hist_ax.set_ylabel(f"count (of {values.size:,} sampled)")
        hist_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        hist_ax.set_title(f"latent weights: std {values.std():.3g}", fontsize=9)
        hist_ax.grid(alpha=0.3)
        when = "initial weights" if epoch == 0 else f"after epoch {epoch} of {frames_data[-1][0]}"
        fig.suptitle(f"layer {layer}: {when}", fontsize=11)
        images.append(_frame(fig))
    if path is not None:
        buffer = _io.BytesIO()
        duration = int(1000 * seconds_per_epoch)
        images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
        io.atomic_write_bytes(path, buffer.getvalue())
    return images


# ---------------------------------------------------------------------------
# feature maps


def feature_maps(
    model: nn.Module,
    layer: str | nn.Module,
    x: torch.Tensor,
    path: str | os.PathLike | None = None,
    *,
    stage: str = "output",
    max_channels: int = 16,
) -> Figure:
    """The feature maps of ``layer`` for one input ``x`` (``[C, H, W]`` or ``[1, C, H, W]``), beside the input.

    ``stage="output"``: what the layer produces; ``stage="input"``: what it sees after
    its input quantizer (for a binary layer, the +-1 maps it really computes with).
    The model runs once in eval mode (modes restored). Binary maps are drawn in two
    colours; others on a symmetric diverging scale shared by all channels.
    """
    if stage not in ("output", "input"):
        raise ValueError(f"stage must be 'output' or 'input', got {stage!r}")
    name, module = _layer(model, layer)
    if x.dim() in (2, 3) or (x.dim() == 4 and x.shape[0] != 1):
        x = x[:1] if x.dim() == 4 else x.unsqueeze(0)
    captured: dict[str, torch.Tensor] = {}

    def hook(m: nn.Module, args: tuple, out: Any) -> None:
        if stage == "output":
            captured["t"] = out.detach() if isinstance(out, torch.Tensor) else out[0].detach()
        else:
            t = args[0].detach()
            q = getattr(m, "input_quantizer", None)
            captured["t"] = q(t).detach() if q is not None else t

    modes = {m: m.training for m in model.modules()}
    handle = module.register_forward_hook(hook)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.training = mode
    if "t" not in captured:
        raise ValueError(f"layer {name!r} was not called in forward")
    maps = captured["t"][0].float().cpu()
    if maps.dim() == 1:
        side = math.ceil(math.sqrt(maps.numel()))
        padded = torch.full((side * side,), float("nan"))
        padded[: maps.numel()] = maps
        maps = padded.view(1, side, side)
    elif maps.dim() == 2:  # [C, L]: one strip per channel
        maps = maps.unsqueeze(1)
    elif maps.dim() == 4:  # [C, D, H, W]: the middle depth slice
        maps = maps[:, maps.shape[1] // 2]
    channels = maps.shape[0]
    shown = min(channels, max_channels)
    finite = maps[torch.isfinite(maps)]
    binary = bool(finite.numel()) and bool(((finite == 1) | (finite == -1)).all())
    cols = min(8, shown)
    rows = math.ceil(shown / cols)
    fig = Figure(figsize=(2.0 + 1.6 * cols, 0.4 + 1.7 * max(rows, 1)), layout="constrained")
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1.4] + [1] * cols)
    ax_in = fig.add_subplot(grid[:, 0])
    image = x[0].detach().float().cpu()
    if image.dim() == 3 and image.shape[0] in (3,):
        shown_in = image.permute(1, 2, 0).numpy()
        shown_in = (shown_in - shown_in.min()) / (np.ptp(shown_in) or 1.0)
        ax_in.imshow(shown_in, interpolation="nearest")
    else:
        ax_in.imshow(image[0].numpy() if image.dim() == 3 else image.numpy(), cmap="gray", interpolation="nearest")
    ax_in.set_title("input", fontsize=9)
    ax_in.set_xticks([])
    ax_in.set_yticks([])
    lim = float(finite.abs().max()) if finite.numel() else 1.0
    lim = lim or 1.0
    last = None
    for c in range(shown):
        ax = fig.add_subplot(grid[c // cols, 1 + c % cols])
        data = np.ma.masked_invalid(maps[c].numpy())
        if binary:
            last = ax.imshow(data, cmap=BINARY_CMAP, vmin=-1, vmax=1, interpolation="nearest")
        else:
            last = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"ch {c}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if last is not None and not binary:
        fig.colorbar(last, ax=fig.axes[1:], shrink=0.8, label="activation")
    kind = "binary (+-1, dark = -1)" if binary else f"range +-{lim:.3g}"
    what = "output" if stage == "output" else "input as the layer sees it"
    fig.suptitle(
        f"{name} ({type(module).__name__}) {what}: {shown} of {channels} channels, "
        f"shape {list(captured['t'].shape[1:])}, {kind}",
        fontsize=10,
    )
    return _done(fig, path)


# ---------------------------------------------------------------------------
# training curves


def read_history(source: str | os.PathLike) -> dict[str, list[float]]:
    """Columns of a run's ``history.csv`` (``source``: the file or its run directory) as float lists."""
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "history.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: expected a history.csv written by `onebit train --out DIR`")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no epochs yet")
    columns: dict[str, list[float]] = {}
    for key in rows[0]:
        values = []
        for r in rows:
            try:
                values.append(float(r[key]))
            except (TypeError, ValueError):
                values.append(_clock_seconds(r[key]))
        columns[key] = values
    return columns


def _clock_seconds(text: str | None) -> float:
    if text and ":" in text:
        parts = [float(p) for p in text.split(":")]
        seconds = 0.0
        for p in parts:
            seconds = 60 * seconds + p
        return seconds
    return math.nan


def training_curves(
    source: str | os.PathLike | Mapping[str, Sequence[float]], path: str | os.PathLike | None = None
) -> Figure:
    """Train/valid loss and accuracy per epoch, from a ``history.csv`` (file, run directory, or its columns)."""
    h = dict(source) if isinstance(source, Mapping) else read_history(source)
    epochs = h.get("epoch") or list(range(len(next(iter(h.values())))))
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, color, label in (("train_loss", "#1f3b73", "train"), ("valid_loss", "#d08c2b", "valid")):
        if key in h:
            loss_ax.plot(epochs, h[key], marker="o", markersize=3, color=color, label=label)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.set_title("loss", fontsize=10)
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(frameon=False)
    if "accuracy" in h:
        acc = h["accuracy"]
        acc_ax.plot(epochs, acc, marker="o", markersize=3, color="#2e7d32")
        best = int(np.nanargmax(acc))
        acc_ax.scatter(
            [epochs[best]],
            [acc[best]],
            color="#b22222",
            zorder=3,
            label=f"best {acc[best]:.2%} (epoch {epochs[best]:g})",
        )
        acc_ax.legend(frameon=False, loc="lower right")
        acc_ax.set_ylim(min(acc) - 0.05, min(1.0, max(acc) + 0.03))
        acc_ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy on the test set")
    for a in (loss_ax, acc_ax):
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
    acc_ax.set_title("test accuracy", fontsize=10)
    acc_ax.grid(alpha=0.3)
    title = os.fspath(source) if not isinstance(source, Mapping) else "training"
    fig.suptitle(f"training curves: {title}", fontsize=11)
    return _done(fig, path)


# ---------------------------------------------------------------------------
# sign flips


class FlipRecorder:
    """Records the signs of every 1-bit weight; ``record()`` after each epoch stores the fraction that flipped.

    ``flips[layer]`` is a list with one value per ``record()`` after the first: the
    fraction of that layer's binary weights whose sign (of the quantized weight, as
    used in forward) differs from the previous record. ``total`` is the same over all
    binary weights. Usage::

        recorder = FlipRecorder(model)          # records the initial signs
        for epoch in range(epochs):
            train_one_epoch(model)
            recorder.record()
        weight_flips(recorder, "flips.png")
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = binary_layers(model)
        if not self.layers:
            raise ValueError("the model has no layer with 1-bit weights to record")
        self.flips: dict[str, list[float]] = {n: [] for n in self.layers}
        self.total: list[float] = []
        self._counter = FlipCounter(functools.partial(self._quantized_weight, n) for n in self.layers)

    def _quantized_weight(self, layer: str) -> torch.Tensor:
        return self.model.get_submodule(layer).quantized_weight()

    def record(self) -> float:
        """Store and return the fraction of all binary weights that flipped since the last record."""
        changed = count = 0
        for n, diff in zip(self.layers, self._counter.flipped(snapshot=True)):
            self.flips[n].append(float(diff.float().mean()))
            changed += int(diff.sum())
            count += diff.numel()
        self.total.append(changed / max(count, 1))
        return self.total[-1]


def _flip_ticks(values: Sequence[float]) -> list[float]:
    """At least three y ticks over the shown fractions: 0 when present, then 1-2-5 steps per
    decade between the smallest and the largest positive value (their ends added when a
    decade holds fewer)."""
    positive = sorted(v for v in values if v > 0)
    ticks = [0.0] if any(v == 0 for v in values) or not positive else []
    if not positive:
        return [0.0, 0.5, 1.0]
    lo, hi = positive[0], positive[-1]
    for decade in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            t = m * 10.0**decade
            if lo / 1.5 <= t <= hi * 1.5:
                ticks.append(t)
    if len([t for t in ticks if t > 0]) < 3:  # less than a decade: evenly spaced ticks over the values
        even = MaxNLocator(nbins=4, min_n_ticks=3).tick_values(lo / 1.15, hi * 1.15)
        ticks = [t for t in ticks if t == 0] + [float(t) for t in even if lo / 1.3 <= t <= hi * 1.3 and t > 0]
    elif len(ticks) > 8:  # many decades: powers of ten only
        ticks = [t for t in ticks if t == 0 or abs(math.log10(t) - round(math.log10(t))) < 1e-9]
    return sorted(set(ticks))


def weight_flips(
    flips: FlipRecorder | Mapping[str, Sequence[float]] | str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    total: Sequence[float] | None = None,
) -> Figure:
    """Fraction of binary weights that flipped sign per epoch, per layer and overall (log scale).

    ``flips``: a :class:`FlipRecorder`, ``{layer: [fraction per epoch]}``, or a run directory /
    ``history.csv`` whose ``flip_ratio`` column (all binary weights) is plotted.
    """
    title_source = ""
    if isinstance(flips, FlipRecorder):
        total = flips.total if total is None else total
        flips = flips.flips
    elif isinstance(flips, (str, os.PathLike)):
        title_source = f" ({os.fspath(flips)})"
        history = read_history(flips)
        if "flip_ratio" not in history:
            raise ValueError(
                f"{os.fspath(flips)}: history.csv has no flip_ratio column "
                "(written by `onebit train` since it counts sign flips)"
            )
        total, flips = history["flip_ratio"], {}
    if not any(len(v) for v in flips.values()) and not (total is not None and len(total)):
        raise ValueError("no epochs recorded: call FlipRecorder.record() after each epoch")
    fig = Figure(figsize=(8.5, 4.2), layout="constrained")
    ax = fig.subplots()
    colors = ["#1f3b73", "#d08c2b", "#2e7d32", "#8e44ad", "#b22222", "#16a085", "#7f8c8d", "#c0392b"]
    floor = None
    for k, (name, values) in enumerate(flips.items()):
        epochs = np.arange(len(values))
        positive = [v for v in values if v > 0]
        if positive:
            floor = min(positive + ([floor] if floor else []))
        ax.plot(epochs, values, marker="o", markersize=3, linewidth=1.2, color=colors[k % len(colors)], label=name)
    if total is not None and len(total):
        ax.plot(np.arange(len(total)), total, color="black", linewidth=2.2, linestyle="--", label="all binary weights")
    ax.set_xlabel("epoch (as in history.csv)")
    ax.set_ylabel("binary weights that flipped sign")
    if floor is None and total is not None:
        floor = min((v for v in total if v > 0), default=None)
    ax.set_yscale("symlog", linthresh=(floor or 1e-4) / 2)
    shown = [v for values in flips.values() for v in values] + list(total if total is not None else [])
    ticks = _flip_ticks(shown)
    ax.set_yticks(ticks)
    if ticks and ticks[0] > 0:  # no zero to show: start the axis near the smallest value
        ax.set_ylim(bottom=min(ticks[0], min(v for v in shown if v > 0)) / 1.3)
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(
        f"sign flips of the binary weights per epoch{title_source}\n(training settles as this falls)", fontsize=10
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, frameon=False, ncol=2 if len(flips) > 4 else 1)
    return _done(fig, path)
