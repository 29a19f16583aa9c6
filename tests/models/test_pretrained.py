"""The trained models published in the repository (pretrained/): each loads by reference with its
hashes checked, reproduces its card's accuracy through `onebit eval`, its packed file computes the
model's outputs, and a user fine-tunes from one with --weights."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from onebit import data, engine, models

PRETRAINED = pathlib.Path(__file__).resolve().parents[2] / "pretrained"
FOLDER = PRETRAINED / "bitnet_mlp-fashion-mnist"
PUBLISHED = [
    PRETRAINED / "bitnet_mlp-fashion-mnist",
    PRETRAINED / "birealnet_small_react_wide-fashion-mnist",
    PRETRAINED / "birealnet_small_react_wide-int8-fashion-mnist",  # int8 stem, shortcuts and classifier
]
each = pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
needs_data = pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST),
    reason=f"Fashion-MNIST is not installed at {FASHION_MNIST} (apt-get install dataset-fashion-mnist)",
)


def card(folder=FOLDER):
    return json.loads((folder / "config.json").read_text())


@each
def test_the_published_model_loads_by_reference_with_its_hashes_checked(folder):
    model = models.from_pretrained(str(folder))
    state, config = models.load_weights(str(folder))
    assert config["config"]["model"] == folder.name.split("-")[0] and not model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert card(folder)["packed"]["max_abs_diff"] < 1e-5  # push's check on one random input; the test set: below


@needs_data
@each
def test_onebit_eval_of_the_published_model_reproduces_its_cards_accuracy(folder):
    out = subprocess.run(
        [sys.executable, "-m", "onebit", "eval", str(folder)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    assert f"accuracy: {card(folder)['metrics']['accuracy']:.4f}" in out.stdout


@needs_data
@each
def test_its_packed_file_computes_the_models_outputs_on_the_test_set(folder):
    model = models.from_pretrained(str(folder))
    packed = engine.load(str(folder / "model.onebit.safetensors"))
    meta = card(folder)
    stats = (
        {"mean": meta["mean"], "std": meta["std"]} if "std" in meta else {}
    )  # runs before onebit saved them: the data's
    x, _ = data.load(FASHION_MNIST, **stats).test.batch(torch.arange(2000))
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


@needs_data
def test_a_user_fine_tunes_from_it(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "onebit",
            "train",
            "--model",
            "bitnet_mlp",
            "--data",
            FASHION_MNIST,
            "--weights",
            str(FOLDER),
            "--epochs",
            "1",
            "--lr",
            "1e-3",
            "--schedule",
            "constant",
            "--out",
            str(tmp_path / "tuned"),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    assert "from weights" in out.stdout
    accuracy = float(out.stdout.rsplit("test accuracy:", 1)[1].split()[0])
    assert accuracy > 0.80  # starts from 82.8 %, not from random weights (about 10 %)


def test_the_int8_model_keeps_its_stem_shortcuts_and_classifier_in_int8():
    folder = PRETRAINED / "birealnet_small_react_wide-int8-fashion-mnist"
    assert card(folder)["config"]["model_kwargs"] == {"float_layers": "int8"}
    packed = engine.load(str(folder / "model.onebit.safetensors"))
    ops = [n["op"] for n in packed.graph["nodes"]]
    assert ops.count("int8_conv2d") == 4 and ops.count("int8_linear") == 1  # stem, 3 shortcuts, classifier
    assert "linear" not in ops
    for node in packed.graph["nodes"]:  # the float convs left are ReAct's per-channel sign shifts (1x1 depthwise)
        if node["op"] == "conv2d":
            a = node["attrs"]
            assert a["kernel_size"] == [1, 1] and a["groups"] == a["in_channels"] == a["out_channels"], node["module"]
