"""The trained model published in the repository (pretrained/): it loads by reference with its
hashes checked, reproduces its card's accuracy through `onebit eval`, its packed file computes the
model's outputs, and a user fine-tunes from it with --weights."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from onebit import data, engine, models

FOLDER = pathlib.Path(__file__).resolve().parents[1] / "pretrained" / "bitnet_mlp-fashion-mnist"
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
needs_data = pytest.mark.skipif(not os.path.isdir(FASHION_MNIST),
                                reason=f"Fashion-MNIST is not installed at {FASHION_MNIST} (apt-get install dataset-fashion-mnist)")


def card():
    return json.loads((FOLDER / "config.json").read_text())


def test_the_published_model_loads_by_reference_with_its_hashes_checked():
    model = models.from_pretrained(str(FOLDER))
    state, config = models.load_weights(str(FOLDER))
    assert config["config"]["model"] == "bitnet_mlp" and not model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert card()["packed"]["max_abs_diff"] == 0.0


@needs_data
def test_onebit_eval_of_the_published_model_reproduces_its_cards_accuracy():
    out = subprocess.run([sys.executable, "-m", "onebit", "eval", str(FOLDER)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert f"accuracy: {card()['metrics']['accuracy']:.4f}" in out.stdout


@needs_data
def test_its_packed_file_computes_the_models_outputs_on_the_test_set():
    model = models.from_pretrained(str(FOLDER))
    packed = engine.load(str(FOLDER / "model.onebit.safetensors"))
    meta = card()
    x, _ = data.load(FASHION_MNIST, mean=meta["mean"], std=meta["std"]).test.batch(torch.arange(2000))
    with torch.no_grad():
        assert torch.equal(packed(x), model(x))


@needs_data
def test_a_user_fine_tunes_from_it(tmp_path):
    out = subprocess.run([sys.executable, "-m", "onebit", "train", "--model", "bitnet_mlp", "--data", FASHION_MNIST,
                          "--weights", str(FOLDER), "--epochs", "1", "--lr", "1e-3", "--schedule", "constant",
                          "--out", str(tmp_path / "tuned")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    assert "from weights" in out.stdout
    accuracy = float(out.stdout.rsplit("test accuracy:", 1)[1].split()[0])
    assert accuracy > 0.80  # starts from 82.8 %, not from random weights (about 10 %)
