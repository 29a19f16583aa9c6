"""``onebit push RUN DEST``: a trained run as a Hub-format folder (weights, packed file, card, config with
SHA-256s), written to a local folder or uploaded to ``hf://ORG/NAME`` (see :mod:`onebit.hub`)."""

from __future__ import annotations

import argparse

from rich.console import Console


def register(commands) -> None:
    p = commands.add_parser(
        "push",
        help="publish a trained run as a Hub-format folder (local or hf://ORG/NAME)",
        description="Write RUN's model.safetensors, its packed engine file (model.onebit.safetensors), a model "
        "card (README.md) and config.json (the run's config and each file's SHA-256) to DEST: a local folder, "
        "or hf://ORG/NAME with a Hugging Face token configured (`hf auth login` or HF_TOKEN). Load it back with "
        "onebit.models.from_pretrained(DEST), `onebit eval DEST` or `onebit export DEST`.",
    )
    p.add_argument("run_dir", metavar="RUN", help="run directory written by `onebit train --out`")
    p.add_argument("dest", metavar="DEST", help="local folder, or hf://ORG/NAME")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty DEST that holds no previous push (its other files are kept)",
    )
    p.add_argument(
        "--name",
        default=None,
        metavar="ORG/NAME",
        help="the Hub repository the model card names, for a local DEST (default: hf://ORG/NAME)",
    )
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from onebit.hub import push

    result = push(args.run_dir, args.dest, overwrite=args.overwrite, repo_id=args.name, private=args.private)
    accuracy = result.metrics.get("accuracy")
    console.print(
        f"pushed {result.model} from {args.run_dir} to {result.url or result.dest}: model.safetensors "
        f"{result.float_bytes / 1024:.1f} KiB, model.onebit.safetensors {result.packed_bytes / 1024:.1f} KiB "
        f"({result.float_bytes / max(result.packed_bytes, 1):.1f}x smaller), "
        f"max |packed - model| = {result.max_diff:.3g}"
        + (f", accuracy {accuracy:.4f}" if accuracy is not None else ""),
        highlight=False,
    )
    return 0
