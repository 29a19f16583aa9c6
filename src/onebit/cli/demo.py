"""``onebit demo``: the main job behind ``make demo``."""

from __future__ import annotations

from onebit.cli import integer


def register(commands) -> None:
    p = commands.add_parser("demo", help="train a binary LeNet on digits and show the whole pipeline")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--epochs", type=integer(1, 10**6), default=20)
    p.set_defaults(run=lambda args, console: _run(args, console))


def _run(args, console) -> int:
    from onebit.demo import run

    run(out=args.out, epochs=args.epochs, console=console)
    return 0
