"""The trainer's pieces: one seed gives one model whichever way it is built, and the checkpoint
file keeps the names and entries that old run directories hold."""

import json

import torch

from onebit import io
from onebit.train import TrainConfig, Trainer
from onebit.train.build import build


def small(out, **overrides) -> TrainConfig:
    values = dict(model="lenet_binary", data="digits", epochs=1, seed=4, out=str(out), model_kwargs={"width": 8})
    values.update(overrides)
    return TrainConfig(**values)


def test_a_seed_builds_the_same_model_through_build_from_config_and_the_config(tmp_path):
    built, data = build(small(tmp_path / "a"))
    for trainer in (Trainer.from_config(small(tmp_path / "b")), Trainer(small(tmp_path / "c"))):
        a, b = built.state_dict(), trainer.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert trainer.data.num_classes == data.num_classes


def test_a_prebuilt_model_and_data_train_as_the_config_would(tmp_path):
    model, data = build(small(tmp_path / "a"))
    given = Trainer(small(tmp_path / "a"), model=model, data=data).fit()
    named = Trainer.from_config(small(tmp_path / "b")).fit()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(given) == strip(named)


def test_the_checkpoint_file_keeps_its_tensor_names_and_metadata_entries(tmp_path):
    Trainer(small(tmp_path, optimizer="bop")).fit()
    path = tmp_path / "checkpoint.safetensors"
    meta = json.loads(io.tensors_metadata(str(path))["onebit_checkpoint"])
    assert set(meta) == {
        "epoch",
        "step",
        "global_step",
        "loss_sum",
        "loss_count",
        "elapsed",
        "optimizers",
        "scheduler",
        "scaler",
        "rng",
        "history",
        "world_size",
    }
    assert meta["scaler"] is None  # fp32: no loss scaler (fp16's state is saved here)
    assert set(meta["rng"]) == {"numpy", "python", "mixup"} and (meta["epoch"], meta["step"]) == (1, 0)
    names = set(io.load_tensors(str(path)))
    assert {"rng.torch", "rng.generator", "flips.0"} <= names
    assert any(n.startswith("model.") for n in names) and any(n.startswith("optimizer.1.") for n in names)
    for name in ("config.json", "model.safetensors", "history.csv", "weights"):
        assert (tmp_path / name).exists()
