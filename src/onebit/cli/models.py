"""``onebit models``: list the zoo."""

from __future__ import annotations


def register(commands) -> None:
    p = commands.add_parser("models", help="list the zoo's models")
    p.add_argument("pattern", nargs="?", default="*", help="glob pattern (default: all)")
    p.set_defaults(run=_run)


def _run(args, console) -> int:
    from onebit import models

    for name in models.names(args.pattern):
        console.print(name, highlight=False)
    return 0
