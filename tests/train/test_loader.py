"""Serving data to the trainer: the epoch's order, the dropped last batch, per-sample randomness
that does not depend on the worker, and a streamed run stopped mid-epoch that resumes exactly."""

import signal

import numpy as np
import pytest
import torch
from PIL import Image

from onebit import data, io
from onebit.data import transforms as T
from onebit.data.augment import Augment
from onebit.data.loader import (
    AugmentedSamples,
    EpochBatches,
    batch_indices,
    epoch_permutation,
    make_loader,
    sample_seed,
    steps_per_epoch,
)
from onebit.train import Interrupted, TrainConfig, Trainer


def make_image_folder(root, classes=3, per_class=6, val_per_class=2, sizes=(64, 128), seed=0, kind="png"):
    """ImageNet's layout: root/train/<class>/*, root/val/<class>/*; RGB images of random sizes."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                pixels[..., c % 3] //= 2  # a class signal
                Image.fromarray(pixels).save(folder / f"{i}.{kind}")
    return root


# -- the epoch's batches --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n, batch, world, steps",
    [
        (1437, 4, 1, 359),  # 1437 = 4 * 359 + 1: the last batch of one would break BatchNorm: dropped
        (65, 64, 1, 1),  # 64 + 1: dropped
        (66, 64, 1, 2),  # 64 + 2: kept
        (60000, 128, 1, 469),  # 468 full batches + 96
        (130, 64, 2, 2),  # 2 left over: one example per process: dropped
        (131, 64, 2, 3),  # 3 left over, padded to 4: two per process: kept
        (128, 64, 1, 2),
    ],
)
def test_the_last_batch_is_dropped_only_when_a_process_would_get_fewer_than_two(n, batch, world, steps):
    assert steps_per_epoch(n, batch, world) == steps


def test_epoch_batches_from_a_step_are_the_tail_of_the_whole_epoch():
    sampler = EpochBatches(49, 8, seed=4)
    sampler.set_epoch(3)
    whole = list(sampler)
    perm = epoch_permutation(49, 4, 3)
    assert [i for i, _ in whole[0]] == perm[:8].tolist() and all(e == 3 for b in whole for _, e in b)
    assert len(whole) == 6 and sorted(i for b in whole for i, _ in b) == sorted(perm[:48].tolist())  # 1 left: dropped
    sampler.set_epoch(3, start=4)
    assert list(sampler) == whole[4:] and len(sampler) == 2


def test_processes_share_each_global_batch():
    perm = epoch_permutation(20, 0, 0)
    parts = [batch_indices(perm, 2, 6, rank, 3).tolist() for rank in range(3)]
    assert sorted(sum(parts, [])) == sorted(perm[12:18].tolist())


def test_a_samples_randomness_is_a_function_of_seed_epoch_and_index():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450 and all(0 <= v < 2**63 for v in seeds)
    assert sample_seed(1, 2, 3) == sample_seed(1, 2, 3)

    images = torch.randint(0, 256, (10, 3, 12, 12), dtype=torch.uint8)
    source = data.datasets.ArrayDataset(images, torch.arange(10))
    transform = T.Compose([T.RandomCrop(12, padding=2), T.RandomHorizontalFlip()])
    samples = AugmentedSamples(source, transform, seed=7)
    x, y = samples[(4, 2)]
    expected = transform(images[4], torch.Generator().manual_seed(sample_seed(7, 2, 4)))
    assert torch.equal(x, expected) and y == 4
    assert not torch.equal(samples[(4, 3)][0], x) or not torch.equal(samples[(4, 5)][0], x)


# -- image folders stream -------------------------------------------------------------------------
def test_an_image_folder_in_imagenet_layout_is_read_one_image_at_a_time(tmp_path):
    root = make_image_folder(tmp_path / "inet", kind="jpg")
    bundle = data.load(str(root), image_size=64)
    assert bundle.num_classes == 3 and bundle.in_channels == 3 and bundle.image_size == (64, 64)
    assert len(bundle.train) == 18 and len(bundle.test) == 6
    assert not hasattr(bundle.train.source, "images")  # names and labels only
    assert bundle.augment == "resized-crop+flip" and bundle.prepare == "center"
    x, y = bundle.test[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == 0
    # evaluation: shorter side to 64 / 0.875 = 73, centre crop 64, to [0, 1], normalized
    raw = torch.from_numpy(np.array(Image.open(bundle.test.source.path(0)).convert("RGB"))).permute(2, 0, 1)
    expected = T.Normalize(bundle.mean, bundle.std)(T.CenterCrop(64)(T.Resize(73)(raw)).float() / 255.0)
    assert torch.equal(x, expected)


def test_statistics_are_estimated_from_a_sample_or_given(tmp_path):
    root = make_image_folder(tmp_path / "inet")
    bundle = data.load(str(root), image_size=64)
    x = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)  # 18 images <= the sample: all of them
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4)
    given = data.load(str(root), image_size=64, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    raw = given.test.source[0][0]
    assert given.mean == [0.5] * 3 and torch.equal(
        given.test[0][0], T.Normalize([0.5] * 3, [0.25] * 3)(T.CenterCrop(64)(T.Resize(73)(raw)).float() / 255.0)
    )
    with pytest.raises(ValueError, match="--mean/--std: inet has 3 channel"):
        data.load(str(root), mean=[0.5], std=[0.2])
    with pytest.raises(ValueError, match="both mean and std"):
        data.load(str(root), mean=[0.5, 0.5, 0.5])


def test_training_samples_are_the_same_for_any_number_of_workers(tmp_path):
    root = make_image_folder(tmp_path / "inet")
    bundle = data.load(str(root), image_size=64)
    samples = AugmentedSamples(
        bundle.train.source, bundle.train_transform(Augment.parse("resized-crop+flip", (64, 64))), 3
    )
    batches = {}
    for workers in (0, 2):
        sampler = EpochBatches(len(samples), 4, seed=3)
        loader = make_loader(samples, sampler, workers)
        batches[workers] = []
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches[workers] += [x for x, _ in loader]
    assert len(batches[0]) == 10  # 18 = 4 * 4 + 2: five batches an epoch
    assert all(torch.equal(a, b) for a, b in zip(batches[0], batches[2]))
    assert not torch.equal(batches[0][0], batches[0][5])  # another epoch, other crops


# -- the trainer on streamed data -----------------------------------------------------------------
class StopAt(Trainer):
    stop_at = 0

    def on_step_end(self):
        if self.global_step == self.stop_at:
            self.request_stop(signal.SIGTERM)


def streamed(out, root, **overrides):
    values = dict(
        model="lenet_binary",
        data=str(root),
        image_size=16,
        epochs=2,
        batch_size=4,
        lr=1e-2,
        seed=1,
        out=str(out),
        model_kwargs={"width": 4},
        loader_workers=2,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_a_streamed_run_stopped_mid_epoch_with_workers_resumes_to_identical_weights(tmp_path):
    root = make_image_folder(tmp_path / "small", classes=2, per_class=9, sizes=(20, 28))  # 18 = 4 * 4 + 2
    whole = Trainer(streamed(tmp_path / "whole", root))
    assert whole.steps_per_epoch == 5 and not whole.batched
    whole.fit()

    StopAt.stop_at = 7  # epoch 1, step 2
    first = StopAt(streamed(tmp_path / "split", root))
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer.from_run(str(tmp_path / "split"), loader_workers=1)  # fewer workers: the same samples
    assert (resumed.epoch, resumed.step) == (1, 2)
    resumed.fit()
    a, b = whole.model.state_dict(), io.load_tensors(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_in_memory_data_with_loader_workers_trains_per_sample(tmp_path):
    one = Trainer(
        TrainConfig(
            model="lenet_binary",
            model_kwargs={"width": 4},
            epochs=1,
            loader_workers=1,
            augment="crop+flip",
            out=str(tmp_path / "a"),
        )
    )
    assert not one.batched
    history = one.fit()
    two = Trainer(
        TrainConfig(
            model="lenet_binary",
            model_kwargs={"width": 4},
            epochs=1,
            loader_workers=2,
            augment="crop+flip",
            out=str(tmp_path / "b"),
        )
    )
    assert two.fit()[0]["train_loss"] == history[0]["train_loss"]
    a, b = one.model.state_dict(), two.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _onebit(*args, **kwargs):
    import subprocess
    import sys

    return subprocess.Popen(
        [sys.executable, "-m", "onebit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


@pytest.mark.parametrize("stop", ["SIGTERM to the process group", "kill -9"])
def test_the_cli_stopped_mid_run_with_loader_workers_resumes_to_an_uninterrupted_runs_weights(tmp_path, stop):
    import os
    import time

    root = make_image_folder(tmp_path / "data", classes=2, per_class=20, sizes=(20, 28))
    common = [
        "--data",
        str(root),
        "--image-size",
        "16",
        "--model-arg",
        "width=4",
        "--epochs",
        "20",
        "--batch-size",
        "4",
        "--loader-workers",
        "2",
        "--seed",
        "3",
    ]  # 20 epochs: the stop lands while it trains, on any machine
    out = tmp_path / "run"
    proc = _onebit("train", *common, "--out", str(out), start_new_session=True)
    deadline = time.time() + 300
    while not (out / "history.csv").exists():  # the first epoch is saved: stop in the second
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM if stop.startswith("SIGTERM") else signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)  # every process of the group has ended
    if stop.startswith("SIGTERM"):
        assert proc.returncode == 0 and "stopped by SIGTERM" in stderr and "Traceback" not in stderr, stderr
    assert len((out / "history.csv").read_text().splitlines()) - 1 < 20  # stopped before its last epoch
    resumed = _onebit("train", "--resume", str(out))
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    whole = _onebit("train", *common, "--loader-workers", "1", "--out", str(tmp_path / "whole"))
    whole.communicate(timeout=300)
    a, b = io.load_tensors(out / "model.safetensors"), io.load_tensors(tmp_path / "whole" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


class DropoutNet(torch.nn.Module):
    """Draws from torch's global generator in every training step (dropout)."""

    def __init__(self, num_classes=2, in_channels=3):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(in_channels * 16 * 16, 16),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.5),
            torch.nn.Linear(16, num_classes),
        )

    def forward(self, x):
        return self.net(x)


def test_a_model_drawing_from_the_global_generator_resumes_exactly_on_the_loader_path(tmp_path):
    root = make_image_folder(tmp_path / "small", classes=2, per_class=9, sizes=(20, 28))
    model_file = tmp_path / "net.py"
    model_file.write_text("from test_loader import DropoutNet\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    overrides = dict(model=f"{model_file}:DropoutNet", model_kwargs={}, loader_workers=1)
    whole = Trainer(streamed(tmp_path / "whole", root, **overrides))
    whole.fit()
    StopAt.stop_at = 7
    first = StopAt(streamed(tmp_path / "split", root, **overrides))
    with pytest.raises(Interrupted):
        first.fit()
    resumed = Trainer.from_run(str(tmp_path / "split"))
    resumed.fit()
    a, b = whole.model.state_dict(), io.load_tensors(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_unreadable_image_met_by_a_worker_is_one_line_naming_the_file(tmp_path):
    root = make_image_folder(tmp_path / "broken", classes=2, per_class=9, sizes=(20, 28))
    bad = sorted((root / "train" / "class1").iterdir())[-1]
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2])  # truncated: its header reads, its pixels do not
    trainer = Trainer(streamed(tmp_path / "run", root, loader_workers=2, epochs=1, mean=[0.5] * 3, std=[0.25] * 3))
    with pytest.raises(ValueError) as error:
        trainer.fit()
    message = str(error.value)
    assert str(bad) in message and "cannot read image" in message and "\n" not in message
    assert "Traceback" not in message


def test_file_names_that_are_not_utf8_are_read(tmp_path):
    import os

    root = make_image_folder(tmp_path / "names", classes=2, per_class=3, val_per_class=1, sizes=(20, 20))
    first = sorted((root / "train" / "class0").iterdir())[0]
    odd = os.fsencode(str(first.parent)) + b"/caf\xe9.png"
    os.rename(os.fsencode(str(first)), odd)
    bundle = data.load(str(root))
    assert odd in [os.fsencode(bundle.train.source.path(i)) for i in range(len(bundle.train))]
    assert bundle.train[0][0].shape == (3, 20, 20)
