"""A packed model called on an NCHW input against the same model on a channels_last one, side by side.

For every zoo model (or those named) and the yardstick's three binary conv layers, packed and called
on one random input in both memory formats, interleaved rounds of calls, each side at its best round;
printed as ``NCHW / channels_last`` (1.00 = an NCHW input costs nothing more). The packed outputs are
checked equal to the model's in both formats first. At one thread the time is the thread's CPU time
(``time.thread_time``: what a busy machine's other processes take is not counted); at more, wall time.

Usage::

    python benchmarks/bench_layouts.py [--models birealnet18 ...] [--threads 1] [--rounds 12]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import onebit
from onebit import engine
from onebit import nn as onn

#: the yardstick's layers: (batch, channels, side), 3x3, stride 1, padding 1
LAYERS = ((1, 256, 14), (8, 256, 14), (1, 64, 56))
IMAGENET = ("birealnet18", "resnet18", "resnete18")


def zoo_case(name: str) -> tuple[torch.nn.Module, torch.Tensor] | None:
    torch.manual_seed(0)
    model = onebit.models.create(name).eval()
    convs = [p for p in model.parameters() if p.dim() == 4]
    if not convs:
        return None  # an MLP: no maps, no layout
    side = 224 if name in IMAGENET else 28
    return model, torch.randn(1, convs[0].shape[1], side, side)


def layer_case(batch: int, channels: int, side: int) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    sign = {"input_quantizer": "ste_sign", "weight_quantizer": "ste_sign"}
    model = torch.nn.Sequential(onn.QConv2d(channels, channels, 3, padding=1, **sign)).eval()
    return model, torch.randn(batch, channels, side, side)


def compare(model: torch.nn.Module, x: torch.Tensor, rounds: int) -> tuple[float, float]:
    """(NCHW, channels_last) ms per call of the packed model, each at its best round."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        packed = engine.pack(model, x)
        inputs = {"nchw": x, "channels_last": x.contiguous(memory_format=torch.channels_last)}
        for inp in inputs.values():
            if not torch.equal(packed(inp), model(inp)):
                raise SystemExit("the packed model differs from the model: no timing")
        clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
        start = clock()
        packed(x)
        calls = max(1, min(100, int(0.02 / max(clock() - start, 1e-6))))
        best = dict.fromkeys(inputs, float("inf"))
        for _ in range(rounds):
            for key, inp in inputs.items():
                start = clock()
                for _ in range(calls):
                    packed(inp)
                best[key] = min(best[key], (clock() - start) / calls)
    return best["nchw"] * 1e3, best["channels_last"] * 1e3


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=onebit.models.names())
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--no-layers", action="store_true", help="skip the single binary conv layers")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from onebit import _C

    print(f"# NCHW vs channels_last input, {args.threads} thread(s), ISA {_C.isa()}, best of {args.rounds} rounds")
    print(f"{'model':>28} {'input':>18} {'NCHW ms':>9} {'ch-last ms':>10} {'NCHW / ch-last':>14}")
    cases = [(name, zoo_case(name)) for name in args.models]
    if not args.no_layers:
        cases += [(f"binary conv {c}->{c} @{s}", layer_case(n, c, s)) for n, c, s in LAYERS]
    for name, case in cases:
        if case is None:
            print(f"{name:>28} (no conv: skipped)")
            continue
        model, x = case
        nchw, channels_last = compare(model, x, args.rounds)
        print(
            f"{name:>28} {str(list(x.shape)):>18} {nchw:9.3f} {channels_last:10.3f} {nchw / channels_last:14.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
