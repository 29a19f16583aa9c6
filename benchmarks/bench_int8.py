"""The int8 x int8 kernels and a packed Bi-Real-18 with int8 stem, shortcuts and classifier, side by side.

1. Layers: ResNet-18's float layers (the 7x7 stem at 224 px, the three 1x1 downsampling shortcuts as a
   Bi-Real block runs them, after its 2x2 average pool, and the 512 -> 1000 classifier), batch 1, NCHW
   float input: onebit's ``int8_conv2d`` / ``int8_linear`` on each ISA this CPU runs (quantization and
   epilogue included, weight panels prepared once) against torch's float32 conv / linear, torch's own
   int8 conv (``torch.ao.nn.quantized.Conv2d`` between a per-tensor quantization of the input and a
   dequantization of its output) and, for the classifier, torch's dynamic int8 linear
   (``torch.ao.quantization.quantize_dynamic``). Each onebit result is checked bit for bit against
   the int8 layer's float reference before timing.
2. End to end: ``birealnet18(float_layers="int8")`` packed against the float ``resnet18``, 224 px, batch 1,
   NCHW input, onebit on each ISA; and the packed file against the float state_dict.

Timings are medians of interleaved samples in one process (``benchmarks/timing.py``); ratios are
``torch / onebit`` (above 1: onebit is faster). torch runs its own best ISA unless forced, e.g.
``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` for an AVX2 comparison on both sides.

Usage::

    python benchmarks/bench_int8.py [--threads 1] [--reps 15] [--isa avx512 avx2] [--skip-layers]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import onebit
from onebit import _C, engine
from onebit.engine.graph.int8 import INT8_OPS
from onebit.engine.kernels import int8 as K8
from timing import interleaved_medians, state_dict_bytes  # benchmarks/timing.py

#: ResNet-18's float convs as a Bi-Real-18 runs them: (name, C_in, C_out, kernel, stride, padding, input size)
CONVS = [
    ("stem 7x7/2 3->64 @224", 3, 64, 7, 2, 3, 224),
    ("shortcut 1x1 64->128 @28", 64, 128, 1, 1, 0, 28),
    ("shortcut 1x1 128->256 @14", 128, 256, 1, 1, 0, 14),
    ("shortcut 1x1 256->512 @7", 256, 512, 1, 1, 0, 7),
]


def conv_case(c_in, c_out, k, stride, padding, size, gen):
    w = torch.randint(-127, 128, (c_out, c_in, k, k), generator=gen, dtype=torch.int8)
    attrs = {
        "in_channels": c_in,
        "out_channels": c_out,
        "kernel_size": [k, k],
        "stride": [stride] * 2,
        "padding": [padding] * 2,
        "dilation": [1, 1],
        "groups": 1,
        "divisor": 42.5,
    }
    x = torch.randn(1, c_in, size, size, generator=gen)
    scale, bias = torch.rand(c_out, generator=gen) * 1e-3, torch.randn(c_out, generator=gen)
    return x, w, attrs, scale, bias


def torch_int8_conv(x: torch.Tensor, c_in, c_out, k, stride, padding, size):
    """torch's own int8 conv as a float layer runs it: the input quantized per tensor (quint8), the
    quantized conv (``torch.ao.nn.quantized.Conv2d``, int8 weights per tensor, the ``x86`` / fbgemm
    engine), the output dequantized."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates its quantized tensors
        conv = torch.ao.nn.quantized.Conv2d(c_in, c_out, k, stride=stride, padding=padding)

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return conv(torch.quantize_per_tensor(x, 1 / 42.5, 128, torch.quint8)).dequantize()

    return run


def layer_rows(isas: list[str], reps: int) -> list[tuple[str, dict[str, float]]]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, *shape in CONVS:
        x, w, a, scale, bias = conv_case(*shape, gen)
        wf, panels = w.float(), K8.int8_panels(w)
        want = INT8_OPS["int8_conv2d"].fn({"weight": w, "scale": scale, "bias": bias}, a, x)
        candidates = {
            "torch fp32": (None, lambda x=x, wf=wf, a=a: F.conv2d(x, wf, None, a["stride"], a["padding"])),
            "torch static int8": (None, torch_int8_conv(x, *shape)),
        }
        for isa in isas:
            _C.set_isa(isa)
            got = K8.int8_conv2d(x, w, scale, bias, a, panels)
            assert torch.equal(got, want), f"{name}: onebit {isa} differs from the reference"
            candidates[f"onebit {isa}"] = (
                isa,
                lambda x=x, w=w, a=a, s=scale, b=bias, p=panels: K8.int8_conv2d(x, w, s, b, a, p),
            )
        rows.append((name, interleaved_medians(candidates, reps)))
    # the classifier
    x = torch.randn(1, 512, generator=gen)
    w = torch.randint(-127, 128, (1000, 512), generator=gen, dtype=torch.int8)
    a = {"in_features": 512, "out_features": 1000, "divisor": 42.5}
    scale, bias = torch.rand(1000, generator=gen) * 1e-3, torch.randn(1000, generator=gen)
    dense = nn.Linear(512, 1000).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(512, 1000)), {nn.Linear}, torch.qint8)
    want = INT8_OPS["int8_linear"].fn({"weight": w, "scale": scale, "bias": bias}, a, x)
    panels = K8.int8_panels(w)
    candidates = {"torch fp32": (None, lambda: dense(x)), "torch dynamic int8": (None, lambda: dynamic(x))}
    for isa in isas:
        _C.set_isa(isa)
        assert torch.equal(K8.int8_linear(x, w, scale, bias, a, panels), want)
        candidates[f"onebit {isa}"] = (isa, lambda: K8.int8_linear(x, w, scale, bias, a, panels))
    rows.append(("classifier 512->1000", interleaved_medians(candidates, reps)))
    return rows


def calibrated_int8_birealnet18() -> nn.Module:
    torch.manual_seed(0)
    model = onebit.models.create("birealnet18", num_classes=1000, float_layers="int8")
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))  # sets the int8 steps from a batch
    return model.eval()


def end_to_end(isas: list[str], reps: int) -> tuple[dict[str, float], dict[str, int]]:
    model = calibrated_int8_birealnet18()
    twin = onebit.models.create("resnet18", num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    packed = engine.pack(model, x)
    with torch.no_grad():
        assert torch.equal(packed(x), model(x)), "the packed model differs from the simulated one"
        candidates = {"resnet18 fp32 (torch)": (None, lambda: twin(x))}
        for isa in isas:
            candidates[f"packed birealnet18 int8, onebit {isa}"] = (isa, lambda: packed(x))
        times = interleaved_medians(candidates, reps, warmup=0.2)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "packed.onebit")
        packed.save(path)
        sizes = {"packed file": os.path.getsize(path), "resnet18 float state_dict": state_dict_bytes(twin)}
    return times, sizes


def print_rows(title: str, rows: list[tuple[str, dict[str, float]]]) -> None:
    print(f"\n## {title} (median ms; ratio = torch fp32 / onebit)")
    for name, times in rows:
        base = times.get("torch fp32", times.get("resnet18 fp32 (torch)"))
        parts = []
        for who, t in times.items():
            compared = who.startswith(("onebit", "packed", "torch dynamic", "torch static"))
            ratio = f" ({base / t:.2f}x)" if compared else ""
            parts.append(f"{who} {1e3 * t:.3f}{ratio}")
        print(f"{name:28s} " + " | ".join(parts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--isa", nargs="+", default=None, help="onebit ISAs (default: every supported one)")
    parser.add_argument("--skip-layers", action="store_true", help="only the end-to-end comparison")
    args = parser.parse_args(argv)
    isas = args.isa or [i for i in _C.supported_isas() if i in ("avx512", "avx2", "neon_dotprod", "neon")]
    torch.set_num_threads(args.threads)
    before = _C.isa()
    print(f"threads={args.threads}, onebit ISAs {isas} (int8 kernels: ", end="")
    for isa in isas:
        _C.set_isa(isa)
        print(f"{isa}={K8.int8_conv_kernel()} ", end="")
    print(f"), torch {torch.__version__}, ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'default')}")
    try:
        if not args.skip_layers:
            print_rows("layers, batch 1", layer_rows(isas, args.reps))
        times, sizes = end_to_end(isas, args.reps)
    finally:
        _C.set_isa(before)
    print_rows("end to end, 224 px, batch 1, NCHW input", [("birealnet18 int8 vs resnet18", times)])
    ratio = sizes["resnet18 float state_dict"] / sizes["packed file"]
    print(
        f"\nfile: packed {sizes['packed file'] / 1e6:.2f} MB, resnet18 float state_dict "
        f"{sizes['resnet18 float state_dict'] / 1e6:.2f} MB: {ratio:.1f}x smaller"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
