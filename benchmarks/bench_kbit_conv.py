"""k-bit and ternary 3x3 convolutions, packed by bit planes, against torch fp32 and onebit's 1-bit conv.

One layer (default 256 -> 256 channels at 14 x 14, batch 1, padding 1) as ``onebit.engine.pack``
runs it: the input quantizer's integers, one binary conv of every pair of activation and weight
planes, then ``/ s * scale + bias``; bit-identical to the layer (checked before timing). Candidates:

- ``torch fp32``: ``F.conv2d`` on the float weight;
- ``1-bit``: sign activations x magnitude-aware sign weights (the binary conv, for reference);
- ``2-bit x 1-bit``: ``dorefa_sym`` 2-bit activations x ``magnitude_aware_sign`` weights;
- ``2-bit x ternary``: ``dorefa_sym`` 2-bit x ``ternary`` weights;
- ``2-bit x 2-bit``: ``dorefa_sym`` 2-bit x ``dorefa_weight`` 2-bit;

each on every ISA the machine has, and each in NCHW and channels_last (the ratio: best layout against
torch's best layout). Every repetition times every candidate once, interleaved (a sample
is the mean of back-to-back calls filling ~2 ms, after one untimed call and a 2 ms pause); the table
shows medians and the ratio to torch fp32. File sizes: each packed layer against the float state dict.

Usage: ``python benchmarks/bench_kbit_conv.py [--channels 256] [--size 14] [--batch 1] [--threads 1 2]
[--reps 15] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

import onebit.engine
from onebit import _C
from onebit.io import save_json
from onebit.nn import QConv2d
from onebit.quant_lowbit import DoReFaSymmetric
from timing import interleaved_medians, state_dict_bytes  # benchmarks/timing.py

CONFIGS = {
    "1-bit": ("ste_sign", "magnitude_aware_sign"),
    "2-bit x 1-bit": (DoReFaSymmetric(2, 1.0), "magnitude_aware_sign"),
    "2-bit x ternary": (DoReFaSymmetric(2, 1.0), "ternary"),
    "2-bit x 2-bit": (DoReFaSymmetric(2, 1.0), "dorefa_weight"),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    c, s, n = args.channels, args.size, args.batch
    x = torch.randn(n, c, s, s)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, c, 3, 3)
    weight_cl = weight.contiguous(memory_format=torch.channels_last)
    layers, packed = {}, {}
    for name, (iq, wq) in CONFIGS.items():
        layer = QConv2d(c, c, 3, padding=1, bias=False, input_quantizer=iq, weight_quantizer=wq).eval()
        layer.weight.data.copy_(weight)
        layers[name] = layer
        packed[name] = onebit.engine.pack(nn.Sequential(layer), x, strict=True)
        with torch.no_grad():
            assert torch.equal(packed[name](x), layer(x)), f"{name}: the packed layer differs from the layer"

    isas = [isa for isa in ("avx512", "avx2") if isa in _C.supported_isas()]
    candidates: dict[str, tuple[str | None, callable]] = {
        "torch fp32 nchw": (None, lambda: F.conv2d(x, weight, None, 1, 1)),
        "torch fp32 channels_last": (None, lambda: F.conv2d(x_cl, weight_cl, None, 1, 1)),
    }
    for isa in isas:
        for name, model in packed.items():
            candidates[f"{name} {isa} nchw"] = (isa, lambda model=model: model(x))
            candidates[f"{name} {isa} channels_last"] = (isa, lambda model=model: model(x_cl))

    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "isas": _C.supported_isas(),
        },
        "shape": {"channels": c, "size": s, "batch": n},
        "times_us": {},
    }
    isa0 = _C.isa()
    with torch.no_grad():
        for threads in args.threads:
            torch.set_num_threads(threads)
            medians = interleaved_medians(candidates, args.reps)
            results["times_us"][threads] = {name: t * 1e6 for name, t in medians.items()}
    _C.set_isa(isa0)

    with tempfile.TemporaryDirectory() as tmp:
        results["file_bytes"] = {"fp32 state_dict": state_dict_bytes(nn.Conv2d(c, c, 3, padding=1, bias=False))}
        for name, model in packed.items():
            path = os.path.join(tmp, "layer.onebit")
            model.save(path)
            results["file_bytes"][f"{name} packed"] = os.path.getsize(path)

    print(f"3x3 conv {c} -> {c} @ {s}x{s}, batch {n}; torch {torch.__version__}; ISAs {', '.join(_C.supported_isas())}")
    for threads, times in results["times_us"].items():
        fp32 = min(times["torch fp32 nchw"], times["torch fp32 channels_last"])
        print(f"\n{threads} thread(s)   time (us), nchw / channels_last    best vs torch fp32's best")
        names = ["torch fp32"] + [f"{name} {isa}" for isa in isas for name in packed]
        for name in names:
            a, b = times[f"{name} nchw"], times[f"{name} channels_last"]
            print(f"  {name:24s} {a:9.1f} / {b:9.1f}   {fp32 / min(a, b):6.2f}x")
    weights = c * c * 9
    print("\nfile sizes")
    for name, size in results["file_bytes"].items():
        print(f"  {name:26s} {size:>12,d} bytes  {8 * size / weights:6.2f} bits a weight")
    if args.json:
        save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
