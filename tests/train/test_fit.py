"""``onebit.fit``: onebit's trainer on a user's own module and datasets."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import onebit
from onebit import io
from onebit.nn import QConv2d, QLinear


class TwoBlobs(Dataset):
    """A learnable toy set: 2x6x6 images whose class is the sign pattern of two quadrants."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randn(n, 2, 6, 6, generator=g) * 0.5
        x[:, 0, :3, :3] += torch.where(self.y % 2 == 1, 1.5, -1.5).view(-1, 1, 1)
        x[:, 1, 3:, 3:] += torch.where(self.y // 2 == 1, 1.5, -1.5).view(-1, 1, 1)
        self.x = x

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


class MyBinaryNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv = QConv2d(16, 16, 3, padding=1, input_quantizer="ste_sign", weight_quantizer="ste_sign")
        self.bn2 = nn.BatchNorm2d(16)
        self.head = QLinear(16 * 36, 4, input_quantizer="ste_sign", weight_quantizer="ste_sign")

    def forward(self, x):
        x = self.bn2(self.conv(self.bn(self.stem(x))))
        return self.head(x.flatten(1))


@pytest.mark.parametrize("optimizer", ["adam", "bop"])
def test_fit_trains_a_users_model_and_writes_its_run(optimizer, tmp_path):
    torch.manual_seed(0)
    model = MyBinaryNet()
    out = tmp_path / "run"
    history = onebit.fit(
        model,
        TwoBlobs(512, 0),
        DataLoader(TwoBlobs(256, 1), batch_size=50),
        epochs=6,
        batch_size=32,
        lr=1e-2,
        optimizer=optimizer,
        out=out,
        seed=0,
    )
    assert [row["epoch"] for row in history] == list(range(6))
    assert {"train_loss", "valid_loss", "accuracy", "top_k_accuracy", "flip_ratio", "time"} <= set(history[0])
    assert history[-1]["accuracy"] >= 0.9
    # the model was trained in place and its run written like onebit train's
    model.eval()
    valid = TwoBlobs(256, 1)
    with torch.no_grad():
        accuracy = (model(valid.x).argmax(1) == valid.y).float().mean().item()
    assert abs(accuracy - history[-1]["accuracy"]) < 1e-6
    for name in ("model.safetensors", "checkpoint.safetensors", "config.json", "history.csv"):
        assert (out / name).exists()
    saved = io.load_tensors(out / "model.safetensors")
    assert torch.equal(saved["conv.weight"], model.conv.weight.detach())


def test_fit_resumes_to_the_same_weights(tmp_path):
    def run(epochs, out, resume=False, model=None):
        torch.manual_seed(0)
        model = model or MyBinaryNet()
        onebit.fit(
            model,
            TwoBlobs(256, 0),
            TwoBlobs(64, 1),
            epochs=epochs,
            batch_size=32,
            out=out,
            seed=3,
            resume=resume,
            schedule="constant",
        )
        return model

    straight = run(4, tmp_path / "a")
    run(2, tmp_path / "b")
    resumed = run(4, tmp_path / "b", resume=True)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_fit_refuses_bad_data_with_a_clear_error():
    model = MyBinaryNet()
    with pytest.raises(ValueError, match="valid_data is empty"):
        onebit.fit(
            model, TwoBlobs(8, 0), TensorDataset(torch.zeros(0, 2, 6, 6), torch.zeros(0, dtype=torch.long)), epochs=1
        )
    with pytest.raises(ValueError, match="labels"):
        onebit.fit(
            model, TensorDataset(torch.zeros(4, 2, 6, 6), torch.tensor([0.5, 1, 2, 3])), TwoBlobs(8, 0), epochs=1
        )
    with pytest.raises(TypeError, match="unknown option"):
        onebit.fit(model, TwoBlobs(8, 0), TwoBlobs(8, 1), epochs=1, lerning_rate=0.1)


def test_fit_streams_a_map_style_dataset_through_loader_workers_to_the_same_weights(tmp_path):
    def run(workers):
        torch.manual_seed(0)
        model = MyBinaryNet()
        history = onebit.fit(
            model, TwoBlobs(200, 0), TwoBlobs(64, 1), epochs=2, batch_size=32, seed=1, loader_workers=workers
        )
        return model, history

    gathered, h0 = run(0)
    streamed, h2 = run(2)
    assert [r["train_loss"] for r in h0] == [r["train_loss"] for r in h2]
    for (name, a), (_, b) in zip(gathered.state_dict().items(), streamed.state_dict().items()):
        assert torch.equal(a, b), name


class Labelled(Dataset):
    def __init__(self, labels):
        self.labels = labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return torch.zeros(2, 6, 6), self.labels[i]


@pytest.mark.parametrize("workers", [0, 1])
def test_fit_refuses_labels_that_are_not_classes(workers):
    model = MyBinaryNet()
    with pytest.raises(ValueError, match=r"labels must be integer classes; item 2 has 2\.9"):
        onebit.fit(model, Labelled([0, 1, 2.9, 3]), TwoBlobs(8, 0), epochs=1, loader_workers=workers)
    with pytest.raises(ValueError, match="train_data has label 7, but num_classes is 4"):
        onebit.fit(model, Labelled([0, 1, 7, 3]), TwoBlobs(8, 0), epochs=1, num_classes=4, loader_workers=workers)
    with pytest.raises(ValueError, match="non-negative"):
        onebit.fit(model, Labelled([0, -1, 2, 3]), TwoBlobs(8, 0), epochs=1, loader_workers=workers)


def test_a_last_batch_of_one_example_is_dropped_not_fatal(tmp_path):
    model = MyBinaryNet()  # BatchNorm in training refuses a batch of one
    history = onebit.fit(model, TwoBlobs(65, 0), TwoBlobs(16, 1), epochs=2, batch_size=64, out=tmp_path / "run")
    assert len(history) == 2 and (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_train_takes_a_model_from_a_python_file(tmp_path):
    import subprocess
    import sys

    source = tmp_path / "mynet.py"
    source.write_text(
        "from torch import nn\n"
        "from onebit.nn import QConv2d\n"
        "class Tiny(nn.Module):\n"
        "    def __init__(self, num_classes=10, in_channels=1):\n"
        "        super().__init__()\n"
        "        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.BatchNorm2d(8),\n"
        "            QConv2d(8, 8, 3, input_quantizer='ste_sign', weight_quantizer='ste_sign'),\n"
        "            nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, num_classes))\n"
        "    def forward(self, x):\n"
        "        return self.body(x)\n"
    )
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "onebit", "train", "--model", f"{source}:Tiny", "--epochs", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").exists()
    from onebit.train import load_run

    model, meta = load_run(str(out))  # rebuilt from the same file
    assert type(model).__name__ == "Tiny" and meta["num_classes"] == 10
    bad = subprocess.run(
        [sys.executable, "-m", "onebit", "train", "--model", f"{source}:Nope", "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode != 0 and "Nope" in bad.stderr and "Traceback" not in bad.stderr


def test_two_fits_on_one_directory_in_two_threads_the_second_fails_at_once(tmp_path):
    import threading
    import time

    from rich.console import Console

    from onebit.train import RunDirectoryError, lock_run_directory

    out, quiet = tmp_path / "run", Console(quiet=True)
    inside, release = threading.Event(), threading.Event()

    class Waiting(nn.Module):
        """Its first training step waits until the other thread's fit has been tried."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(72, 4)

        def forward(self, x):
            if self.training and not inside.is_set():
                inside.set()
                release.wait(120)
            return self.fc(x.flatten(1))

    history = []
    first = threading.Thread(
        target=lambda: history.extend(
            onebit.fit(Waiting(), TwoBlobs(16, 0), TwoBlobs(8, 1), epochs=1, out=out, console=quiet)
        ),
        name="first-fit",
    )
    first.start()
    try:
        assert inside.wait(120)
        start = time.perf_counter()
        with pytest.raises(RunDirectoryError, match="in use by another onebit trainer of this process.*first-fit"):
            onebit.fit(MyBinaryNet(), TwoBlobs(16, 0), TwoBlobs(8, 1), epochs=1, out=out, console=quiet)
        assert time.perf_counter() - start < 10
    finally:
        release.set()
        first.join(120)
    assert len(history) == 1  # the first fit ran to its end
    # the thread holding the lock takes it again (as the onebit train command and its trainer do)
    with lock_run_directory(str(out)):
        assert len(onebit.fit(MyBinaryNet(), TwoBlobs(16, 0), TwoBlobs(8, 1), epochs=1, out=out, console=quiet)) == 1
