"""``onebit train``: train a zoo model on a dataset."""

from __future__ import annotations

import argparse

from rich.console import Console


def register(commands) -> None:
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
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
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
