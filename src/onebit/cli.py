"""The ``onebit`` command (also ``python -m onebit``)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console

__all__ = ["main"]


def _train(args: argparse.Namespace, console: Console) -> int:
    from onebit.train import TrainConfig, train

    config = TrainConfig(
        model=args.model,
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        seed=args.seed,
        out=args.out,
    )
    trainer = train(config, console)
    if args.out:
        console.print(f"saved run to {args.out}/ (model.safetensors, config.json, history.csv)", highlight=False)
    _, accuracy = trainer.evaluate()
    console.print(f"test accuracy: {accuracy:.4f}", highlight=False)
    return 0


def _demo(args: argparse.Namespace, console: Console) -> int:
    from onebit.demo import run

    run(out=args.out, epochs=args.epochs, console=console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onebit", description="Binary neural networks for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train a zoo model on a dataset")
    p.add_argument("--model", default="lenet_binary", help="zoo model name (see `onebit models`)")
    p.add_argument("--data", default="digits", help="dataset name or directory (default: digits)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate")
    p.add_argument("--optimizer", default="adam", help="adam or sgd")
    p.add_argument("--schedule", default="one-cycle", help="one-cycle, cosine or constant")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="run directory for checkpoints and history.csv")
    p.set_defaults(run=_train)

    p = commands.add_parser("demo", help="train a binary LeNet on digits and show the whole pipeline")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--epochs", type=int, default=20)
    p.set_defaults(run=_demo)

    p = commands.add_parser("models", help="list the zoo's models")
    p.set_defaults(run=lambda args, console: _list_models(console))
    return parser


def _list_models(console: Console) -> int:
    from onebit import models

    for name in models.names():
        console.print(name, highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console()
    try:
        return args.run(args, console)
    except (ValueError, FileNotFoundError, TypeError) as error:
        Console(stderr=True).print(f"[red]onebit {args.command}: error:[/] {error}", highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print(f"onebit {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
