"""docs/imagenet.md's two-stage recipe, run as written (one epoch a stage, narrow networks) on a
generated folder in ImageNet's layout: a float teacher, stage 1 (binary activations, float weights,
distilled), stage 2 (fully binary, from stage 1's weights, distilled), then `onebit eval` of the run."""

import csv
import math
import subprocess
import sys

from test_loader import make_image_folder

WIDTHS = "widths=[8,16,16,16]"  # the recipe's networks, narrowed to run in seconds on a CPU
COMMON = [
    "--data",
    "{data}",
    "--image-size",
    "64",
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--optimizer",
    "adam",
    "--lr",
    "5e-4",
    "--schedule",
    "linear",
    "--loader-workers",
    "2",
    "--mean",
    "0.485,0.456,0.406",
    "--std",
    "0.229,0.224,0.225",
    "--seed",
    "0",
]


def onebit(*args, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "onebit", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def final_loss(run):
    with open(run / "history.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["train_loss"])


def test_both_stages_of_the_imagenet_recipe_run_to_a_run_that_onebit_eval_reads(tmp_path):
    data = make_image_folder(
        tmp_path / "imagenet", classes=10, per_class=3, val_per_class=1, sizes=(64, 128), kind="jpg"
    )
    common = [a.format(data=data) for a in COMMON]
    teacher, stage1, stage2 = tmp_path / "teacher", tmp_path / "stage1", tmp_path / "stage2"
    onebit(
        "train", "--model", "resnet18", "--model-arg", WIDTHS, *common, "--weight-decay", "1e-5", "--out", str(teacher)
    )
    out1 = onebit(
        "train",
        "--model",
        "birealnet18",
        "--model-arg",
        WIDTHS,
        "--model-arg",
        "weight_quantizer=float",
        *common,
        "--weight-decay",
        "1e-5",
        "--teacher",
        str(teacher),
        "--distill-weight",
        "1.0",
        "--out",
        str(stage1),
    )
    out2 = onebit(
        "train",
        "--model",
        "birealnet18",
        "--model-arg",
        WIDTHS,
        *common,
        "--weight-decay",
        "0",
        "--weights",
        str(stage1),
        "--teacher",
        str(teacher),
        "--distill-weight",
        "1.0",
        "--out",
        str(stage2),
    )
    for out in (out1, out2):
        assert "2 loader workers" in out and "resized-crop" in out and "distilled from" in out
    assert "from weights" in out2
    assert math.isfinite(final_loss(stage1)) and math.isfinite(final_loss(stage2))
    evaluated = onebit("eval", str(stage2))
    assert "on imagenet test (10 images)" in evaluated and "accuracy:" in evaluated
