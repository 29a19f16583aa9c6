"""BitNet b1.58's BitLinear, packed (ternary weights x int8 tokens), against the machine's memory
speed, against its own kernel, and against torch fp32 and torch's int8.

The decoding case of a language model: a few tokens (batch 1, 2, 4, 8) through a 4096 -> 4096
linear layer. In one process, at every thread count, the benchmark

- probes the read bandwidth: ``torch.sum`` over a float32 buffer 8x the last-level cache (and, for
  reference, one a quarter of it, read from that cache), best of 5, the faster of a buffer in
  torch's allocation and one in transparent huge pages (where the packed model keeps its large
  weights);
- times every candidate at every batch, interleaved: each repetition times every candidate once
  (a sample = the mean of back-to-back calls filling ~2 ms, right after untimed calls filling
  10 ms, so that warm means settled back-to-back calls); the tables show medians over the
  repetitions.

Candidates:

- ``fp32``: torch ``F.linear`` on the float weight (the layer a float model has);
- ``int8 dynamic``: ``torch.ao.quantization.quantize_dynamic`` of that ``nn.Linear`` (int8 weights,
  each token quantized on the fly; fbgemm);
- ``onebit <isa>`` (warm): the packed ``BitLinear`` as :class:`onebit.engine.PackedModel` runs it
  (RMSNorm, int8 quantization of the token, the 2-bit weight kernel, ``/ s * gamma``), on each ISA
  (``avx512`` uses AVX-512 VNNI where the CPU has it), the same weights back to back;
- ``onebit <isa> cold``: the same call on copies of the packed layer in turn, so many that their
  weights fill 3x the last-level cache: each call reads its weights from memory, as in a model
  larger than the cache;
- ``kernel <isa>``: ``onebit.engine.kernels.ternary_linear`` alone (the token quantized inside it,
  no RMSNorm), warm; ``kernel <isa> cold``: the same on the copies' weights in turn;
  ``int kernel <isa>``: ``ternary_linear_int`` on int8 tokens (no quantization), warm.

Ratios against issue #22's targets, at every batch: cold call / (weight bytes / read bandwidth)
<= 1.25 at 1 thread; warm call / kernel alone <= 1.25; 1-thread time / 2-thread time >= 1.6.
File sizes: the packed model file against the float and int8 layers' ``torch.save`` state dicts.

Usage: ``python benchmarks/bench_lowbit.py [--features 4096] [--out 4096] [--batch 1 2 4 8]
[--threads 1 2] [--reps 25] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table
from torch import nn

import onebit.engine
from onebit import _C
from onebit.engine import kernels as K
from onebit.io import save_json
from onebit.nn import BitLinear
from timing import interleaved_medians, sample, state_dict_bytes  # benchmarks/timing.py

#: issue #22's targets: cold call / memory time and warm call / kernel at most, 1 / 2 threads at least
COLD_TARGET, WARM_TARGET, SCALING_TARGET = 1.25, 1.25, 1.6


def cpu_model_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``, as ``lscpu`` shows it), else ``platform``'s guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Bytes of CPU 0's highest-level cache (sysfs), else ``default``."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best_level, best_size = 0, default
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            text = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        if level > best_level:
            best_level, best_size = level, size
    return best_size


def read_bandwidth(nbytes: int, runs: int = 5) -> float:
    """Bytes a second ``torch.sum`` reads from a float32 buffer of ``nbytes``, at torch's thread count (best
    of ``runs``): the faster of a buffer in transparent huge pages (as a packed model keeps its large
    weights) and one in torch's own allocation."""
    best = 0.0
    for buffer in (torch.ones(nbytes // 4), K.in_huge_pages(torch.ones(nbytes // 4))):
        buffer.sum()
        best = max(best, buffer.numel() * 4 / min(sample(buffer.sum, 1) for _ in range(runs)))
    return best


def int8_tokens(x: torch.Tensor) -> torch.Tensor:
    """absmax8's integers: ``clamp(round(x * s), -128, 127)``, ``s = 127 / max(max|x|, 1e-5)`` per token."""
    s = 127 / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    return (x * s).round().clamp(-128, 127).to(torch.int8)


def packed_weights(packed) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed BitLinear's 2-bit weight and its scale (gamma)."""
    node = packed.graph["nodes"][0]
    tensors = packed.named_graph_tensors()
    return tensors[node["tensors"]["weight"]], tensors[node["tensors"]["scale"]]


def candidates_for(x, layer, float_weight, int8_layer, packed, copies, isas) -> dict:
    """``{name: (isa, call)}`` at the batch of ``x``: fp32, int8 dynamic, and per ISA the packed call
    warm and cold (``copies`` in turn), the kernel alone warm and cold, and the integer kernel alone."""
    f = x.shape[1]
    wp, gamma = packed_weights(packed)
    xn = F.rms_norm(x, (f,), eps=layer.eps)
    xi = int8_tokens(xn)
    rotation = itertools.cycle(copies)
    weight_rotation = itertools.cycle([packed_weights(model) for model in copies])

    def cold_kernel():
        wp_next, gamma_next = next(weight_rotation)
        return K.ternary_linear(xn, wp_next, in_features=f, scale=gamma_next)

    candidates: dict[str, tuple[str | None, callable]] = {
        "fp32": (None, lambda: F.linear(x, float_weight)),
        "int8 dynamic": (None, lambda: int8_layer(x)),
    }
    for isa in isas:
        candidates[f"onebit {isa}"] = (isa, lambda: packed(x))
        candidates[f"onebit {isa} cold"] = (isa, lambda: next(rotation)(x))
        candidates[f"kernel {isa}"] = (isa, lambda: K.ternary_linear(xn, wp, in_features=f, scale=gamma))
        candidates[f"kernel {isa} cold"] = (isa, cold_kernel)
        candidates[f"int kernel {isa}"] = (isa, lambda: K.ternary_linear_int(xi, wp, in_features=f))
    return candidates


def float_layers(weight: torch.Tensor) -> tuple[nn.Linear, nn.Module]:
    """The float ``nn.Linear`` holding ``weight`` and torch's dynamically quantized int8 twin of it."""
    float_layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    float_layer.weight.data.copy_(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8_layer = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(float_layer), {nn.Linear}, dtype=torch.qint8
        ).eval()
    return float_layer, int8_layer


def file_sizes(packed, float_layer, int8_layer) -> dict[str, int]:
    """Bytes of the packed model file and of the float and int8 layers' state dicts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bitlinear.onebit.safetensors")
        packed.save(path)
        return {
            "onebit packed": os.path.getsize(path),
            "fp32 state_dict": state_dict_bytes(float_layer),
            "int8 dynamic state_dict": state_dict_bytes(int8_layer),
        }


def meets(value: float, target: tuple[str, float] | None) -> bool | None:
    """Whether ``value`` meets ``target`` (``("<=", bound)`` or ``(">=", bound)``); None without one."""
    if target is None:
        return None
    op, bound = target
    return value <= bound if op == "<=" else value >= bound


def ratio_row(isa: str, name: str, target, by_batch: dict[int, float]) -> dict:
    """One ratio per batch, with whether each meets ``target``."""
    return {
        "isa": isa,
        "ratio": name,
        "target": target,
        "by_batch": by_batch,
        "met": {n: meets(value, target) for n, value in by_batch.items()},
    }


def target_ratios(results: dict, isas: list[str]) -> list[dict]:
    """Issue #22's ratios per ISA and batch: cold call / (weight bytes / read bandwidth beyond the
    last-level cache), warm call / kernel alone, 1-thread / 2-thread time; each row's ``target`` is
    ``(op, bound)`` where the issue sets one, else None."""
    times, bandwidth, nbytes = results["times_us"], results["bandwidth_GBps"], results["weight_bytes"]
    batches = results["shape"]["batches"]
    rows = []
    for isa in isas:
        warm, cold, kernel = f"onebit {isa}", f"onebit {isa} cold", f"kernel {isa}"
        for threads, by_batch in times.items():
            memory_us = nbytes / (bandwidth[threads]["beyond LLC"] * 1e3)
            target = ("<=", COLD_TARGET) if threads == 1 else None
            ratios = {n: by_batch[n][cold] / memory_us for n in batches}
            rows.append(ratio_row(isa, f"cold / memory time, {threads} thr", target, ratios))
        for threads, by_batch in times.items():
            ratios = {n: by_batch[n][warm] / by_batch[n][kernel] for n in batches}
            rows.append(ratio_row(isa, f"warm / kernel, {threads} thr", ("<=", WARM_TARGET), ratios))
        if 1 in times and 2 in times:
            scaling = (
                ("cold", cold, (">=", SCALING_TARGET)),
                ("warm", warm, (">=", SCALING_TARGET)),
                ("kernel", kernel, None),
            )
            for kind, name, target in scaling:
                ratios = {n: times[1][n][name] / times[2][n][name] for n in batches}
                rows.append(ratio_row(isa, f"1 / 2 threads, {kind}", target, ratios))
    return rows


def bandwidth_table(results: dict) -> Table:
    """Read bandwidth per thread count, and the weights' bytes divided by it (the memory time)."""
    nbytes, llc = results["weight_bytes"], results["machine"]["llc_bytes"]
    table = Table(title="read bandwidth (torch.sum, best of 5)", box=box.SIMPLE_HEAD)
    table.add_column("threads", justify="right")
    table.add_column(f"beyond LLC ({8 * llc >> 20} MB)", justify="right")
    table.add_column(f"within LLC ({llc // 4 >> 20} MB)", justify="right")
    table.add_column(f"weights ({nbytes / 1e6:.2f} MB) / beyond", justify="right")
    for threads, rates in results["bandwidth_GBps"].items():
        beyond, within = rates["beyond LLC"], rates["within LLC"]
        table.add_row(str(threads), f"{beyond:.1f} GB/s", f"{within:.1f} GB/s", f"{nbytes / (beyond * 1e3):.1f} us")
    return table


def memory_table(results: dict, isa: str) -> Table:
    """Per thread count and batch: cold and warm packed calls against memory time and the kernel."""
    nbytes = results["weight_bytes"]
    table = Table(title=f"packed BitLinear, {isa}: cold, warm, kernel alone (us)", box=box.SIMPLE_HEAD)
    columns = ("thr", "batch", "cold", "memory", "cold/mem", "cold kernel", "warm", "kernel", "warm/kern", "int kernel")
    for name in columns:
        table.add_column(name, justify="right")
    for threads, by_batch in results["times_us"].items():
        memory_us = nbytes / (results["bandwidth_GBps"][threads]["beyond LLC"] * 1e3)
        for n, times in by_batch.items():
            cold, warm, kernel = times[f"onebit {isa} cold"], times[f"onebit {isa}"], times[f"kernel {isa}"]
            cold_kernel, int_kernel = times[f"kernel {isa} cold"], times[f"int kernel {isa}"]
            table.add_row(
                str(threads), str(n), f"{cold:.1f}", f"{memory_us:.1f}", f"{cold / memory_us:.2f}",
                f"{cold_kernel:.1f}", f"{warm:.1f}", f"{kernel:.1f}", f"{warm / kernel:.2f}", f"{int_kernel:.1f}",
            )  # fmt: skip
    return table


def targets_table(results: dict) -> Table:
    """Issue #22's ratios per ISA and batch, each marked met or MISSED where a target applies."""
    batches = results["shape"]["batches"]
    table = Table(title="issue #22 targets, per batch (met / MISSED)", box=box.SIMPLE_HEAD)
    for name in ("isa", "ratio", "target", *(f"batch {n}" for n in batches)):
        table.add_column(name, justify="left" if name in ("isa", "ratio") else "right")
    for row in results["targets"]:
        target = f"{row['target'][0]} {row['target'][1]}" if row["target"] else ""
        cells = []
        for n in batches:
            met = row["met"][n]
            cells.append(f"{row['by_batch'][n]:.2f}" + ("" if met is None else " met" if met else " MISSED"))
        table.add_row(row["isa"], row["ratio"], target, *cells)
    return table


def fp32_table(results: dict, threads: int) -> Table:
    """Every candidate's time and its speed-up over torch fp32 and over torch's int8, per batch."""
    by_batch = results["times_us"][threads]
    table = Table(title=f"{threads} thread(s): us, x fp32, x int8 dynamic", box=box.SIMPLE_HEAD)
    table.add_column("candidate")
    for n in by_batch:
        table.add_column(f"b{n} us", justify="right")
        table.add_column(f"b{n} x fp32 / x int8", justify="right")
    for name in next(iter(by_batch.values())):
        cells = []
        for times in by_batch.values():
            t = times[name]
            cells += [f"{t:.1f}", f"{times['fp32'] / t:.2f} / {times['int8 dynamic'] / t:.2f}"]
        table.add_row(name, *cells)
    return table


def report(results: dict, isas: list[str]) -> None:
    console = Console(width=None if sys.stdout.isatty() else 150)
    machine, shape = results["machine"], results["shape"]
    console.print(
        f"BitLinear {shape['features']} -> {shape['out']}, batches {shape['batches']}; {machine['cpu']}, "
        f"LLC {machine['llc_bytes'] >> 20} MB; torch {machine['torch']}; ISAs {', '.join(machine['isas'])}; "
        f"kernels {results['kernels']}; cold: {results['cold_copies']} copies of the layer in turn "
        f"({results['cold_copies'] * results['weight_bytes'] / 1e6:.0f} MB of weights); 1-minute load average "
        f"{machine['load_average_before']:.2f} before, {machine['load_average_after']:.2f} after",
        highlight=False,
    )
    console.print(bandwidth_table(results))
    for isa in isas:
        console.print(memory_table(results, isa))
    console.print(targets_table(results))
    for threads in results["times_us"]:
        console.print(fp32_table(results, threads))
    weights = shape["features"] * shape["out"]
    table = Table(title="file sizes", box=box.SIMPLE_HEAD)
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("bits a weight", justify="right")
    for name, size in results["file_bytes"].items():
        table.add_row(name, f"{size:,d}", f"{8 * size / weights:.2f}")
    console.print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--out", type=int, default=4096)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    f, o, batches = args.features, args.out, args.batch
    layer = BitLinear(f, o).eval()
    packed = onebit.engine.pack(nn.Sequential(layer), torch.randn(batches[0], f))
    inputs = {n: torch.randn(n, f) for n in batches}
    with torch.no_grad():
        for n, x in inputs.items():
            assert torch.equal(packed(x), layer(x)), f"the packed BitLinear differs from the layer at batch {n}"
    weight_bytes = sum(t.numel() * t.element_size() for t in packed.named_graph_tensors().values())
    llc = last_level_cache_bytes()
    copies = [copy.deepcopy(packed) for _ in range(max(2, math.ceil(3 * llc / weight_bytes)))]
    float_weight = layer.weight.detach().clone()
    float_layer, int8_layer = float_layers(float_weight)

    isas = [isa for isa in ("avx512", "avx2") if isa in _C.supported_isas()]
    isa0 = _C.isa()
    kernel_names = {}
    for isa in isas:
        _C.set_isa(isa)
        kernel_names[isa] = K.ternary_linear_kernel()
    results: dict = {
        "machine": {
            "cpu": cpu_model_name(),
            "llc_bytes": llc,
            "torch": torch.__version__,
            "isas": _C.supported_isas(),
            "vnni": _C.has_avx512_vnni(),
            "load_average_before": os.getloadavg()[0],
        },
        "shape": {"features": f, "out": o, "batches": batches},
        "kernels": kernel_names,
        "weight_bytes": weight_bytes,
        "cold_copies": len(copies),
        "bandwidth_GBps": {},
        "times_us": {},
    }
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            results["bandwidth_GBps"][threads] = {
                "beyond LLC": read_bandwidth(8 * llc) / 1e9,
                "within LLC": read_bandwidth(llc // 4) / 1e9,
            }
            results["times_us"][threads] = {}
            for n, x in inputs.items():
                candidates = candidates_for(x, layer, float_weight, int8_layer, packed, copies, isas)
                medians = interleaved_medians(candidates, args.reps, warmup=10e-3)
                results["times_us"][threads][n] = {name: t * 1e6 for name, t in medians.items()}
    _C.set_isa(isa0)
    results["machine"]["load_average_after"] = os.getloadavg()[0]
    results["file_bytes"] = file_sizes(packed, float_layer, int8_layer)
    results["targets"] = target_ratios(results, isas)
    report(results, isas)
    if args.json:
        save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
