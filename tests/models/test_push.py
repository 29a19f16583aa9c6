"""``onebit push RUN DEST``: the Hub-format folder (the run's weights byte for byte, the packed file equal
to the model, the model card with the command that trains the run again and its final metrics,
config.json with each file's SHA-256), eval / export of the folder, --weights, and refusals."""

import csv
import hashlib
import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from onebit import data as datasets
from onebit import engine
from onebit.cli import main
from onebit.hub import train_command
from onebit.models import from_pretrained
from onebit.train import TrainConfig, Trainer, load_run

FILES = {"model.safetensors", "model.onebit.safetensors", "README.md", "config.json"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("push") / "run"
    config = TrainConfig(
        model="lenet_binary", data="digits", epochs=1, seed=7, lr=0.02, topk=3, out=str(out), model_kwargs={"width": 8}
    )
    Trainer(config).fit()
    return out


@pytest.fixture(scope="module")
def pushed(run_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("dest") / "lenet-digits"
    assert main(["push", str(run_dir), str(dest), "--name", "onebit-tests/lenet-digits"]) == 0
    return dest


def cli(capsys, *args):
    """Exit status, non-empty stderr lines and stdout of ``onebit ARGS`` in this process."""
    try:
        status = main(list(args))
    except SystemExit as stop:
        status = stop.code
    captured = capsys.readouterr()
    return status, [line for line in captured.err.splitlines() if line.strip()], captured.out


def accuracy_line(text):
    return [line for line in text.splitlines() if line.startswith("accuracy:")]


def history(run_dir):
    with open(run_dir / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def card_parts(pushed):
    text = (pushed / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return front, body


def test_push_writes_the_weights_byte_for_byte_and_records_every_sha256(run_dir, pushed):
    assert set(os.listdir(pushed)) == FILES  # no temporaries left behind
    assert (pushed / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()
    with open(pushed / "config.json") as f:
        config = json.load(f)
    with open(run_dir / "config.json") as f:
        run_config = json.load(f)
    run_config["config"]["out"] = None  # where the run lived on the pusher's machine is not published
    assert {k: v for k, v in config.items() if k in run_config} == run_config
    for name in FILES - {"config.json"}:
        assert config["sha256"][name] == hashlib.sha256((pushed / name).read_bytes()).hexdigest(), name
    assert config["packed"]["bytes"] == os.path.getsize(pushed / "model.onebit.safetensors")


def test_the_packed_file_computes_the_models_outputs(run_dir, pushed):
    model, _ = load_run(str(run_dir))
    packed = engine.load(str(pushed / "model.onebit.safetensors"))
    x, _ = datasets.load("digits").test.tensors
    with torch.no_grad():
        assert torch.equal(torch.as_tensor(packed(x[:64])), model(x[:64]))
    assert os.path.getsize(pushed / "model.onebit.safetensors") < os.path.getsize(pushed / "model.safetensors")


def test_the_card_has_hub_metadata_and_the_final_metrics_of_history_csv(run_dir, pushed):
    yaml = pytest.importorskip("yaml")
    front, body = card_parts(pushed)
    meta = yaml.safe_load(front)
    last = history(run_dir)[-1]
    assert meta["library_name"] == "onebit"
    assert {"onebit", "binary-neural-network", "lenet_binary"} <= set(meta["tags"])
    assert meta["datasets"] == ["digits"] and "accuracy" in meta["metrics"]
    results = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert results == {"accuracy": float(last["accuracy"]), "top_3_accuracy": float(last["top_k_accuracy"])}
    assert (
        f"| 1 | {float(last['accuracy']):.4f} | {float(last['top_k_accuracy']):.4f} | {float(last['valid_loss']):.4f} |"
        in body
    )
    kib = lambda name: f"{os.path.getsize(pushed / name) / 1024:.1f} KiB"  # noqa: E731
    assert kib("model.safetensors") in body and kib("model.onebit.safetensors") in body
    assert (
        'from_pretrained("hf://onebit-tests/lenet-digits")' in body
        and "onebit eval hf://onebit-tests/lenet-digits" in body
    )


def test_the_cards_command_trains_the_same_run_again(run_dir, pushed, tmp_path, capsys):
    _, body = card_parts(pushed)
    commands = [line for line in body.splitlines() if line.startswith("onebit train ")]
    assert len(commands) == 1
    args = shlex.split(commands[0])[1:]
    args[args.index("--out") + 1] = str(tmp_path / "again")
    status, errors, _ = cli(capsys, *args)
    assert status == 0, errors
    with open(run_dir / "config.json") as f:
        original = json.load(f)
    with open(tmp_path / "again" / "config.json") as f:
        again = json.load(f)
    original["config"].pop("out"), again["config"].pop("out")
    assert again == original
    first, second = (
        load_file(str(run_dir / "model.safetensors")),
        load_file(str(tmp_path / "again" / "model.safetensors")),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(
    "config, expected",
    [
        (
            {
                "model": "m",
                "data": "d",
                "epochs": 2,
                "batch_size": 64,
                "lr": 0.01,
                "optimizer": "adam",
                "schedule": "one-cycle",
                "seed": 0,
                "model_kwargs": {},
            },
            (
                "onebit train --model m --data d --epochs 2 --batch-size 64 --lr 0.01 --optimizer adam "
                "--schedule one-cycle --seed 0 --out runs/x"
            ),
        ),
        (
            {
                "model": "m",
                "data": "/data/fashion mnist",
                "epochs": 2,
                "batch_size": 64,
                "lr": 0.01,
                "optimizer": "bop",
                "schedule": "one-cycle",
                "seed": 0,
                "weight_clip": 1.0,
                "image_size": 32,
                "tensorboard": True,
                "model_kwargs": {
                    "conv_layer": "float",
                    "widths": [32, 96],
                    "tag": "1",
                    "clip": {"name": "dorefa_sym", "learnable": True},
                },
            },
            "onebit train --model m --data '/data/fashion mnist' --epochs 2 --batch-size 64 --lr 0.01 --optimizer bop "
            "--schedule one-cycle --seed 0 --image-size 32 --weight-clip 1.0 "
            '--model-arg \'clip={"name":"dorefa_sym","learnable":true}\' --model-arg conv_layer=float '
            "--model-arg 'tag=\"1\"' --model-arg 'widths=[32,96]' --tensorboard --out runs/x",
        ),
        (
            {"model": "m", "mean": [0.485, 0.456], "std": [0.229, 0.224], "model_kwargs": {}},
            "onebit train --model m --mean 0.485,0.456 --std 0.229,0.224 --out runs/x",
        ),
    ],
)
def test_train_command_names_every_option_that_differs_from_its_default(config, expected):
    assert train_command(config, out="runs/x") == expected


def test_the_model_card_commands_model_args_parse_back_to_the_config():
    from onebit.cli.train import parse_model_args

    kwargs = {
        "conv_layer": "float",
        "widths": [32, 96],
        "tag": "1",
        "flag": "true",
        "none": None,
        "x": 1.5,
        "odd": "a[b",
        "clip": {"name": "dorefa_sym", "learnable": True},
    }
    args = shlex.split(train_command({"model": "m", "model_kwargs": kwargs}))
    items = [args[i + 1] for i, a in enumerate(args) if a == "--model-arg"]
    assert parse_model_args(items) == kwargs


def test_eval_of_the_pushed_folder_prints_the_runs_accuracy(run_dir, pushed, capsys):
    status, errors, from_run = cli(capsys, "eval", str(run_dir))
    assert status == 0, errors
    status, errors, from_push = cli(capsys, "eval", str(pushed))
    assert status == 0, errors
    assert accuracy_line(from_push) == accuracy_line(from_run) and accuracy_line(from_run)
    assert f"pushed {pushed}" in from_push


def test_export_of_the_pushed_folder_packs_the_same_model(run_dir, pushed, tmp_path, capsys):
    status, errors, out = cli(capsys, "export", str(pushed), "--out", str(tmp_path / "m.onebit"))
    assert status == 0, errors
    assert f"exported lenet_binary from {pushed}" in out
    x, _ = datasets.load("digits").test.tensors
    model, _ = load_run(str(run_dir))
    with torch.no_grad():
        assert torch.equal(engine.load(str(tmp_path / "m.onebit"))(x[:32]), model(x[:32]))


def test_weights_option_evaluates_the_sources_model_with_other_weights(run_dir, pushed, tmp_path, capsys):
    state = load_file(str(run_dir / "model.safetensors"))
    generator = torch.Generator().manual_seed(1)
    other = {
        k: (v + torch.randn(v.shape, generator=generator) if v.is_floating_point() else v) for k, v in state.items()
    }
    path = tmp_path / "other.safetensors"
    save_file(other, str(path))
    model, _ = load_run(str(run_dir))
    model.load_state_dict(other)
    x, y = datasets.load("digits").test.tensors
    with torch.no_grad():
        expected = f"accuracy: {int((model(x).argmax(1) == y).sum()) / len(y):.4f}"
    for source in (run_dir, pushed):
        status, errors, out = cli(capsys, "eval", str(source), "--weights", str(path))
        assert status == 0, errors
        assert accuracy_line(out) == [expected]
    status, errors, _ = cli(capsys, "export", str(pushed), "--weights", str(path), "--out", str(tmp_path / "o.onebit"))
    assert status == 0, errors
    with torch.no_grad():
        assert torch.equal(engine.load(str(tmp_path / "o.onebit"))(x[:32]), model(x[:32]))
    status, errors, _ = cli(capsys, "eval", str(run_dir), "--weights", str(tmp_path / "missing.safetensors"))
    assert status == 2 and len(errors) == 1 and "missing.safetensors" in errors[0]


def test_push_refuses_a_non_empty_folder_that_holds_no_push_unless_overwrite(run_dir, pushed, tmp_path, capsys):
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    status, errors, _ = cli(capsys, "push", str(run_dir), str(dest))
    assert status == 2 and len(errors) == 1 and str(dest) in errors[0] and "--overwrite" in errors[0]
    assert os.listdir(dest) == ["notes.txt"]
    status, errors, _ = cli(capsys, "push", str(run_dir), str(dest), "--overwrite")
    assert status == 0, errors
    assert set(os.listdir(dest)) == FILES | {"notes.txt"} and (dest / "notes.txt").read_text() == "mine"
    # a previous push is replaced without --overwrite, and reads back the same
    status, errors, _ = cli(capsys, "push", str(run_dir), str(pushed), "--name", "onebit-tests/lenet-digits")
    assert status == 0, errors
    reference, _ = load_run(str(run_dir))
    again = from_pretrained(str(pushed))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in reference.state_dict().items())


@pytest.mark.parametrize("which", ["run itself", "a file", "missing run"])
def test_push_errors_are_one_line(run_dir, tmp_path, capsys, which):
    (tmp_path / "file").write_text("x")
    args = {
        "run itself": (str(run_dir), str(run_dir)),
        "a file": (str(run_dir), str(tmp_path / "file")),
        "missing run": (str(tmp_path / "nothing"), str(tmp_path / "dest")),
    }[which]
    named = {"run itself": "run directory itself", "a file": "is a file", "missing run": "nothing"}[which]
    status, errors, _ = cli(capsys, "push", *args)
    assert status == 2 and len(errors) == 1 and named in errors[0], errors
    assert not (tmp_path / "dest").exists()


def test_push_to_the_hub_without_a_token_says_how_to_configure_one(run_dir, tmp_path):
    pytest.importorskip("huggingface_hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
    env["HF_HOME"] = str(tmp_path / "hf")  # no token file there
    result = subprocess.run(
        [sys.executable, "-m", "onebit", "push", str(run_dir), "hf://onebit-tests/lenet-digits"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "hf://onebit-tests/lenet-digits" in lines[0] and "no Hugging Face token" in lines[0]
    assert "hf auth login" in lines[0] and "HF_TOKEN" in lines[0]


def test_the_cards_python_shows_model_args_as_ruff_formats_them():
    from onebit.hub import _python_literal

    assert _python_literal("int8") == '"int8"'
    assert _python_literal([32, "a", True, None, 1.5]) == '[32, "a", True, None, 1.5]'
    assert _python_literal({"name": "dorefa_sym", "clip": 1.5}) == '{"name": "dorefa_sym", "clip": 1.5}'
    assert _python_literal(("x",)) == '("x",)'
    for value in ("int8", [32, "a", True, None], {"k": [1, "v"]}, ("x",), 0.25):
        assert eval(_python_literal(value)) == value  # noqa: S307 (literals written above)
