"""End-to-end benchmark: a packed binary model against its float twin, side by side in one process.

For every thread count, the candidates run interleaved: each repetition times every
candidate once (a sample is the mean of a few back-to-back calls, ~20 ms or more), and
the reported time is the median over repetitions. Each model runs at its best input
layout (NCHW or channels_last, both measured); the headline speedup is the packed model called
with an NCHW tensor, as users call it, against the float model at its best. Also reported: the packed model's time
per op kind (where the time goes) and the file sizes (float state_dicts as safetensors
vs the packed file).

Used by ``onebit bench`` and ``benchmarks/bench_end_to_end.py``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from onebit import io, models
from onebit.engine.packed import PackedModel, pack

__all__ = ["DEFAULT_PAIRS", "Pair", "end_to_end", "op_breakdown", "file_sizes"]

#: (binary model, float twin) zoo names and the input they are timed on.
DEFAULT_PAIRS = ["birealnet18:resnet18@224"]


@dataclass
class Pair:
    binary: str
    float: str
    image: int
    in_channels: int = 3
    num_classes: int = 1000
    results: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Pair:
        """``binary:float@image``, e.g. ``birealnet18:resnet18@224`` or ``lenet_binary:lenet@8``."""
        names, _, image = text.partition("@")
        binary, _, float_name = names.partition(":")
        if not binary or not float_name:
            raise ValueError(f"expected BINARY:FLOAT or BINARY:FLOAT@IMAGE, got {text!r}")
        size = int(image) if image else 224
        small = size < 64
        return cls(binary, float_name, size, in_channels=1 if small else 3, num_classes=10 if small else 1000)

    def build(self) -> tuple[nn.Module, nn.Module]:
        kw = {"num_classes": self.num_classes, "in_channels": self.in_channels}
        return models.create(self.binary, **kw).eval(), models.create(self.float, **kw).eval()


def _sample(fn: Callable[[], Any], inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def _interleaved(candidates: dict[str, Callable[[], Any]], reps: int, target: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each candidate, timed round-robin, each sample after untimed calls
    filling ``target`` seconds.

    Those calls put a candidate back in the state of a loop calling it. Without them, whichever candidate
    follows the float model (whose 47 MB of weights evict the caches) is timed while it settles: a packed
    Bi-Real-18 call takes about three calls to come back to its speed, so the candidates' order, not their
    layout, decided which one was slower."""
    inner = {}
    for name, fn in candidates.items():
        fn()
        one = _sample(fn, 1)
        inner[name] = max(1, min(50, int(target / max(one, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            end = time.perf_counter() + target
            while time.perf_counter() < end:
                fn()
            samples[name].append(_sample(fn, inner[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def file_sizes(binary: nn.Module, float_twin: nn.Module, packed: PackedModel) -> dict[str, int]:
    """Bytes on disk: the binary model's and the float twin's state_dicts (safetensors) and the packed file."""
    with tempfile.TemporaryDirectory() as d:
        paths = {k: os.path.join(d, f"{k}.safetensors") for k in ("binary_state_dict", "float_state_dict", "packed")}
        io.save_tensors(paths["binary_state_dict"], binary.state_dict())
        io.save_tensors(paths["float_state_dict"], float_twin.state_dict())
        packed.save(paths["packed"])
        return {k: os.path.getsize(p) for k, p in paths.items()}


def op_breakdown(packed: PackedModel, x: torch.Tensor, repeat: int = 10) -> list[tuple[str, float, int]]:
    """``(op, ms, count)`` per op kind of the packed model on ``x``, largest first."""
    totals: dict[str, list[float]] = {}
    for row in packed.profile(x, repeat=repeat):
        t = totals.setdefault(row["op"], [0.0, 0])
        t[0] += row["ms"]
        t[1] += 1
    return sorted(((op, ms, int(n)) for op, (ms, n) in totals.items()), key=lambda r: -r[1])


@torch.no_grad()
def end_to_end(
    pair: Pair,
    *,
    batch: int = 1,
    threads: tuple[int, ...] = (1, 2),
    reps: int = 15,
    simulated: bool = False,
) -> dict[str, Any]:
    """Time ``pair`` (packed binary model vs float twin) at each thread count; returns a result dict."""
    binary, float_twin = pair.build()
    x = torch.randn(batch, pair.in_channels, pair.image, pair.image)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    packed = pack(binary, x)
    pack_seconds = time.perf_counter() - t0
    same = packed(x)
    ref = binary(x)
    check = {
        "max_abs_diff": float((same - ref).abs().max()),
        "argmax_equal": bool(torch.equal(same.argmax(-1), ref.argmax(-1))),
    }
    before = torch.get_num_threads()
    timings: dict[int, dict[str, float]] = {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            candidates = {
                "packed nchw": lambda: packed(x),
                "packed channels_last": lambda: packed(x_cl),
                "float nchw": lambda: float_twin(x),
                "float channels_last": lambda: float_twin(x_cl),
            }
            if simulated:
                candidates["simulated binary"] = lambda: binary(x)
            timings[n] = _interleaved(candidates, reps)
        torch.set_num_threads(threads[0])
        breakdown = op_breakdown(packed, x)  # the input users pass, as the headline
    finally:
        torch.set_num_threads(before)
    summary = {}
    for n, t in timings.items():
        p, best = t["packed nchw"], min(t["packed nchw"], t["packed channels_last"])
        f = min(t["float nchw"], t["float channels_last"])
        # the headline: the packed model called as users call it (an NCHW tensor) against the
        # float model at its best layout; best-vs-best beside it
        summary[n] = {
            "packed_ms": 1e3 * p,
            "packed_best_ms": 1e3 * best,
            "float_ms": 1e3 * f,
            "speedup": f / p,
            "speedup_best": f / best,
        }
    return {
        "pair": f"{pair.binary} (packed) vs {pair.float} (float)",
        "input": list(x.shape),
        "pack_seconds": pack_seconds,
        "check": check,
        "timings_ms": {n: {k: 1e3 * v for k, v in t.items()} for n, t in timings.items()},
        "summary": summary,
        "breakdown": breakdown,
        "sizes": file_sizes(binary, float_twin, packed),
        "backend": _backend_name(),
    }


def _backend_name() -> str:
    from onebit.engine import ops

    if ops.backend() == "native":
        from onebit import _C

        return f"native ({_C.isa()})"
    return "reference (pure torch)"


def print_report(result: dict[str, Any], console) -> None:
    """Render one :func:`end_to_end` result with rich tables."""
    from rich.table import Table

    table = Table(
        title=f"{result['pair']}, input {result['input']}, kernels {result['backend']}",
        caption="speedup: the packed model on an NCHW input (as users call it) vs the float model at its best layout",
    )
    for col in ("threads", "packed nchw", "packed ch-last", "float nchw", "float ch-last", "speedup", "best vs best"):
        table.add_column(col, justify="right")
    for n, t in result["timings_ms"].items():
        table.add_row(
            str(n),
            f"{t['packed nchw']:.2f} ms",
            f"{t['packed channels_last']:.2f} ms",
            f"{t['float nchw']:.2f} ms",
            f"{t['float channels_last']:.2f} ms",
            f"{result['summary'][n]['speedup']:.2f}x",
            f"{result['summary'][n]['speedup_best']:.2f}x",
        )
    console.print(table)
    ths = list(result["summary"])
    if len(ths) >= 2:
        a, b = result["summary"][ths[0]], result["summary"][ths[-1]]
        console.print(
            f"packed model {ths[0]} -> {ths[-1]} threads: {a['packed_ms'] / b['packed_ms']:.2f}x; "
            f"float model: {a['float_ms'] / b['float_ms']:.2f}x",
            highlight=False,
        )
    total = sum(ms for _, ms, _ in result["breakdown"]) or 1.0
    breakdown = Table(title=f"where the packed model's time goes ({ths[0]} thread(s), NCHW input)")
    for col in ("op", "count", "ms", "share"):
        breakdown.add_column(col, justify="right")
    for op, ms, count in result["breakdown"]:
        breakdown.add_row(op, str(count), f"{ms:.3f}", f"{ms / total:.0%}")
    console.print(breakdown)
    s = result["sizes"]
    console.print(
        f"files: float twin state_dict {s['float_state_dict'] / 1e6:.2f} MB, binary model state_dict "
        f"{s['binary_state_dict'] / 1e6:.2f} MB, packed {s['packed'] / 1e6:.2f} MB "
        f"({s['float_state_dict'] / s['packed']:.1f}x / {s['binary_state_dict'] / s['packed']:.1f}x smaller)",
        highlight=False,
    )
    c = result["check"]
    console.print(
        f"packed vs simulated binary model: max |diff| {c['max_abs_diff']:.2e}, argmax equal: {c['argmax_equal']}; "
        f"pack() took {result['pack_seconds']:.2f} s",
        highlight=False,
    )


@torch.no_grad()
def demo_report(model: nn.Module, x_test: torch.Tensor, out_dir: str, console, *, reps: int = 15) -> dict[str, Any]:
    """Pack a trained model, save and reload it, check its test-set predictions, print sizes and speed.

    Writes ``out_dir/model.packed.safetensors``; compares the reloaded packed model's predictions on
    ``x_test`` with the simulated model's (they must be equal); measures both (interleaved medians)
    on one sample and on the whole test set. Returns the numbers.
    """
    from rich.table import Table

    from onebit.engine.packed import load

    model = model.eval()
    x_test = x_test.to(torch.float32)
    packed = pack(model, x_test[:1])
    path = os.path.join(out_dir, "model.packed.safetensors")
    packed.save(path)
    loaded = load(path)
    expected = torch.cat([model(x_test[i : i + 256]).argmax(-1) for i in range(0, len(x_test), 256)])
    got = torch.cat([loaded(x_test[i : i + 256]).argmax(-1) for i in range(0, len(x_test), 256)])
    mismatches = int((expected != got).sum())
    with tempfile.TemporaryDirectory() as d:
        float_path = os.path.join(d, "state_dict.safetensors")
        io.save_tensors(float_path, model.state_dict())
        float_bytes = os.path.getsize(float_path)
    packed_bytes = os.path.getsize(path)
    one, batch = x_test[:1].contiguous(), x_test.contiguous()
    t = _interleaved(
        {
            "packed 1": lambda: loaded(one),
            "simulated 1": lambda: model(one),
            "packed all": lambda: loaded(batch),
            "simulated all": lambda: model(batch),
        },
        reps,
    )
    table = Table(title=f"packed engine ({_backend_name()}) vs the simulated binary model")
    for col in ("", "simulated (PyTorch)", "packed", "ratio"):
        table.add_column(col, justify="right")
    table.add_row(
        "file",
        f"{float_bytes / 1e3:.1f} kB",
        f"{packed_bytes / 1e3:.1f} kB",
        f"{float_bytes / packed_bytes:.1f}x smaller",
    )
    for label, key in (("batch 1", "1"), (f"batch {len(x_test)}", "all")):
        s, p = t[f"simulated {key}"], t[f"packed {key}"]
        table.add_row(label, f"{1e3 * s:.3f} ms", f"{1e3 * p:.3f} ms", f"{s / p:.1f}x faster")
    console.print(table)
    verdict = "[green]identical[/]" if mismatches == 0 else f"[red]{mismatches} differ[/]"
    console.print(
        f"test-set predictions, packed file reloaded vs simulated model: {verdict} ({len(x_test)} images); saved {path}"
    )
    return {
        "path": path,
        "mismatches": mismatches,
        "float_bytes": float_bytes,
        "packed_bytes": packed_bytes,
        "seconds": t,
    }
