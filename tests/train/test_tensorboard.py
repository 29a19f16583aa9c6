"""``onebit train --tensorboard``: event files that TensorBoard's own reader reads back."""

import csv
import subprocess
import sys

import pytest

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_train_writes_scalars_and_weight_histograms(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "onebit",
            "train",
            "--model",
            "lenet_binary",
            "--epochs",
            "2",
            "--out",
            str(run),
            "--tensorboard",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    events = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/train", "loss/valid", "accuracy/top1", "accuracy/top_k", "flip_ratio"} <= set(tags["scalars"])
    assert any(t.startswith("learning_rate/") for t in tags["scalars"])
    with open(run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    logged = events.Scalars("accuracy/top1")
    assert [e.step for e in logged] == [0, 1]
    assert [round(e.value, 4) for e in logged] == [round(float(r["accuracy"]), 4) for r in rows]
    assert [round(e.value, 4) for e in events.Scalars("loss/train")] == [round(float(r["train_loss"]), 4) for r in rows]
    histograms = set(tags["histograms"])
    assert any(t.startswith("weights/") for t in histograms)
    assert any(t.startswith("quantized/") for t in histograms)  # the binary layers' +-1 weights


def test_tensorboard_needs_a_run_directory():
    result = subprocess.run(
        [sys.executable, "-m", "onebit", "train", "--epochs", "1", "--tensorboard"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0 and "--out" in result.stderr and "Traceback" not in result.stderr
