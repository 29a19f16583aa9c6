"""The onebit command under bad input: a run directory holds one run, every option is checked
before anything starts, damaged files and wrong paths give one line naming them, and
interrupted writes leave no temporary files behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from onebit import io
from onebit.cli import main
from onebit.train import TrainConfig, Trainer

SMALL = ["--model", "lenet_binary", "--model-arg", "width=8", "--epochs", "1"]


def run(capsys, *args) -> tuple[int, list[str], str]:
    """Exit status, the non-empty stderr lines and stdout of ``onebit ARGS`` run in this process."""
    try:
        status = main(list(args))
    except SystemExit as stop:  # argparse's own errors
        status = stop.code
    captured = capsys.readouterr()
    return status, [line for line in captured.err.splitlines() if line.strip()], captured.out


def onebit(*args, cwd=None) -> tuple[int, list[str], str]:
    """Exit status, the non-empty stderr lines and stdout of the real ``onebit ARGS`` command."""
    result = subprocess.run(
        [sys.executable, "-m", "onebit", *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd
    )
    return result.returncode, [line for line in result.stderr.splitlines() if line.strip()], result.stdout


def assert_one_line_error(status, lines, *named):
    assert status == 2, lines
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    for name in named:
        assert name in lines[0], (name, lines[0])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    Trainer(TrainConfig(model="lenet_binary", epochs=1, out=str(out), model_kwargs={"width": 8})).fit()
    return out


def copy_run(src, dst):
    dst.mkdir()
    for name in ("config.json", "model.safetensors", "checkpoint.safetensors", "history.csv"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# --------------------------------------------------------------------------- one run per directory


def test_a_finished_run_is_kept_unless_overwrite_is_given(capsys, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "a")
    weights = (out / "model.safetensors").read_bytes()
    status, lines, _ = run(capsys, "train", "--model", "lenet", "--epochs", "1", "--out", str(out))
    assert_one_line_error(status, lines, str(out), "already holds a run", "--resume", "--overwrite")
    assert (out / "model.safetensors").read_bytes() == weights
    assert json.loads((out / "config.json").read_text())["config"]["model"] == "lenet_binary"

    status, lines, _ = run(
        capsys, "train", "--model", "lenet", "--model-arg", "width=8", "--epochs", "1", "--out", str(out), "--overwrite"
    )
    assert status == 0, lines
    assert json.loads((out / "config.json").read_text())["config"]["model"] == "lenet"
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 2  # the new run's one epoch, nothing of the old one


def test_an_interrupted_run_is_continued_with_resume_not_replaced(capsys, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "a")
    (out / "model.safetensors").unlink()  # any of config, weights or checkpoint marks a run
    status, lines, _ = run(capsys, "train", *SMALL, "--out", str(out))
    assert_one_line_error(status, lines, "already holds a run")
    status, lines, _ = run(capsys, "train", "--resume", str(out), "--overwrite")
    assert_one_line_error(status, lines, "--overwrite")


def _hold_lock(directory):
    code = (
        "import sys, time\n"
        "from onebit.train import lock_run_directory\n"
        "with lock_run_directory(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(directory)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_trainer_on_a_directory_in_use_fails_at_once_and_the_lock_dies_with_its_holder(capsys, tmp_path):
    out = tmp_path / "busy"
    holder = _hold_lock(out)
    try:
        start = time.perf_counter()
        status, lines, _ = run(capsys, "train", *SMALL, "--out", str(out))
        assert_one_line_error(status, lines, str(out), "in use by another onebit train", f"pid {holder.pid}")
        assert time.perf_counter() - start < 10
        assert not (out / "config.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel releases a dead holder's lock
        holder.wait()
    status, lines, _ = run(capsys, "train", *SMALL, "--out", str(out))
    assert status == 0, lines
    assert (out / "model.safetensors").is_file()


def test_two_trainers_started_together_on_one_directory_one_fails():
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"onebit-race-{os.getpid()}-{time.time_ns()}")
    args = [
        sys.executable,
        "-m",
        "onebit",
        "train",
        "--model",
        "lenet_binary",
        "--model-arg",
        "width=8",
        "--epochs",
        "2",
        "--out",
        out,
    ]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    statuses = sorted(r[2] for r in results)
    assert statuses == [0, 2], results
    loser = next(r for r in results if r[2] == 2)
    assert "in use by another onebit train" in loser[1] or "already holds a run" in loser[1]
    assert "Traceback" not in loser[1]
    import shutil

    shutil.rmtree(out, ignore_errors=True)


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "option, value",
    [
        ("--lr", "inf"),
        ("--lr", "nan"),
        ("--lr", "-1"),
        ("--weight-decay", "inf"),
        ("--weight-decay", "-0.1"),
        ("--mixup", "inf"),
        ("--mixup", "nan"),
        ("--distill-temperature", "inf"),
        ("--distill-temperature", "nan"),
        ("--distill-weight", "nan"),
        ("--weight-clip", "inf"),
        ("--weight-clip", "nan"),
        ("--bop-threshold", "inf"),
        ("--bop-threshold", "-1"),
        ("--bop-gamma", "0"),
        ("--bop-gamma", "1.5"),
        ("--bop-gamma", "nan"),
        ("--seed", "100000000000000000000000"),
        ("--seed", "-1"),
        ("--seed", "1e23"),
        ("--epochs", "0"),
        ("--batch-size", "0"),
        ("--topk", "-3"),
        ("--workers", "0"),
        ("--workers", "100000"),
        ("--image-size", "0"),
        ("--image-size", "1000000"),
    ],
)
def test_every_numeric_option_is_checked_before_anything_starts(capsys, tmp_path, option, value):
    out = tmp_path / "run"
    status, lines, _ = run(capsys, "train", option, value, "--out", str(out))
    assert_one_line_error(status, lines, option)
    assert not out.exists()  # refused before the run directory was made


@pytest.mark.parametrize("width", ["-3", "0"])
def test_a_model_argument_that_breaks_the_model_is_one_line(capsys, tmp_path, width):
    status, lines, _ = run(
        capsys, "train", "--model", "lenet_binary", "--model-arg", f"width={width}", "--out", str(tmp_path / "r")
    )
    assert_one_line_error(status, lines, f"width={width}", "lenet_binary")


@pytest.mark.parametrize(
    "args, named",
    [
        (["--model-arg", "width=0"], "width=0"),
        (["--data", "/nonexistent/data"], "/nonexistent/data"),
        (["--teacher", "/nonexistent/run"], "/nonexistent/run"),
        (["--weights", "/nonexistent/w.safetensors"], "/nonexistent/w.safetensors"),
        (["--model", "lenet", "--optimizer", "bop"], "--optimizer bop"),
        (["--workers", "2", "--model-arg", "width=0"], "width=0"),
    ],
    ids=["model-arg", "data", "teacher", "weights", "bop-without-binary-weights", "workers"],
)
def test_a_train_that_fails_its_checks_creates_nothing(tmp_path, args, named):
    out = tmp_path / "run"
    status, lines, _ = onebit("train", "--epochs", "1", *args, "--out", out)
    assert_one_line_error(status, lines, named)
    assert not out.exists()  # no directory, no lock file


@pytest.mark.parametrize("item", ["width={", "widths=[32,64", "width=abc"])
def test_a_model_argument_that_is_broken_json_or_of_the_wrong_kind_is_named_in_one_line(tmp_path, item):
    status, lines, _ = onebit("train", "--model-arg", item, "--epochs", "1", "--out", tmp_path / "run")
    value = item.partition("=")[2]
    assert_one_line_error(status, lines, "--model-arg", repr(value) if value == "abc" else item)
    if value != "abc":
        assert "not valid JSON" in lines[0]


@pytest.mark.parametrize("command", ["train", "doctor"])
def test_a_model_file_that_exits_while_imported_is_a_one_line_error_naming_it(tmp_path, command):
    source = tmp_path / "exits.py"
    source.write_text("import sys\nsys.exit(3)\n")
    target = f"{source}:Net"
    if command == "train":
        status, lines, _ = onebit("train", "--model", target, "--epochs", "1", "--out", tmp_path / "run")
    else:
        status, lines, _ = onebit("doctor", target, "--input-shape", "1,8,8")
    assert_one_line_error(status, lines, str(source), "sys.exit(3)")


@pytest.mark.parametrize(
    "args",
    [["eval", "X", "--batch-size", "0"], ["eval", "X", "--topk", "nan"], ["summary", "lenet", "--num-classes", "0"]],
)
def test_other_commands_check_their_numbers_in_one_line(capsys, args):
    status, lines, _ = run(capsys, *args)
    assert_one_line_error(status, lines, args[-2])


# --------------------------------------------------------------------------- files and paths


def test_out_naming_a_file_or_a_path_under_a_file_is_one_line(capsys, tmp_path, finished_run):
    afile = tmp_path / "afile"
    afile.write_text("x")
    status, lines, _ = run(capsys, "train", *SMALL, "--out", str(afile))
    assert_one_line_error(status, lines, str(afile), "is a file")
    status, lines, _ = run(capsys, "train", *SMALL, "--out", str(afile / "sub"))
    assert_one_line_error(status, lines, str(afile / "sub"), "file")
    status, lines, _ = run(capsys, "export", str(finished_run), "--out", str(tmp_path))
    assert_one_line_error(status, lines, str(tmp_path), "is a directory")
    status, lines, _ = run(capsys, "export", str(finished_run), "--out", str(afile / "x.onebit"))
    assert_one_line_error(status, lines, str(afile))


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc, a directory no file can be made in")
@pytest.mark.parametrize("out", ["", "/proc/x.onnx", "/proc/x.onebit"])
def test_export_to_an_out_it_cannot_write_names_out_not_a_temporary_file(finished_run, out):
    status, lines, _ = onebit("export", finished_run, "--out", out)
    assert_one_line_error(status, lines, "--out", out)
    assert ".tmp-" not in lines[0]
    if not out:
        assert "--out is empty" in lines[0]


FALLBACK_MODEL = """
from torch import nn
from onebit.nn import QConv2d


class Net(nn.Module):  # its binary conv pads by reflection: it runs in float in the packed engine
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8),
            QConv2d(8, 8, 3, padding=1, padding_mode="reflect", \
input_quantizer="ste_sign", weight_quantizer="ste_sign"),
            nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.body(x)
"""


def test_export_prints_a_layer_run_in_float_as_one_warning_line(tmp_path, capsys):
    import warnings

    source = tmp_path / "fallback.py"
    source.write_text(FALLBACK_MODEL)
    out = tmp_path / "run"
    Trainer(TrainConfig(model=f"{source}:Net", epochs=1, out=str(out))).fit()
    status, lines, stdout = onebit("export", out, "--out", tmp_path / "m.onebit")
    assert status == 0, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("onebit export: warning: ") and "'body.2'" in lines[0] and "reflect" in lines[0]
    assert "FallbackWarning" not in lines[0] and "exported" in stdout
    python_way = warnings.showwarning
    assert run(capsys, "export", str(out), "--out", str(tmp_path / "m2.onebit"))[0] == 0
    assert warnings.showwarning is python_way  # the command leaves Python's warnings as they were


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _drop_key(path, key):
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, file",
    [
        (lambda run: _truncate(run / "model.safetensors", 600), "model.safetensors"),
        (lambda run: _truncate(run / "checkpoint.safetensors", 900), "checkpoint.safetensors"),
        (lambda run: _drop_key(run / "config.json", "num_classes"), "config.json"),
        (lambda run: (run / "config.json").write_text("{not json"), "config.json"),
        (
            lambda run: (run / "config.json").write_text(
                '{"config": {"model": "lenet"}, "num_classes": "ten", "in_channels": 1, "image_size": [8, 8]}'
            ),
            "config.json",
        ),
    ],
    ids=["truncated-model", "truncated-checkpoint", "config-without-key", "config-not-json", "config-wrong-type"],
)
def test_a_damaged_run_file_is_named_in_one_line(capsys, tmp_path, finished_run, damage, file):
    out = copy_run(finished_run, tmp_path / "run")
    damage(out)
    path = str(out / file)
    commands = {"resume": ["train", "--resume", str(out)]}
    if file != "checkpoint.safetensors":  # eval and export read the config and the weights only
        commands["eval"] = ["eval", str(out)]
        commands["export"] = ["export", str(out), "--out", str(tmp_path / "x.onebit")]
    for name, args in commands.items():
        if name == "resume" and file == "model.safetensors":
            continue  # resume restores the weights from the checkpoint and writes them again
        status, lines, _ = run(capsys, *args)
        assert_one_line_error(status, lines, path)


def test_a_killed_writers_temporary_files_are_removed_by_the_next_run(capsys, tmp_path, finished_run):
    out = copy_run(finished_run, tmp_path / "run")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftovers = [out / f".tmp-{dead.stdout.strip()}-k9x2.safetensors", out / ".tmp-old7q.safetensors"]
    for path in leftovers:
        path.write_bytes(b"\0" * 4096)  # what kill -9 during a save leaves
    status, lines, _ = run(capsys, "train", "--resume", str(out))
    assert status == 0, lines
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]


def test_an_atomic_write_removes_dead_writers_temporaries_and_keeps_live_ones(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-{dead.stdout.strip()}-abc.safetensors"
    live = tmp_path / f".tmp-{os.getppid()}-def.safetensors"  # a running process's write in progress
    stale.write_bytes(b"x")
    live.write_bytes(b"y")
    io.save_json(tmp_path / "a.json", {"a": 1})
    assert not stale.exists() and live.exists()
    assert io.load_json(tmp_path / "a.json") == {"a": 1}


def test_a_write_interrupted_by_kill_leaves_nothing_after_the_next_write(tmp_path):
    code = (
        "import os, sys, torch\n"
        "from onebit import io\n"
        "orig = io.save_file\n"
        "def slow(tensors, path, metadata=None):\n"
        "    orig(tensors, path, metadata=metadata)\n"
        "    print('written', flush=True)\n"
        "    import time; time.sleep(60)\n"
        "io.save_file = slow\n"
        "io.save_tensors(sys.argv[1], {'w': torch.zeros(1000)})\n"
    )
    target = tmp_path / "w.safetensors"
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "written"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]  # the killed write's leftover
    io.save_json(tmp_path / "next.json", {})
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
    assert not target.exists()


# --------------------------------------------------------------------------- issue-26 regressions


def test_overwrite_empties_the_old_runs_per_epoch_weights(capsys, tmp_path):
    out = tmp_path / "run"
    status, lines, _ = run(capsys, "train", *SMALL[:-1], "3", "--out", str(out))
    assert status == 0, lines
    assert sorted(p.name for p in (out / "weights").iterdir())[-1] == "epoch_0003.safetensors"
    status, lines, _ = run(
        capsys, "train", "--model", "lenet", "--model-arg", "width=8", "--epochs", "1", "--out", str(out), "--overwrite"
    )
    assert status == 0, lines
    assert sorted(p.name for p in (out / "weights").iterdir()) == ["epoch_0000.safetensors", "epoch_0001.safetensors"]


def test_eval_names_a_file_whose_output_is_not_class_scores_for_the_data(capsys, tmp_path):
    import torch

    from onebit import engine

    class Scores(torch.nn.Module):
        def __init__(self, classes, tuple_out=False):
            super().__init__()
            self.fc, self.tuple_out = torch.nn.Linear(64, classes), tuple_out

        def forward(self, x):
            y = self.fc(x.flatten(1))
            return (y, y) if self.tuple_out else y

    x = torch.zeros(1, 1, 8, 8)
    few = tmp_path / "five.onebit"
    engine.pack(Scores(5).eval(), x).save(str(few))
    status, lines, _ = run(capsys, "eval", str(few), "--data", "digits")
    assert_one_line_error(status, lines, str(few), "scores 5 classes", "10")
    pair = tmp_path / "pair.onebit"
    engine.pack(Scores(10, tuple_out=True).eval(), x).save(str(pair))
    status, lines, _ = run(capsys, "eval", str(pair), "--data", "digits")
    assert_one_line_error(status, lines, str(pair), "returns a tuple")


def test_data_that_names_a_file_says_it_is_a_file(capsys, tmp_path, finished_run):
    status, lines, _ = run(capsys, "train", *SMALL, "--data", str(finished_run / "config.json"))
    assert_one_line_error(status, lines, "config.json", "is a file, not a directory")
