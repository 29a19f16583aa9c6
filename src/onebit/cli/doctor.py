"""``onebit doctor``: why a binary network does not learn, on a zoo model, a saved run or your own code."""

from __future__ import annotations

import argparse
import inspect
import math
import os
from typing import TYPE_CHECKING

from rich.console import Console

from onebit.cli import integer

if TYPE_CHECKING:
    import torch


def register(commands) -> None:
    p = commands.add_parser("doctor", help="find the layer where learning dies (zoo model, saved run or FILE.py:NAME)")
    p.add_argument(
        "target",
        help="zoo model name (see `onebit models`), a run directory written by `onebit train`, or FILE.py:NAME, "
        "a module class or zero-argument factory defined in a Python file",
    )
    p.add_argument(
        "--data",
        default=None,
        help="dataset for the batch (default: the run's dataset, digits for a zoo model, random "
        "inputs of --input-shape for FILE.py:NAME)",
    )
    p.add_argument(
        "--input-shape",
        default=None,
        metavar="C,H,W",
        help="shape of one example for FILE.py:NAME without --data (random normal inputs)",
    )
    p.add_argument(
        "--batch-size", type=integer(1, 1 << 16), default=64, help="examples in the diagnostic batch (default 64)"
    )
    p.add_argument("--seed", type=integer(0, 2**32 - 1), default=0)
    p.set_defaults(run=run)


def split_file_target(target: str) -> tuple[str, str | None] | None:
    """``(path, name or None)`` when ``target`` names a Python file (``FILE.py`` or ``FILE.py:NAME``)."""
    path, sep, name = target.rpartition(":")
    if sep and path.endswith(".py"):
        return path, name or None
    if target.endswith(".py"):
        return target, None
    return None


def load_user_model(path: str, name: str | None):
    """Build the model ``NAME`` of a Python file: an ``nn.Module`` class (called with no
    arguments) or a zero-argument function returning a module. Without ``NAME``, the file's
    only ``nn.Module`` subclass."""
    from torch import nn

    from onebit.models.registry import import_model_file

    module = import_model_file(path)
    defined = [
        n
        for n, v in vars(module).items()
        if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__
    ]
    if name is None:
        if len(defined) != 1:
            found = f"it defines {', '.join(defined)}" if defined else "it defines no nn.Module subclass"
            raise ValueError(f"say which model of {path} to examine as FILE.py:NAME ({found})")
        name = defined[0]
    if not hasattr(module, name):
        raise ValueError(f"{path} has no {name!r}; its nn.Module classes: {', '.join(defined) or 'none'}")
    factory = getattr(module, name)
    if not callable(factory):
        raise TypeError(f"{path}:{name} is a {type(factory).__name__}, expected an nn.Module class or a factory")
    required = (
        [
            p.name
            for p in inspect.signature(factory).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        if not isinstance(factory, nn.Module)
        else []
    )
    if required:
        raise TypeError(
            f"{path}:{name} needs arguments ({', '.join(required)}); give a class or factory "
            "that builds the model without arguments"
        )
    model = factory if isinstance(factory, nn.Module) else factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{path}:{name}() returned {type(model).__name__}, expected an nn.Module")
    return model, f"{path}:{name}"


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape):
        raise ValueError(f"--input-shape must be positive integers like 3,32,32, got {text!r}")
    return shape


def random_inputs(text: str, batch_size: int, generator) -> torch.Tensor:
    """``batch_size`` random normal inputs of ``--input-shape`` ``text``; a batch too large for this
    machine raises ``ValueError`` naming the option and the memory it needs, before allocating."""
    import torch

    shape = parse_shape(text)
    values = batch_size * math.prod(shape)
    need = 4 * values  # float32
    memory = _physical_memory()
    # the diagnosis holds the batch, the activations and their gradients: a quarter of the memory
    if memory is not None and need > memory // 4:
        raise ValueError(
            f"--input-shape {text}: a batch of {batch_size} inputs of shape {list(shape)} needs {values:,} float32 "
            f"values ({_size(need)}), more than a quarter of this machine's memory ({_size(memory)}); "
            "give a smaller --input-shape or --batch-size"
        )
    try:
        return torch.randn(batch_size, *shape, generator=generator)
    except (RuntimeError, MemoryError) as error:  # the allocator's refusal
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"--input-shape {text}: cannot allocate a batch of {batch_size} inputs of shape "
            f"{list(shape)} ({_size(need)}): {first}"
        ) from None


def _physical_memory() -> int | None:
    """This machine's memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def load_target(target: str, data: str | None):
    """(model, data bundle, description) for a zoo name or a run directory."""
    from onebit import data as datasets
    from onebit import models

    looks_like_path = os.path.sep in target or target.startswith(".") or os.path.exists(target)
    if looks_like_path:
        from onebit.train import load_run

        if not os.path.isdir(target):
            raise FileNotFoundError(
                f"{target!r} is neither a zoo model nor a run directory (for your own code: FILE.py:NAME)"
            )
        model, meta = load_run(target)
        stats = {"mean": meta["mean"], "std": meta["std"]} if meta.get("std") else {}  # as the run was trained
        bundle = datasets.load(
            data or meta["config"].get("data", "digits"), image_size=meta["config"].get("image_size"), **stats
        )
        return model, bundle, f"run {target} ({meta['config']['model']})"
    if target not in models.names():
        raise ValueError(
            f"unknown model {target!r}; known models: {', '.join(models.names())} "
            "(or give a run directory, or FILE.py:NAME)"
        )
    bundle = datasets.load(data or "digits")
    model = models.create(target, num_classes=bundle.num_classes, in_channels=bundle.in_channels)
    return model, bundle, f"{target} (randomly initialized)"


def run(args: argparse.Namespace, console: Console) -> int:
    import torch

    from onebit.doctor import doctor

    if args.batch_size < 2:
        raise ValueError(f"--batch-size must be at least 2, got {args.batch_size}")
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    user = split_file_target(args.target)
    if user is not None:
        model, what = load_user_model(*user)
        if args.data is None:
            if args.input_shape is None:
                raise ValueError(f"{what}: give --input-shape C,H,W (random inputs) or --data DATASET")
            images = random_inputs(args.input_shape, args.batch_size, g)
            labels, source = None, f"random inputs {list(images.shape[1:])}"
        else:
            from onebit import data as datasets

            bundle = datasets.load(args.data)
            index = torch.randperm(len(bundle.train), generator=g)[: args.batch_size]
            (images, labels), source = bundle.train.batch(index), bundle.name
    else:
        model, bundle, what = load_target(args.target, args.data)
        index = torch.randperm(len(bundle.train), generator=g)[: args.batch_size]
        (images, labels), source = bundle.train.batch(index), bundle.name
    try:
        report = doctor(model, images, labels)
    except (RuntimeError, IndexError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{what} does not run on {source} {list(images.shape[1:])}: {first}") from None
    console.print(f"{what} on {source}", highlight=False, markup=False)
    console.print(report, soft_wrap=False)  # wrap the findings to the width, never crop them
    return 0 if report.ok else 1
