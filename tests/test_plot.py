"""onebit.plot: PNGs are written, and different layers / inputs give different pictures."""

import hashlib

import pytest
import torch

from onebit import io, models, plot
from onebit.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def digest(path) -> str:
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 2000
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return models.create("lenet_binary", in_channels=1, width=8).eval()


def test_binary_weights_differ_between_layers(model, tmp_path):
    assert plot.binary_layers(model) == ["3", "7", "13"]
    fig = plot.binary_weights(model, "3", tmp_path / "a.png")
    plot.binary_weights(model, "13", tmp_path / "b.png")
    assert digest(tmp_path / "a.png") != digest(tmp_path / "b.png")
    # the left panel shows the +-1 weights used in forward, not the latent floats
    shown = fig.axes[0].images[0].get_array()
    assert set(shown.compressed().tolist()) == {-1.0, 1.0}
    with pytest.raises(ValueError, match="float"):
        plot.binary_weights(model, "0")  # the float stem


def test_feature_maps_differ_between_inputs_and_layers(model, tmp_path):
    x = torch.randn(2, 1, 8, 8)
    plot.feature_maps(model, "3", x[0], tmp_path / "a.png")
    plot.feature_maps(model, "3", x[1], tmp_path / "b.png")
    fig = plot.feature_maps(model, "7", x[0], tmp_path / "c.png", stage="input")
    hashes = {digest(tmp_path / n) for n in ("a.png", "b.png", "c.png")}
    assert len(hashes) == 3
    # what a binary layer sees is +-1
    assert set(fig.axes[1].images[0].get_array().compressed().tolist()) <= {-1.0, 1.0}
    assert not model.training


def test_training_curves_and_flips_from_a_history(tmp_path):
    rows = [[e, 1.0 / (e + 1), 1.2 / (e + 1), 0.5 + 0.1 * e, 0.9, 0.2 / (e + 1) ** 2, "00:01"] for e in range(5)]
    io.save_csv(tmp_path / "history.csv", ["epoch", "train_loss", "valid_loss", "accuracy", "top_k_accuracy", "flip_ratio", "time"], rows)
    plot.training_curves(tmp_path, tmp_path / "curves.png")
    plot.weight_flips(tmp_path, tmp_path / "flips.png")
    assert digest(tmp_path / "curves.png") != digest(tmp_path / "flips.png")
    with pytest.raises(FileNotFoundError):
        plot.training_curves(tmp_path / "missing")


def test_flip_recorder_counts_sign_changes(model, tmp_path):
    import copy

    m = copy.deepcopy(model)
    recorder = plot.FlipRecorder(m)
    with torch.no_grad():
        m[3].weight[:4].neg_()  # 4 of 16 output channels of layer '3' change sign (weights are never exactly 0)
    assert recorder.record() == pytest.approx(m[3].weight[:4].numel() / sum(m.get_submodule(n).weight.numel() for n in recorder.layers))
    assert recorder.flips["3"] == [0.25] and recorder.flips["7"] == [0.0]
    plot.weight_flips(recorder, tmp_path / "flips.png")
    digest(tmp_path / "flips.png")


def test_cli_writes_pngs(tmp_path, capsys):
    out = tmp_path / "w.png"
    assert main(["plot", "weights", "lenet_binary", "--layer", "7", "--out", str(out)]) == 0
    digest(out)
    assert main(["plot", "features", "lenet_binary", "--index", "3", "--out", str(tmp_path / "f.png")]) == 0
    digest(tmp_path / "f.png")
    assert main(["plot", "weights", "lenet_binary", "--layer", "nope", "--out", str(out)]) == 2
    assert "no layer named 'nope'" in capsys.readouterr().err
