"""The onebit command: the main job's training run and one-line errors for bad options."""

import csv
import subprocess
import sys

import pytest


def onebit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onebit", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_train_writes_history_with_the_epoch_table_columns(tmp_path):
    out = tmp_path / "run"
    result = onebit("train", "--model", "lenet_binary", "--data", "digits", "--epochs", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    for column in ("epoch", "train_loss", "valid_loss", "accuracy", "time"):
        assert column in result.stdout
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert set(rows[0]) >= {"epoch", "train_loss", "valid_loss", "accuracy", "time"}
    assert 0.0 <= float(rows[-1]["accuracy"]) <= 1.0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["train", "--model", "no_such_net"], "no_such_net"),
        (["train", "--data", "/no/such/dir"], "/no/such/dir"),
        (["train", "--data", "no_such_set"], "no_such_set"),
        (["train", "--optimizer", "adagrad"], "adagrad"),
        (["train", "--epochs", "0"], "epochs"),
    ],
)
def test_bad_option_exits_nonzero_with_one_line_naming_it(args, named):
    result = onebit(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0], result.stderr


def test_the_onebit_console_script_is_installed():
    import os
    import shutil

    script = os.path.join(os.path.dirname(sys.executable), "onebit")
    assert os.path.exists(script) or shutil.which("onebit")
