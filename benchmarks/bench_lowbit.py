"""BitNet b1.58's BitLinear, packed (ternary weights x int8 tokens), against torch fp32 and torch's int8.

The decoding case of a language model: one token (batch 1) through a 4096 -> 4096 linear layer.
Every candidate runs at every thread count in one process, interleaved: each repetition times
every candidate once (a sample = the mean of back-to-back calls filling ~2 ms, after one untimed
warm-up call and a 2 ms pause), and the table shows medians over the repetitions, as ratios
against torch fp32 and against torch's dynamically quantized int8 linear.

Candidates:

- ``fp32``: torch ``F.linear`` on the float weight (the layer a float model has);
- ``int8 dynamic``: ``torch.ao.quantization.quantize_dynamic`` of that ``nn.Linear`` (int8 weights,
  each token quantized on the fly; fbgemm);
- ``onebit <isa>``: the packed ``BitLinear`` as :class:`onebit.engine.PackedModel` runs it (RMSNorm,
  int8 quantization of the token, the 2-bit weight kernel, ``/ s * gamma``), on each ISA
  (``avx512`` uses AVX-512 VNNI where the CPU has it); ``kernel <isa>``: the kernel call alone
  (``onebit.engine.kernels.ternary_linear``, the token quantized inside it).

File sizes: the packed model file against the float and int8 layers' ``torch.save`` state dicts.

Usage: ``python benchmarks/bench_lowbit.py [--features 4096] [--out 4096] [--batch 1] [--threads 1 2]
[--reps 15] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import onebit.engine
from onebit import _C
from onebit.engine import kernels as K
from onebit.io import save_json
from onebit.nn import BitLinear
from timing import interleaved_medians, state_dict_bytes  # benchmarks/timing.py


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--out", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    f, o, n = args.features, args.out, args.batch
    layer = BitLinear(f, o).eval()
    x = torch.randn(n, f)
    packed = onebit.engine.pack(nn.Sequential(layer), x)
    with torch.no_grad():
        assert torch.equal(packed(x), layer(x)), "the packed BitLinear differs from the layer"
    node = packed.graph["nodes"][0]
    tensors = dict(packed.named_graph_tensors())
    wp, gamma = tensors[node["tensors"]["weight"]], tensors[node["tensors"]["scale"]]
    xn = F.rms_norm(x, (f,), eps=layer.eps)

    weight = layer.weight.detach().clone()
    float_layer = nn.Linear(f, o, bias=False)
    float_layer.weight.data.copy_(weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8_layer = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(float_layer), {nn.Linear}, dtype=torch.qint8
        ).eval()

    isas = [isa for isa in ("avx512", "avx2") if isa in _C.supported_isas()]
    kernel_names = {}
    for isa in isas:
        _C.set_isa(isa)
        kernel_names[isa] = K.ternary_linear_kernel()
    candidates: dict[str, tuple[str | None, callable]] = {
        "fp32": (None, lambda: F.linear(x, weight)),
        "int8 dynamic": (None, lambda: int8_layer(x)),
    }
    for isa in isas:
        candidates[f"onebit {isa}"] = (isa, lambda: packed(x))
        candidates[f"kernel {isa}"] = (isa, lambda: K.ternary_linear(xn, wp, in_features=f, scale=gamma))

    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "isas": _C.supported_isas(),
            "vnni": _C.has_avx512_vnni(),
        },
        "shape": {"features": f, "out": o, "batch": n},
        "kernels": kernel_names,
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
        path = os.path.join(tmp, "bitlinear.onebit.safetensors")
        packed.save(path)
        results["file_bytes"] = {
            "onebit packed": os.path.getsize(path),
            "fp32 state_dict": state_dict_bytes(float_layer),
            "int8 dynamic state_dict": state_dict_bytes(int8_layer),
        }

    print(
        f"BitLinear {f} -> {o}, batch {n}; torch {torch.__version__}; ISAs {', '.join(_C.supported_isas())}; "
        f"kernels {kernel_names}"
    )
    for threads, times in results["times_us"].items():
        fp32, int8 = times["fp32"], times["int8 dynamic"]
        print(f"\n{threads} thread(s)        time (us)   vs fp32   vs int8 dynamic")
        for name, t in times.items():
            print(f"  {name:18s} {t:9.1f}   {fp32 / t:6.2f}x   {int8 / t:6.2f}x")
    weights = f * o
    print("\nfile sizes")
    for name, size in results["file_bytes"].items():
        print(f"  {name:24s} {size:>12,d} bytes  {8 * size / weights:6.2f} bits a weight")
    if args.json:
        save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
