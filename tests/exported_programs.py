"""A saved ``torch.export`` program run in a fresh Python process: what importing onebit registers is
all it has."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import torch


def saved_and_loaded(program: torch.export.ExportedProgram, path: pathlib.Path) -> torch.nn.Module:
    """``program`` saved to ``path`` and loaded back, as a module to call."""
    torch.export.save(program, path)
    return torch.export.load(path).module()


def gives_in_fresh_process(program_path: pathlib.Path, x: torch.Tensor, y: torch.Tensor) -> subprocess.CompletedProcess:
    """Load ``program_path`` in a new process after ``import onebit`` and run it on ``x``; the process exits
    0 when the output equals ``y``."""
    io = program_path.with_suffix(".io.pt")
    torch.save({"x": x, "y": y}, io)
    script = (
        "import sys, torch, onebit\n"
        f"p = torch.export.load({str(program_path)!r}).module()\n"
        f"d = torch.load({str(io)!r})\n"
        "sys.exit(0 if torch.equal(p(d['x']), d['y']) else 1)\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
