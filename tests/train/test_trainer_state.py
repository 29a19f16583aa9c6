"""Trainer.state_dict() / load_state_dict(): everything a run continues from, as one dict. A fresh
trainer that loads another's state takes exactly its next steps; the state is a snapshot; the
checkpoint file (onebit.train.checkpoint) holds exactly the state, in the format it always had."""

import json
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from onebit import io
from onebit.train import CHECKPOINT, Interrupted, TrainConfig, Trainer
from onebit.train.checkpoint import decode_checkpoint, encode_checkpoint, read_checkpoint, write_run

SMALL = {"width": 8}


def config(out=None, **overrides) -> TrainConfig:
    values = dict(
        model="lenet_binary", data="digits", epochs=2, batch_size=64, lr=1e-2, seed=4, out=out, model_kwargs=SMALL
    )
    values.update(overrides)
    return TrainConfig(**values)


class StopAt(Trainer):
    stop_at = 0

    def on_step_end(self):
        if self.global_step == self.stop_at:
            self.request_stop(signal.SIGTERM)


def stopped(stop_at, **overrides) -> Trainer:
    """A trainer stopped after ``stop_at`` steps, nothing written."""
    StopAt.stop_at = stop_at
    trainer = StopAt(config(**overrides))
    with pytest.raises(Interrupted):
        trainer.fit()
    return trainer


def assert_same(a, b, where="state"):
    """Equal states: tensors bit for bit (and dtype), arrays and the rest by value; lists and tuples alike
    (JSON has no tuples)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


def without_time(history):
    return [{k: v for k, v in row.items() if k != "time"} for row in history]


@pytest.mark.parametrize(
    "overrides, stop_at",
    [
        ({"mixup": 0.4, "augment": "crop+flip"}, 30),  # mid-epoch: augmentation and mixup streams
        ({"optimizer": "bop", "bop_threshold": 1e-6, "bop_gamma": 1e-3, "precision": "fp16"}, 17),  # Bop, scaler
    ],
    ids=["adam-mixup", "bop-fp16"],
)
def test_a_fresh_trainer_loading_anothers_state_takes_the_same_next_steps(overrides, stop_at):
    whole = Trainer(config(**overrides))
    expected = whole.fit()
    state = stopped(stop_at, **overrides).state_dict()
    assert (state["epoch"], state["step"]) == divmod(stop_at, whole.steps_per_epoch) and state["global_step"] == stop_at

    fresh, again = Trainer(config(**overrides)), Trainer(config(**overrides))
    fresh.load_state_dict(state)
    assert_same(fresh.state_dict(), state)  # the round trip gives the state back
    again.load_state_dict(state)  # a second trainer from the same state: nothing is shared between them
    for trainer in (fresh, again):
        assert without_time(trainer.fit()) == without_time(expected)
        a, b = whole.model.state_dict(), trainer.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_state_is_a_snapshot_that_later_steps_leave_unchanged():
    trainer = Trainer(config(epochs=1))
    state, copy = trainer.state_dict(), trainer.state_dict()
    assert all(t.device.type == "cpu" for t in state["model"].values())
    x, y = trainer.data.train.batch(torch.arange(64))
    trainer.train_step(x, y)
    assert_same(state, copy)
    moved = trainer.state_dict()["model"]
    assert any(not torch.equal(moved[k], state["model"][k]) for k in moved)


def test_the_checkpoint_file_holds_the_state_in_its_format(tmp_path):
    trainer = stopped(17, optimizer="bop", bop_threshold=1e-6, bop_gamma=1e-3, precision="fp16")
    state = trainer.state_dict()
    tensors, meta = encode_checkpoint(state)
    assert list(meta) == [
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
    ]
    assert list(meta["rng"]) == ["numpy", "python", "mixup"]
    kinds = {name.split(".")[0] for name in tensors}
    assert kinds == {"model", "optimizer", "flips", "rng"} and {"rng.torch", "rng.generator"} <= set(tensors)
    assert all(t.dtype == torch.uint8 for name, t in tensors.items() if name.startswith("flips."))
    assert_same(decode_checkpoint(tensors, json.loads(json.dumps(meta))), state)

    write_run(str(tmp_path), state, trainer.config, trainer.data)
    assert_same(read_checkpoint(str(tmp_path)), state)
    assert_same(io.load_tensors(tmp_path / "model.safetensors"), state["model"])
    assert (tmp_path / "history.csv").read_text().splitlines()[0] == ",".join(Trainer.base_columns)


def test_a_checkpoint_written_before_the_loss_scaler_was_saved_still_loads(tmp_path):
    trainer = stopped(17)
    write_run(str(tmp_path), trainer.state_dict(), trainer.config, trainer.data)
    path = tmp_path / CHECKPOINT
    meta = json.loads(io.tensors_metadata(path)["onebit_checkpoint"])
    del meta["scaler"], meta["world_size"]
    save_file(io.load_tensors(path), str(path), metadata={"onebit_checkpoint": json.dumps(meta)})
    resumed = Trainer(config())
    resumed.load_checkpoint(str(tmp_path))
    assert resumed.global_step == 17
    assert_same(resumed.state_dict()["model"], trainer.state_dict()["model"])


def test_a_state_of_another_model_is_refused_and_a_checkpoint_of_one_is_named(tmp_path):
    other = Trainer(config(model="lenet"))
    with pytest.raises(ValueError, match="binary weight tensors"):
        Trainer(config()).load_state_dict(other.state_dict())
    write_run(str(tmp_path), other.state_dict(), other.config, other.data)
    with pytest.raises(io.FileFormatError, match=f"{CHECKPOINT}: damaged or not this run's checkpoint"):
        Trainer(config()).load_checkpoint(str(tmp_path))
