"""The ``onebit`` command (also ``python -m onebit``).

Each subcommand lives in its own module of this package and defines
``register(commands)``, which adds its parser to the ``argparse`` subparsers and
sets ``run(args, console) -> exit code``. Modules are discovered automatically.
Errors a user can fix (``ValueError``, ``TypeError``, ``KeyError``, ``OSError`` such as a
missing file or a directory where a file belongs, ``MemoryError``) print one line naming
the problem and exit with status 2, without a traceback. onebit's warnings meant for the user
(:class:`onebit.engine.FallbackWarning`: a binary layer of a packed model runs in float) print
as one line too, ``onebit COMMAND: warning: ...``; the Python API warns with ``warnings.warn``.
The command keeps freed memory in the heap (:func:`onebit.heap.keep_freed_memory`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import sys
import warnings

from rich.console import Console
from rich.markup import escape

from onebit.heap import keep_freed_memory

__all__ = ["main", "build_parser", "integer", "numbers", "UsageError"]


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


def numbers(text: str) -> list[float]:
    """An ``argparse`` type: numbers separated by commas, e.g. ``0.485,0.456,0.406``."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


numbers.__name__ = "numbers"


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


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Within the block, a :class:`~onebit.engine.FallbackWarning` prints as one line on stderr,
    ``onebit COMMAND: warning: MESSAGE``; other warnings print as Python prints them."""
    with warnings.catch_warnings():  # restores warnings.showwarning on the way out
        python_way = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            packed = sys.modules.get("onebit.engine.packed")  # imported by whatever warned
            if packed is not None and issubclass(category, packed.FallbackWarning):
                text = " ".join(str(message).split())
                Console(stderr=True, soft_wrap=True).print(
                    f"[yellow]onebit {command}: warning:[/] " + escape(text), highlight=False
                )
            else:
                python_way(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(soft_wrap=True)
    keep_freed_memory()  # this process is onebit's: reuse freed tensors' memory (see onebit.heap)
    try:
        with _one_line_warnings(args.command):
            return int(args.run(args, console) or 0)
    except (UsageError, ValueError, OSError, TypeError, KeyError, MemoryError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if isinstance(error, MemoryError):
            message = f"out of memory ({error})" if str(error) else "out of memory"
        text = " ".join(str(message).split()) or type(error).__name__  # one line, always
        Console(stderr=True, soft_wrap=True).print(
            f"[red]onebit {args.command}: error:[/] " + escape(text), highlight=False
        )
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print(f"onebit {args.command}: interrupted", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
