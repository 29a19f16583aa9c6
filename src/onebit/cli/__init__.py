"""The ``onebit`` command (also ``python -m onebit``).

Each subcommand lives in its own module of this package and defines
``register(commands)``, which adds its parser to the ``argparse`` subparsers and
sets ``run(args, console) -> exit code``. Modules are discovered automatically.
Errors a user can fix (``ValueError``, ``TypeError``, ``KeyError``, ``OSError`` such as a
missing file or a directory where a file belongs, ``MemoryError``) print one line naming
the problem and exit with status 2, without a traceback.
The command keeps freed memory in the heap (:func:`onebit.heap.keep_freed_memory`).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from rich.console import Console
from rich.markup import escape

from onebit.heap import keep_freed_memory

__all__ = ["main", "build_parser", "integer", "UsageError"]


class UsageError(Exception):
    """An error caused by the command line or its files; printed as one line."""


def integer(lo: int = 1, hi: int = 1 << 31):
    """An ``argparse`` type: an integer in ``[lo, hi]`` (the error names the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in [{lo}, {hi}], got {text}")
        return value

    parse.__name__ = "integer"
    return parse


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="onebit", description="Binary neural networks for PyTorch.")
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
    except (UsageError, ValueError, OSError, TypeError, KeyError, MemoryError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if isinstance(error, MemoryError):
            message = f"out of memory ({error})" if str(error) else "out of memory"
        text = " ".join(str(message).split()) or type(error).__name__  # one line, always
        Console(stderr=True, soft_wrap=True).print(f"[red]onebit {args.command}: error:[/] " + escape(text), highlight=False)
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print(f"onebit {args.command}: interrupted", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
