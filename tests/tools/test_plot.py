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


def test_float_layers_show_their_weights_as_they_are(model, tmp_path):
    fig = plot.binary_weights(model, "0", tmp_path / "stem.png")  # the float stem
    digest(tmp_path / "stem.png")
    shown = fig.axes[0].images[0].get_array().compressed()
    assert len(set(shown.tolist())) > 2  # float values, not +-1
    assert torch.allclose(torch.tensor(sorted(shown.tolist())), model[0].weight.detach().flatten().sort().values)
    assert "float" in fig.axes[0].get_title()
    float_only = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(36, 2))
    assert plot.binary_weights(float_only).axes[0].get_title().startswith("float weights")  # the first layer


def _labels(axis) -> list[str]:
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text() and t.get_visible()]


@pytest.mark.parametrize(
    "ratios",
    [[0.02, 0.011, 0.012, 0.01], [0.2, 0.03, 0.004, 0.0005, 0.0], [0.05], [0.0, 0.0]],
)
def test_flip_plot_has_readable_y_ticks(ratios, tmp_path):
    fig = plot.weight_flips({"layer": ratios}, tmp_path / "flips.png")
    ax = fig.axes[0]
    fig.canvas.draw() if hasattr(fig.canvas, "draw") else None
    labels = _labels(ax.yaxis)
    low, high = ax.get_ylim()
    ticks = [t for t in ax.get_yticks() if low <= t <= high]
    assert len(ticks) >= 3 and len(labels) >= 3 and all(label.endswith("%") for label in labels), labels
    assert len(set(labels)) == len(labels)


def test_every_plot_labels_its_axes(model, tmp_path):
    rows = [[e, 1.0 / (e + 1), 1.2 / (e + 1), 0.5 + 0.1 * e, 0.9, 0.01, "00:01"] for e in range(3)]
    io.save_csv(
        tmp_path / "history.csv",
        ["epoch", "train_loss", "valid_loss", "accuracy", "top_k_accuracy", "flip_ratio", "time"],
        rows,
    )
    figures = [
        plot.binary_weights(model, "3"),
        plot.binary_weights(model, "0"),
        plot.training_curves(tmp_path),
        plot.weight_flips(tmp_path),
        plot.feature_maps(model, "3", torch.randn(1, 8, 8)),
    ]
    for fig in figures[:4]:
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            assert ax.get_xlabel() and ax.get_ylabel(), (fig.axes[0].get_title(), ax.get_title())


def test_training_records_weights_and_the_animation_shows_them(tmp_path, capsys):
    from PIL import Image

    from onebit.train import TrainConfig, Trainer

    cfg = TrainConfig(
        model="lenet_binary",
        data="digits",
        epochs=2,
        batch_size=128,
        lr=1e-2,
        seed=0,
        out=str(tmp_path),
        model_kwargs={"width": 8},
    )
    trainer = Trainer(cfg, console=None)
    trainer.fit()
    files = sorted(p.name for p in (tmp_path / "weights").iterdir())
    assert files == ["epoch_0000.safetensors", "epoch_0001.safetensors", "epoch_0002.safetensors"]
    layers = plot.recorded_layers(tmp_path)
    assert layers[0] == "0" and "3" in layers  # the float stem is recorded too
    first, last = (io.load_tensors(tmp_path / "weights" / f) for f in (files[0], files[-1]))
    assert not torch.equal(first["3.latent"], last["3.latent"])  # the weights moved
    assert torch.equal(last["3.latent"], trainer.model.get_submodule("3").weight.detach()[:16, :16])
    assert set(last["3.used"].unique().abs().tolist()) == {1.0} and "0.used" not in last

    assert main(["plot", "weights", str(tmp_path), "--animate"]) == 0
    gif = tmp_path / "weights.gif"
    assert "3 frames" in capsys.readouterr().out
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames == 3 and image.info["duration"] > 0
        frames = []
        for k in range(image.n_frames):
            image.seek(k)
            frames.append(image.convert("RGB").tobytes())
    assert len(set(frames)) == 3  # every epoch looks different
    assert (
        main(["plot", "weights", str(tmp_path), "--animate", "--layer", "0", "--out", str(tmp_path / "stem.gif")]) == 0
    )
    assert main(["plot", "weights", str(tmp_path), "--animate", "--layer", "nope"]) == 2
    assert "recorded" in capsys.readouterr().err
    assert main(["plot", "curves", str(tmp_path), "--animate"]) == 2


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
    io.save_csv(
        tmp_path / "history.csv",
        ["epoch", "train_loss", "valid_loss", "accuracy", "top_k_accuracy", "flip_ratio", "time"],
        rows,
    )
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
    assert recorder.record() == pytest.approx(
        m[3].weight[:4].numel() / sum(m.get_submodule(n).weight.numel() for n in recorder.layers)
    )
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
