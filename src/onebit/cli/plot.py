"""``onebit plot``: PNG pictures of binary weights, feature maps, training curves and sign flips."""

from __future__ import annotations

import argparse
import os

from rich.console import Console

from onebit.cli import integer

KINDS = ("weights", "features", "curves", "flips")


def register(commands) -> None:
    p = commands.add_parser(
        "plot",
        help="write PNGs: binary weights, feature maps, training curves, sign flips per epoch",
        description=(
            "weights TARGET: the +-1 weights of a layer beside its latent weights (float layers too); "
            "weights RUN_DIR --animate: a GIF of a layer's latent and binarized weights over the run's epochs; "
            "features TARGET: a layer's feature maps for one test image; "
            "curves RUN_DIR: losses and accuracy from history.csv; "
            "flips MODEL|RUN_DIR: the fraction of binary weights that flip sign per epoch (a run's flip_ratio column, "
            "or per layer while training MODEL for --epochs on digits). "
            "TARGET is a zoo model name or a run directory written by `onebit train --out`."
        ),
    )
    p.add_argument("kind", choices=KINDS, help="which picture")
    p.add_argument("target", help="zoo model name or run directory (curves: a run directory)")
    p.add_argument("--layer", default=None, help="qualified layer name (default: the first layer with 1-bit weights)")
    p.add_argument(
        "--animate",
        action="store_true",
        help="weights: an animated GIF over the epochs a run recorded (default path RUN_DIR/weights.gif)",
    )
    p.add_argument("--index", type=integer(0), default=0, help="features: index of the test image (default 0)")
    p.add_argument(
        "--stage",
        choices=("output", "input"),
        default="output",
        help="features: the layer's output, or its (quantized) input",
    )
    p.add_argument("--data", default=None, help="dataset (default: the run's, or digits)")
    p.add_argument("--epochs", type=integer(1, 10**6), default=5, help="flips: epochs to train (default 5)")
    p.add_argument(
        "--out", default=None, help="PNG path (default: KIND.png in the run directory, or in the current directory)"
    )
    p.set_defaults(run=run)


def _out(args: argparse.Namespace) -> str:
    if args.out:
        return args.out
    ext = "gif" if args.animate else "png"
    if os.path.isdir(args.target):
        return os.path.join(args.target, f"{args.kind}.{ext}")
    return f"{args.kind}.{ext}"


def run(args: argparse.Namespace, console: Console) -> int:
    from onebit import plot

    if args.animate and args.kind != "weights":
        raise ValueError(f"--animate applies to `onebit plot weights`, not {args.kind}")
    out = _out(args)
    if args.animate:
        if not os.path.isdir(args.target):
            raise ValueError(f"--animate needs a run directory written by `onebit train --out`, got {args.target!r}")
        frames = plot.weights_animation(args.target, out, layer=args.layer)
        console.print(f"wrote {out} ({len(frames)} frames)", highlight=False)
        return 0
    if args.kind == "curves":
        plot.training_curves(args.target, out)
    elif args.kind == "flips":
        _flips(args, out, console)
    else:
        from onebit.cli.doctor import load_target

        model, bundle, _ = load_target(args.target, args.data)
        if args.kind == "weights":
            plot.binary_weights(model, args.layer, out)
        else:
            if not 0 <= args.index < len(bundle.test):
                raise ValueError(f"--index must be in [0, {len(bundle.test) - 1}], got {args.index}")
            layer = args.layer
            if layer is None:
                names = plot.binary_layers(model)
                if not names:
                    raise ValueError("name a layer with --layer (the model has no binary layer)")
                layer = names[0]
            plot.feature_maps(model, layer, bundle.test[args.index][0], out, stage=args.stage)
    console.print(f"wrote {out}", highlight=False)
    return 0


def _flips(args: argparse.Namespace, out: str, console: Console) -> None:
    from onebit import io, models, plot
    from onebit.train import TrainConfig, Trainer

    if os.path.isdir(args.target):
        plot.weight_flips(args.target, out)  # the run's history.csv flip_ratio column
        return
    if args.target not in models.names():
        raise ValueError(f"unknown model {args.target!r}; give a zoo model name or a run directory")
    if args.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")

    class Recording(Trainer):
        """Records every binary layer's signs at the end of each epoch."""

        def on_step_end(self) -> None:
            if self.step == self.steps_per_epoch:
                recorder.record()

    trainer = Recording.from_config(
        TrainConfig(model=args.target, data=args.data or "digits", epochs=args.epochs), console
    )
    recorder = plot.FlipRecorder(trainer.model)
    trainer.fit()
    plot.weight_flips(recorder, out)
    io.save_csv(
        os.path.splitext(out)[0] + ".csv",
        ["epoch", "all", *recorder.layers],
        (
            [e, f"{recorder.total[e]:.6f}", *(f"{recorder.flips[n][e]:.6f}" for n in recorder.layers)]
            for e in range(len(recorder.total))
        ),
    )
