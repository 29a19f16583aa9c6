"""``onebit train``: train a zoo model on a dataset (one process, several, or under torchrun)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal

from rich.console import Console

from onebit.cli import numbers

# option -> TrainConfig field; every option defaults to None so that the config's defaults
# stay the single source and ``--resume`` can tell which options were given.
_OPTIONS = {
    "model": (str, "zoo model name (see `onebit models`)"),
    "data": (str, "dataset name or directory: digits, an IDX, CIFAR or image-folder directory"),
    "epochs": (int, "number of epochs"),
    "batch_size": (int, "global batch size (split between processes)"),
    "lr": (float, "peak learning rate"),
    "optimizer": (str, "adam, sgd, or bop (Bop for binary weights, Adam for the rest)"),
    "schedule": (str, "one-cycle, cosine, linear (decay to 0) or constant"),
    "weight_decay": (float, "weight decay of the float parameters (binary latent weights never decay)"),
    "seed": (int, "random seed (model init, data order, augmentation)"),
    "mixup": (float, "mixup alpha (0: off)"),
    "topk": (int, "k of the top_k_accuracy column"),
    "workers": (int, "number of training processes (DDP, gloo on CPU)"),
    "augment": (str, "auto (the dataset's), none, crop, flip or crop+flip"),
    "image_size": (int, "resize images to this size (e.g. 32 to upsample 28 px Fashion-MNIST)"),
    "weight_clip": (float, "clip binary latent weights to [-C, C] after each step"),
    "bop_threshold": (float, "Bop's flip threshold"),
    "bop_gamma": (float, "Bop's moving-average rate"),
    "teacher": (str, "run directory of a trained model (e.g. the float twin) to distill from"),
    "distill_weight": (float, "weight w of the distillation term: (1-w)*CE + w*T^2*KL(teacher || student) (1.0)"),
    "distill_temperature": (float, "softmax temperature T of the distillation term (1.0)"),
    "memory_format": (str, "contiguous or channels_last (weights and images in NHWC: faster convolutions on CPU)"),
    "loader_workers": (int, "loader worker processes decoding and augmenting images (0: in the training process)"),
    "device": (str, "auto (a GPU when there is one), cpu or cuda"),
    "precision": (str, "fp32, or mixed precision bf16 / fp16 (evaluation and export stay fp32)"),
    "weights": (
        str,
        "start from these weights: a run directory, a weights file, a pushed folder or hf://org/name[@rev]",
    ),
    "mean": (numbers, "normalize with this mean per channel, e.g. 0.485,0.456,0.406 (default: the data's)"),
    "std": (numbers, "normalize with this std per channel, e.g. 0.229,0.224,0.225 (with --mean)"),
}


def register(commands) -> None:
    p = commands.add_parser(
        "train",
        help="train a zoo model on a dataset",
        description="Train a zoo model; prints an epoch table, writes checkpoints and history.csv to --out. "
        "SIGINT/SIGTERM finish the current step, save and exit (status 130 / 0); --resume DIR continues. "
        "A run directory holds one run: --out refuses a directory that already holds one (unless --overwrite), "
        "and a second trainer on the same directory fails at once.",
    )
    for name, (kind, help_text) in _OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=help_text)
    p.add_argument(
        "--model-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="argument of the model builder, e.g. conv_layer=twist, widths=[32,64] or input_quantizer=approx_sign: "
        "a JSON value, else a string; a value with brackets or quotes must be valid JSON (repeatable)",
    )
    p.add_argument("--out", default=None, help="run directory for checkpoints and history.csv")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also write TensorBoard event files (scalars, weight histograms) under OUT/tensorboard",
    )
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the interrupted run saved in DIR")
    p.add_argument("--overwrite", action="store_true", help="replace the run --out already holds")
    p.set_defaults(run=run)


def parse_model_args(items: list[str]) -> dict:
    """``["conv_layer=twist", "binary=false", "widths=[32,64]"]`` -> a kwargs dict (JSON values, else strings).

    A value holding JSON's brackets or quotes is JSON: one that does not parse raises ``ValueError``
    naming the argument, instead of reaching the model as a string."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        text = value.strip()
        if text.lower() in ("none", "null"):
            parsed = None
        elif text.lower() in ("true", "false"):
            parsed = text.lower() == "true"
        else:
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as error:
                if any(c in text for c in '{}[]"'):
                    raise ValueError(
                        f"--model-arg {item}: the value {text!r} is not valid JSON "
                        f"({error.msg} at column {error.colno})"
                    ) from None
                parsed = text
        kwargs[key.strip()] = parsed
    return kwargs


def _config(args: argparse.Namespace):
    from onebit.train import TrainConfig

    values = {name: getattr(args, name) for name in _OPTIONS if getattr(args, name) is not None}
    config = TrainConfig(
        **values, out=args.out, model_kwargs=parse_model_args(args.model_arg), tensorboard=bool(args.tensorboard)
    )
    config.validate()
    return config


def run(args: argparse.Namespace, console: Console) -> int:
    from onebit import train as training

    if args.resume:
        # how many processes train and decode, and where, may change (the device only by float rounding)
        given = [
            n for n in _OPTIONS if getattr(args, n) is not None and n not in ("workers", "loader_workers", "device")
        ]
        given += ["model_arg"] if args.model_arg else []
        if given or (args.out and os.path.abspath(args.out) != os.path.abspath(args.resume)):
            names = ", ".join("--" + n.replace("_", "-") for n in given) or "--out"
            raise ValueError(f"--resume continues the run's saved configuration; drop {names}")
        if args.overwrite:
            raise ValueError("--resume continues the run in DIR, --overwrite replaces it: give one of them")
        config = training.TrainConfig.from_dict(_load_config(args.resume))
        config.out = args.resume
        if args.workers is not None:
            config.workers = args.workers
        if args.device is not None:
            config.device = args.device
        if args.loader_workers is not None:
            if (args.loader_workers == 0) != (config.loader_workers == 0):
                raise ValueError(
                    f"--loader-workers {args.loader_workers}: the run started with {config.loader_workers}; "
                    "in-memory data is served whole batches at a time without loader workers and sample "
                    "by sample with them, so a resumed run keeps 0, or keeps at least 1"
                )
            config.loader_workers = args.loader_workers
        config.validate()
    else:
        config = _config(args)

    # one run per directory: rank 0 (the only writer) holds the directory's lock for the whole
    # command, across the processes it starts; the checks run on every rank before any writes
    writer = int(os.environ.get("RANK", "0")) == 0
    distributed = config.workers > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1
    trainer = None
    if config.out and not args.resume:
        _refuse_a_run_without_overwrite(config.out, args.overwrite)
        if writer:
            # every option is checked before --out is created: the model its arguments build, the
            # data, the teacher, the starting weights and the optimizer, by building the trainer
            # (the processes of a distributed run then build their own)
            trainer = training.Trainer.from_config(config, console)
            trainer = None if distributed else trainer
    lock = contextlib.nullcontext()
    if config.out and writer:
        training.prepare_run_directory(config.out)
        lock = training.lock_run_directory(config.out)
    with lock:
        if config.out and not args.resume:
            _refuse_a_run_without_overwrite(config.out, args.overwrite)  # again, now that the directory is ours
            if writer and training.holds_run(config.out):
                training.clear_run(config.out)
        return _run(config, args, console, trainer)


def _refuse_a_run_without_overwrite(out: str, overwrite: bool) -> None:
    from onebit import train as training

    if not overwrite and training.holds_run(out):
        raise training.RunDirectoryError(
            f"--out {out} already holds a run; continue it with `onebit train --resume {out}`, "
            "pass --overwrite to replace it, or choose another --out"
        )


def _run(config, args: argparse.Namespace, console: Console, trainer=None) -> int:
    """Train: in this process with ``trainer`` (built already) or a new one, in the processes
    torchrun started, or in ``config.workers`` processes started here."""
    from onebit import train as training

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun
        training.init_distributed_from_env()
        status = None
        try:
            status = _run_here(config, args.resume, console)
            return status
        finally:
            training.end_distributed(completed=status is not None)
    if config.workers > 1:
        status = training.run_distributed(config, config.workers, args.resume)
        if config.out and status == 0:
            console.print(
                f"saved run to {config.out}/ (model.safetensors, checkpoint.safetensors, config.json, history.csv)",
                highlight=False,
            )
        return status
    return _run_here(config, args.resume, console, trainer)


def _load_config(directory: str) -> dict:
    from onebit.train import read_run_config

    return read_run_config(directory)["config"]


def _run_here(config, resume_dir: str | None, console: Console, trainer=None) -> int:
    from onebit import train as training

    if resume_dir:
        trainer = training.Trainer.from_run(
            resume_dir, console, workers=config.workers, loader_workers=config.loader_workers, device=config.device
        )
        if trainer.epoch >= config.epochs:
            console.print(f"run {resume_dir} is already complete ({config.epochs} epochs)", highlight=False)
    elif trainer is None:
        trainer = training.Trainer.from_config(config, console)
    try:
        trainer.fit()
    except training.Interrupted as stop:
        if trainer.is_main:
            Console(stderr=True).print(f"onebit train: {stop}", highlight=False)
        return 130 if stop.signum == signal.SIGINT else 0
    metrics = trainer.evaluate_metrics()
    if config.out:
        console.print(
            f"saved run to {config.out}/ (model.safetensors, checkpoint.safetensors, config.json, history.csv)",
            highlight=False,
        )
    console.print(f"test accuracy: {metrics['accuracy']:.4f}", highlight=False)
    return 0


__all__ = ["register", "run", "parse_model_args"]
