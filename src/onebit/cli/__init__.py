"""The ``onebit`` command (also ``python -m onebit``).

Each subcommand lives in its own module of this package and defines
``register(commands)``, which adds its parser to the ``argparse`` subparsers and
sets ``run(args, console) -> exit code``. Modules are discovered automatically.
Errors a user can fix (``ValueError``, ``FileNotFoundError``, ``TypeError``)
print one line naming the problem and exit with status 2, without a traceback.
The command keeps freed memory in the heap (:func:`onebit.heap.keep_freed_memory`).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from rich.console import Console

from onebit.heap import keep_freed_memory

__all__ = ["main", "build_parser"]


class UsageError(Exception):
    """An error caused by the command line or its files; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onebit", description="Binary neural networks for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(soft_wrap=True)
    keep_freed_memory()  # this process is onebit's: reuse freed tensors' memory (see onebit.heap)
    try:
        return int(args.run(args, console) or 0)
    except (UsageError, ValueError, FileNotFoundError, TypeError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        Console(stderr=True, soft_wrap=True).print(f"[red]onebit {args.command}: error:[/] {message}", highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print(f"onebit {args.command}: interrupted", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
