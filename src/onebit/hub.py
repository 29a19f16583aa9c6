"""``onebit push``: a trained run as a Hub-format folder, written locally or uploaded to the Hugging Face Hub.

The folder (every file written atomically; ``config.json`` last, so a folder whose ``config.json``
records the files' SHA-256 holds a complete push):

- ``model.safetensors``: the run's ``state_dict``, byte for byte the run's file;
- ``model.onebit.safetensors``: the packed engine file (:func:`onebit.engine.pack`, as ``onebit export``
  makes it), whose output is checked against the model's on an example before it is published;
- ``README.md``: the model card (YAML front matter for the Hub, the data, the ``onebit train`` command
  that reproduces the run, its final metrics, the files' sizes, how to load it);
- ``config.json``: the run's ``config.json`` plus ``sha256`` (each file's digest, checked by
  :func:`onebit.models.weights.fetch_weights`), ``metrics`` and ``packed`` (size, max |packed - model|).

Reading it back is :mod:`onebit.models.weights`' (``from_pretrained``, ``create(..., weights=)``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shlex
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from onebit import io
from onebit.models.weights import (
    CARD_FILE,
    CONFIG_FILE,
    PACKED_FILE,
    WEIGHTS_FILE,
    HubError,
    HubRef,
    import_hub,
    is_hub_ref,
    is_pushed_folder,
    parse_hub_ref,
    quiet_hub,
)

__all__ = ["PushResult", "push", "write_push_folder", "train_command", "final_metrics", "model_card"]

#: the options every reproduction command names, default or not
_ALWAYS = ("model", "data", "epochs", "batch_size", "lr", "optimizer", "schedule", "seed")
#: the options a reproduction command leaves out: where the run is written and what it logs
_NEVER = ("out", "model_kwargs", "tensorboard")
#: max |packed - model| allowed on the check example, relative to max(1, max |model|)
PACKED_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` wrote: where, which model, the two files' sizes, the packed check and the metrics."""

    dest: str
    model: str
    float_bytes: int
    packed_bytes: int
    max_diff: float
    metrics: dict[str, Any]
    url: str | None = None


# -- the card's contents -----------------------------------------------------------------------
def _model_arg(key: str, value: Any) -> str:
    """``KEY=VALUE`` as ``onebit train --model-arg`` parses it back to ``value``."""
    plain = isinstance(value, str) and not any(c in value for c in '{}[]"')  # brackets or quotes: JSON
    if plain and value.lower() not in ("none", "null", "true", "false"):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return f"{key}={value}"  # a plain word: --model-arg reads it as this string
    return f"{key}={json.dumps(value, separators=(',', ':'))}"


def train_command(config: dict[str, Any], out: str = "runs/model") -> str:
    """The ``onebit train`` command line that trains ``config`` (a run's ``config.json`` ``config``)
    again: every option that differs from its default, the main ones always."""
    from onebit.train import TrainConfig

    args = ["onebit", "train"]
    for field in dataclasses.fields(TrainConfig):
        if field.name in _NEVER or field.name not in config:
            continue
        value = config[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if value == default and field.name not in _ALWAYS:
            continue
        text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)  # --mean 0.5,0.5
        args += ["--" + field.name.replace("_", "-"), text]
    for key, value in sorted(config.get("model_kwargs", {}).items()):
        args += ["--model-arg", _model_arg(key, value)]
    if config.get("tensorboard"):
        args.append("--tensorboard")
    args += ["--out", out]
    return " ".join(shlex.quote(a) for a in args)


def final_metrics(history_path: str, topk: int, num_classes: int) -> dict[str, Any]:
    """The last row of a run's ``history.csv``: ``epochs`` (rows), ``accuracy``, ``top_k_accuracy``
    with its ``k``, ``valid_loss``; empty when the run has no history."""
    if not os.path.isfile(history_path):
        return {}
    with open(history_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    last = rows[-1]
    metrics: dict[str, Any] = {"epochs": len(rows), "k": min(topk, num_classes)}
    for key in ("accuracy", "top_k_accuracy", "valid_loss", "train_loss"):
        try:
            metrics[key] = float(last[key])
        except (KeyError, TypeError, ValueError):
            pass
    return metrics


def _python_literal(value: Any) -> str:
    """``value`` as Python source in ruff's and black's style (double-quoted strings), as the card shows it."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_python_literal(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_python_literal(k)}: {_python_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f} KiB"


def _yaml_list(items: list[str]) -> str:
    return "".join(f"\n- {json.dumps(item)}" for item in items)


def model_card(
    meta: dict[str, Any],
    metrics: dict[str, Any],
    float_bytes: int,
    packed_bytes: int,
    max_diff: float,
    repo_id: str | None,
) -> str:
    """The ``README.md`` of a push: YAML front matter (library, tags, datasets, metrics, model-index)
    and the data, reproduction command, final metrics, file sizes and loading instructions."""
    run = meta["config"]
    model, data = run["model"], run["data"]
    dataset = os.path.basename(os.path.normpath(data)) or data
    size = "x".join(str(v) for v in meta["image_size"])
    hub = f"hf://{repo_id}" if repo_id else "hf://ORG/NAME"
    accuracy = metrics.get("accuracy")
    k = metrics.get("k", run.get("topk", 5))
    tags = ["onebit", "binary-neural-network", "image-classification", model]
    lines = [
        "---",
        "library_name: onebit",
        "pipeline_tag: image-classification",
        "tags:" + _yaml_list(tags),
        "datasets:" + _yaml_list([dataset]),
        "metrics:" + _yaml_list(["accuracy", f"top_{k}_accuracy"] if accuracy is not None else ["accuracy"]),
    ]
    if accuracy is not None:
        results = [("accuracy", accuracy, "test accuracy")]
        if "top_k_accuracy" in metrics:
            results.append((f"top_{k}_accuracy", metrics["top_k_accuracy"], f"test top-{k} accuracy"))
        lines += [
            "model-index:",
            f"- name: {json.dumps(model)}",
            "  results:",
            "  - task:",
            "      type: image-classification",
            "    dataset:",
            f"      name: {json.dumps(dataset)}",
            f"      type: {json.dumps(dataset)}",
            "    metrics:",
        ]
        for kind, value, name in results:
            lines += [f"    - type: {kind}", f"      value: {value}", f"      name: {json.dumps(name)}"]
    lines.append("---")
    kwargs = ", ".join(f"{k_}={_python_literal(v)}" for k_, v in sorted(run.get("model_kwargs", {}).items()))
    epochs = metrics.get("epochs")
    planned = run.get("epochs")
    trained = f"{epochs} epoch(s)" if epochs is not None else "an unknown number of epochs (no history.csv)"
    if epochs is not None and planned is not None and epochs < planned:
        trained += f" of the {planned} planned (the run was interrupted; the command below trains all {planned})"
    ratio = float_bytes / max(packed_bytes, 1)
    lines += [
        "",
        f"# {model} trained on {dataset}",
        "",
        f"onebit's `{model}`{f' ({kwargs})' if kwargs else ''}, trained with `onebit train` for {trained} on "
        f"`{data}`: {meta['num_classes']} classes, {meta['in_channels']} channel(s), {size} images"
        + (f" (classes: {', '.join(map(str, meta['classes']))})." if meta.get("classes") else "."),
        "",
        "## Results",
        "",
        f"| epochs | test accuracy | test top-{k} accuracy | test loss |",
        "|---|---|---|---|",
        "| {} | {} | {} | {} |".format(
            epochs if epochs is not None else "—",
            f"{accuracy:.4f}" if accuracy is not None else "—",
            f"{metrics['top_k_accuracy']:.4f}" if "top_k_accuracy" in metrics else "—",
            f"{metrics['valid_loss']:.4f}" if "valid_loss" in metrics else "—",
        ),
        "",
        "## Files",
        "",
        "| file | contents | size |",
        "|---|---|---|",
        f"| `{WEIGHTS_FILE}` | the trained `state_dict` (latent float weights) | {_kib(float_bytes)} |",
        f"| `{PACKED_FILE}` | the bit-packed engine file (`onebit.engine.pack`; max \\|packed − model\\| = "
        f"{max_diff:.3g} on the check example) | {_kib(packed_bytes)}, {ratio:.1f}x smaller |",
        f"| `{CONFIG_FILE}` | the run's configuration, the files' SHA-256 and these metrics | |",
        "",
        "## Reproduce",
        "",
        "```sh",
        train_command(run, out=f"runs/{model}"),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "import onebit",
        "",
        f'model = onebit.models.from_pretrained("{hub}")  # checks each file\'s SHA-256',
        f'model = onebit.models.create("{model}", weights="{hub}"'
        + "".join(f", {k_}={_python_literal(v)}" for k_, v in sorted(run.get("model_kwargs", {}).items()))
        + ")",
        f'packed = onebit.engine.load("{PACKED_FILE}")  # the packed model, from a downloaded copy',
        "```",
        "",
        "```sh",
        f"onebit eval {hub}                      # test accuracy on the run's data",
        f"onebit export {hub} --out model.onnx   # ONNX (or a packed engine file)",
        "```",
    ]
    lines += ["", 'A local copy of this folder loads the same way: `onebit.models.from_pretrained("path/to/folder")`.']
    return "\n".join(lines) + "\n"


# -- writing the folder ------------------------------------------------------------------------
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _engine():
    """``onebit.engine``, or a ``ValueError`` when this installation has none."""
    try:
        import onebit.engine as engine
    except ImportError as error:
        raise ValueError(f"the packed engine (onebit.engine) is not available in this installation ({error})") from None
    return engine


def _check_packed(engine, model: torch.nn.Module, path: str, example: torch.Tensor) -> float:
    """max |packed - model| of the written packed file on ``example``; ``ValueError`` when it disagrees."""
    loaded = engine.load(path)
    with torch.no_grad():
        expected = model(example)
        got = torch.as_tensor(loaded(example))
    if got.shape != expected.shape:
        raise ValueError(
            f"{path}: the packed model's output has shape {list(got.shape)}, the model's {list(expected.shape)}"
        )
    diff = (got.float() - expected.float()).abs().max().item() if expected.numel() else 0.0
    if not diff <= PACKED_TOLERANCE * max(1.0, expected.abs().max().item()):
        raise ValueError(
            f"{path}: the packed model's output differs from the model's by {diff:.3g} on the check example"
        )
    return diff


def write_push_folder(run_dir: str, folder: str, repo_id: str | None = None) -> PushResult:
    """Write the push of ``run_dir`` into ``folder`` (see the module's docstring); returns what it wrote."""
    from onebit.train import load_run

    model, meta = load_run(run_dir)
    source = os.path.join(run_dir, WEIGHTS_FILE)
    with open(source, "rb") as f:
        data = f.read()
    from safetensors.torch import load as load_bytes

    published = load_bytes(data)
    if published.keys() != model.state_dict().keys() or not all(
        torch.equal(published[k], v) for k, v in model.state_dict().items()
    ):
        raise ValueError(f"{source} changed while it was being pushed: push again")
    engine = _engine()
    shape = (1, meta["in_channels"], *meta["image_size"])
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed = engine.pack(model, example)

    io.ensure_directory(folder)
    weights_path = os.path.join(folder, WEIGHTS_FILE)
    packed_path = os.path.join(folder, PACKED_FILE)
    io.atomic_write_bytes(weights_path, data)
    packed.save(packed_path)
    max_diff = _check_packed(engine, model, packed_path, example)
    run = meta["config"]
    metrics = final_metrics(os.path.join(run_dir, "history.csv"), run.get("topk", 5), meta["num_classes"])
    float_bytes, packed_bytes = len(data), os.path.getsize(packed_path)
    card = model_card(meta, metrics, float_bytes, packed_bytes, max_diff, repo_id)
    io.atomic_write_bytes(os.path.join(folder, CARD_FILE), card.encode())
    pushed = {k: v for k, v in meta.items() if k not in ("sha256", "metrics", "packed")}
    # where the run lived on the pusher's machine is no part of the model (the data's name stays: the card cites it)
    pushed["config"] = {**run, "out": None}
    pushed["sha256"] = {
        WEIGHTS_FILE: hashlib.sha256(data).hexdigest(),
        PACKED_FILE: _sha256(packed_path),
        CARD_FILE: hashlib.sha256(card.encode()).hexdigest(),
    }
    pushed["metrics"] = metrics
    pushed["packed"] = {
        "bytes": packed_bytes,
        "float_bytes": float_bytes,
        "max_abs_diff": max_diff,
        "check_input": f"torch.randn({list(shape)}, generator seeded 0)",
    }
    io.save_json(os.path.join(folder, CONFIG_FILE), pushed)
    return PushResult(folder, run["model"], float_bytes, packed_bytes, max_diff, metrics)


def _check_local_dest(run_dir: str, dest: str, overwrite: bool) -> None:
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise NotADirectoryError(f"DEST {dest} is a file: name a folder to write the push into")
    if os.path.isdir(dest):
        if os.path.realpath(dest) == os.path.realpath(run_dir):
            raise ValueError(f"DEST {dest} is the run directory itself: name another folder")
        if os.listdir(dest) and not is_pushed_folder(dest) and not overwrite:
            raise FileExistsError(
                f"DEST {dest} is not empty and holds no previous onebit push: choose another folder, "
                "or pass --overwrite to write the push's files into it"
            )


def push(
    run_dir: str, dest: str, *, overwrite: bool = False, repo_id: str | None = None, private: bool = False
) -> PushResult:
    """Push the run ``run_dir`` to ``dest``: a local folder, or ``hf://ORG/NAME`` (uploaded with the
    configured Hugging Face token). A non-empty local folder (or Hub repository) that holds no previous
    push is refused unless ``overwrite``. ``repo_id`` names the Hub repository in a local push's card."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir!r} is not a run directory (written by `onebit train --out`)")
    if not is_hub_ref(dest):
        dest = os.fspath(dest)
        if repo_id is not None:
            parse_hub_ref(f"hf://{repo_id}")
        _check_local_dest(run_dir, dest, overwrite)
        return write_push_folder(run_dir, dest, repo_id)
    ref = parse_hub_ref(dest)
    if ref.revision is not None:
        raise ValueError(f"{dest}: push to hf://ORG/NAME, without @REVISION (the upload is a commit on main)")
    hf = import_hub(dest)
    token = hf.get_token()
    if not token:
        raise HubError(
            f"{dest}: no Hugging Face token configured: "
            "run `hf auth login` or set HF_TOKEN to a token with write access"
        )
    with tempfile.TemporaryDirectory(prefix="onebit-push-") as folder:
        result = write_push_folder(run_dir, folder, ref.repo_id)
        with quiet_hub():
            url = _upload(hf, ref, folder, token, overwrite, private, result.model)
    return dataclasses.replace(result, dest=dest, url=url)


def _upload(hf, ref: HubRef, folder: str, token: str, overwrite: bool, private: bool, model: str) -> str:
    """Create the repository (if needed) and commit ``folder`` to it; returns the commit's URL."""
    api = hf.HfApi(token=token)
    try:
        api.create_repo(ref.repo_id, private=private, exist_ok=True)
        files = set(api.list_repo_files(ref.repo_id))
        if files - {".gitattributes", CARD_FILE} and not overwrite:
            pushed = False
            if CONFIG_FILE in files:
                with open(hf.hf_hub_download(ref.repo_id, CONFIG_FILE, token=token), "rb") as f:
                    try:
                        pushed = isinstance(json.loads(f.read()).get("sha256"), dict)
                    except (ValueError, AttributeError):
                        pushed = False
            if not pushed:
                raise HubError(
                    f"{ref}: the repository holds files of something else than a onebit push: pass --overwrite"
                )
        info = api.upload_folder(repo_id=ref.repo_id, folder_path=folder, commit_message=f"onebit push: {model}")
    except HubError:
        raise
    except (TypeError, AttributeError, NameError):
        raise
    except Exception as error:
        raise HubError(f"{ref}: the upload failed: {' '.join(str(error).split()) or type(error).__name__}") from None
    return str(getattr(info, "commit_url", "") or f"{hf.constants.ENDPOINT}/{ref.repo_id}")
