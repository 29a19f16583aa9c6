"""The trainer: epoch table and history.csv, checkpoints, exact resume, signals, mixup, top-k,
weight clipping, Bop wiring, and 2-process DDP (spawned by the trainer and under torchrun)."""

import csv
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from onebit import io
from onebit.train import Interrupted, TrainConfig, Trainer, load_run

SMALL = {"width": 8}


def config(out, **overrides) -> TrainConfig:
    values = dict(
        model="lenet_binary", data="digits", epochs=3, batch_size=64, lr=1e-2, seed=3, out=str(out), model_kwargs=SMALL
    )
    values.update(overrides)
    return TrainConfig(**values)


class StopAt(Trainer):
    """Simulates Ctrl-C arriving during step ``stop_at``."""

    stop_at = 0

    def on_step_end(self):
        if self.global_step == self.stop_at:
            self.request_stop(signal.SIGINT)


def read_history(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_history_has_the_epoch_table_columns(tmp_path):
    trainer = Trainer(config(tmp_path, epochs=2, topk=3), console=None)
    history = trainer.fit()
    rows = read_history(tmp_path / "history.csv")
    assert list(rows[0]) == ["epoch", "train_loss", "valid_loss", "accuracy", "top_k_accuracy", "flip_ratio", "time"]
    assert [r["epoch"] for r in rows] == ["0", "1"]
    for r in history:
        assert 0 <= r["accuracy"] <= r["top_k_accuracy"] <= 1 and 0 <= r["flip_ratio"] <= 1
    assert history[0]["flip_ratio"] > 0  # binary weights do flip while training
    for name in ("model.safetensors", "checkpoint.safetensors", "config.json"):
        assert (tmp_path / name).is_file()
    model, meta = load_run(str(tmp_path))
    assert meta["config"]["topk"] == 3 and not model.training


@pytest.mark.parametrize(
    "overrides, stop_at",
    [
        ({"mixup": 0.4, "augment": "crop+flip"}, 30),  # mid-epoch, one-cycle Adam
        ({"optimizer": "sgd", "schedule": "cosine", "lr": 0.05, "weight_clip": 1.0}, 23),  # at an epoch's end
        ({"optimizer": "bop", "bop_threshold": 1e-6, "bop_gamma": 1e-3}, 41),
    ],
)
def test_resume_after_an_interruption_gives_identical_weights(tmp_path, overrides, stop_at):
    whole = Trainer(config(tmp_path / "whole", **overrides))
    whole.fit()

    StopAt.stop_at = stop_at
    first = StopAt(config(tmp_path / "split", **overrides))
    with pytest.raises(Interrupted) as stop:
        first.fit()
    assert stop.value.signum == signal.SIGINT and first.global_step == stop_at
    resumed = Trainer.from_run(str(tmp_path / "split"))
    assert resumed.global_step == stop_at
    resumed.fit()

    a, b = whole.model.state_dict(), io.load_tensors(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(read_history(tmp_path / "whole" / "history.csv")) == strip(
        read_history(tmp_path / "split" / "history.csv")
    )


def test_weight_clip_keeps_binary_latent_weights_in_range(tmp_path):
    trainer = Trainer(config(tmp_path, epochs=1, lr=0.5, optimizer="sgd", weight_clip=0.25))
    trainer.fit()
    assert trainer.binary_params and all(p.abs().max() <= 0.25 for p in trainer.binary_params)
    float_first = trainer.model[0].weight
    assert float_first.abs().max() > 0.25  # float layers are not clipped


def test_bop_trains_binary_weights_and_adam_the_rest(tmp_path):
    trainer = Trainer(config(tmp_path, epochs=3, optimizer="bop", bop_threshold=1e-6, bop_gamma=1e-3))
    magnitudes = [p.detach().abs().clone() for p in trainer.binary_params]
    history = trainer.fit()
    adam, bop = trainer.optimizers
    assert {id(p) for g in bop.param_groups for p in g["params"]} == {id(p) for p in trainer.binary_params}
    for p, m in zip(trainer.binary_params, magnitudes):
        assert torch.equal(p.detach().abs(), m)  # Bop only flips signs
    assert history[0]["flip_ratio"] > 0
    assert history[-1]["accuracy"] > 0.8


def test_mixup_runs_and_is_reproducible(tmp_path):
    a = Trainer(config(tmp_path / "a", epochs=1, mixup=0.2)).fit()
    b = Trainer(config(tmp_path / "b", epochs=1, mixup=0.2)).fit()
    plain = Trainer(config(tmp_path / "c", epochs=1)).fit()
    assert a[0]["train_loss"] == b[0]["train_loss"] != plain[0]["train_loss"]


def test_bad_trainer_options_are_value_errors(tmp_path):
    for bad in ({"optimizer": "adagrad"}, {"mixup": -1.0}, {"topk": 0}, {"augment": "rotate"}, {"weight_clip": 0.0}):
        with pytest.raises(ValueError):
            Trainer(config(tmp_path, **bad))
    with pytest.raises(ValueError, match="no binary weights|has none"):
        Trainer(config(tmp_path, model="lenet", optimizer="bop"))
    with pytest.raises(FileNotFoundError, match="not a onebit run directory"):
        Trainer.from_run(str(tmp_path / "nothing"))


def onebit(*args, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "onebit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def test_sigterm_finishes_the_step_saves_and_resume_matches_an_uninterrupted_run(tmp_path):
    out = tmp_path / "run"
    common = ["--model", "lenet_binary", "--model-arg", "width=8", "--epochs", "8", "--seed", "5"]
    proc = onebit("train", *common, "--out", str(out))
    deadline = time.time() + 120
    while not (out / "history.csv").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "stopped by SIGTERM" in stderr
    assert "--resume" in stderr
    state = Trainer.from_run(str(out))
    assert 0 < state.global_step < 8 * state.steps_per_epoch  # stopped early, mid-run

    resumed = onebit("train", "--resume", str(out))
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "test accuracy" in stdout
    whole = onebit("train", *common, "--out", str(tmp_path / "whole"))
    whole.communicate(timeout=300)
    a = io.load_tensors(out / "model.safetensors")
    b = io.load_tensors(tmp_path / "whole" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(read_history(out / "history.csv")) == 8


def test_resume_refuses_new_options(tmp_path):
    proc = onebit("train", "--resume", str(tmp_path), "--lr", "0.1")
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "--lr" in stderr and "Traceback" not in stderr


def _ddp_args(out):
    return ["train", "--model", "lenet_binary", "--model-arg", "width=8", "--epochs", "3", "--out", str(out)]


def test_two_processes_spawned_by_the_trainer(tmp_path):
    proc = onebit(*_ddp_args(tmp_path / "ddp"), "--workers", "2")
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert stdout.count("onebit train:") == 1  # only rank 0 prints
    rows = read_history(tmp_path / "ddp" / "history.csv")
    assert len(rows) == 3
    single = Trainer(config(tmp_path / "single", seed=0, lr=1e-2)).fit()
    assert abs(float(rows[-1]["accuracy"]) - single[-1]["accuracy"]) < 0.1
    assert float(rows[-1]["accuracy"]) > 0.8


def test_two_processes_under_torchrun(tmp_path):
    out = tmp_path / "torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "onebit",
        *_ddp_args(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_history(out / "history.csv")) == 3
    model, meta = load_run(str(out))
    assert meta["config"]["model"] == "lenet_binary"
    assert not any(name.startswith("module.") for name in model.state_dict())


def test_export_and_eval_of_a_run_and_its_packed_file(tmp_path, capsys):
    from onebit.cli import main

    run = tmp_path / "run"
    Trainer(config(run, epochs=2)).fit()
    assert main(["eval", str(run)]) == 0
    from_run = capsys.readouterr().out
    assert main(["export", str(run), "--out", str(run / "model.onebit")]) == 0
    assert "exported lenet_binary" in capsys.readouterr().out
    assert main(["eval", str(run / "model.onebit"), "--data", "digits"]) == 0
    from_file = capsys.readouterr().out
    accuracy = lambda text: [line for line in text.splitlines() if line.startswith("accuracy:")]  # noqa: E731
    assert accuracy(from_run) == accuracy(from_file) and accuracy(from_run)


def test_export_and_eval_errors_are_one_line(tmp_path, capsys, monkeypatch):
    from onebit.cli import main

    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert main(["eval", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "not a onebit run directory" in err and "neither a run directory nor a file" in err
    assert "Traceback" not in err
    monkeypatch.setitem(sys.modules, "onebit.engine", None)  # a build without the engine
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "engine (onebit.engine) is not available" in capsys.readouterr().err


def write_tiny_idx(root, n=32, size=28):
    import numpy as np

    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count in (("train", n), ("t10k", n // 2)):
        for kind, array in (
            ("images-idx3", rng.integers(0, 256, (count, size, size))),
            ("labels-idx1", np.arange(count) % 10),
        ):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (root / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    return root


@pytest.mark.parametrize(
    "model, extra",
    [
        ("birealnet_small", {"model_kwargs": {"conv_layer": "twist"}}),
        ("resnete18", {"image_size": 32, "weight_clip": 1.0, "mixup": 0.2}),
    ],
)
def test_zoo_models_train_on_an_idx_directory(tmp_path, model, extra):
    data_dir = write_tiny_idx(tmp_path / "idx")
    cfg = TrainConfig(
        model=model, data=str(data_dir), epochs=1, batch_size=16, seed=0, out=str(tmp_path / "run"), **extra
    )
    history = Trainer(cfg).fit()
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    loaded, meta = load_run(str(tmp_path / "run"))
    assert meta["image_size"] == [extra.get("image_size", 28)] * 2


def test_distillation_loss_is_the_tempered_kl_divergence():
    from onebit.train import distillation_loss

    torch.manual_seed(0)
    student = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    for t in (1.0, 3.0):
        p = torch.exp(teacher.detach() / t) / torch.exp(teacher.detach() / t).sum(1, keepdim=True)
        q = torch.exp(student.detach() / t) / torch.exp(student.detach() / t).sum(1, keepdim=True)
        expected = t * t * (p * (p.log() - q.log())).sum() / 5
        assert torch.allclose(distillation_loss(student, teacher, t), expected)
    assert distillation_loss(teacher, teacher).abs() < 1e-12  # zero when the student matches
    distillation_loss(student, teacher, 2.0).backward()
    assert student.grad is not None and teacher.grad is None


def test_distilled_training_mixes_labels_and_teacher_and_leaves_the_teacher_alone(tmp_path):
    teacher_run = Trainer(config(tmp_path / "teacher", model="lenet", epochs=1))
    teacher_run.fit()
    before = {k: v.clone() for k, v in teacher_run.model.state_dict().items()}
    student = Trainer(
        config(
            tmp_path / "student",
            epochs=1,
            teacher=str(tmp_path / "teacher"),
            distill_weight=0.25,
            distill_temperature=2.0,
        )
    )
    assert not any(p.requires_grad for p in student.teacher.parameters()) and not student.teacher.training
    x, y = student.data.train.tensors
    x, y = x[:32], y[:32]
    with torch.no_grad():
        s, t = student.model(x), teacher_run.model.eval()(x)
        p, log_q = torch.softmax(t / 2, 1), torch.log_softmax(s / 2, 1)
        kd = 4 * (p * (p.log() - log_q)).sum(1).mean()
        expected = 0.75 * torch.nn.functional.cross_entropy(s, y) + 0.25 * kd
        assert torch.allclose(student._loss(x, y), expected, atol=1e-6)
    history = student.fit()
    assert history[0]["accuracy"] > 0.5
    after = io.load_tensors(tmp_path / "teacher" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="another shape"):
        Trainer(config(tmp_path / "bad", data=str(write_tiny_idx(tmp_path / "idx")), teacher=str(tmp_path / "teacher")))


def test_channels_last_trains_the_same_function_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    plain = Trainer(config(tmp_path / "nchw", model="lenet", epochs=1, schedule="constant", lr=1e-3))
    nhwc = Trainer(
        config(tmp_path / "nhwc", model="lenet", epochs=1, schedule="constant", lr=1e-3, memory_format="channels_last")
    )
    conv = nhwc.model[3]  # a conv with several input channels (with one, both layouts are the same)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    plain.fit(), nhwc.fit()
    a, b = plain.model.state_dict(), io.load_tensors(tmp_path / "nhwc" / "model.safetensors")
    for k in a:  # the same steps; only the order of float sums differs
        assert torch.allclose(a[k], b[k], atol=1e-4), k

    overrides = {"memory_format": "channels_last", "augment": "crop+flip"}
    whole = Trainer(config(tmp_path / "whole", **overrides))
    whole.fit()
    StopAt.stop_at = 29
    with pytest.raises(Interrupted):
        StopAt(config(tmp_path / "split", **overrides)).fit()
    resumed = Trainer.from_run(str(tmp_path / "split"))
    resumed.fit()
    b = io.load_tensors(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(v, b[k]) for k, v in whole.model.state_dict().items())


def test_bad_distillation_and_layout_options_are_value_errors(tmp_path):
    for bad in ({"distill_weight": 1.5}, {"distill_temperature": 0.0}, {"memory_format": "nhwc"}):
        with pytest.raises(ValueError):
            Trainer(config(tmp_path, **bad))
    with pytest.raises(FileNotFoundError, match="not a onebit run directory"):
        Trainer(config(tmp_path, teacher=str(tmp_path / "nothing")))
