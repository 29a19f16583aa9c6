"""Dataset loaders on fixtures written here: IDX, CIFAR (python and binary), image folders."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from onebit import data
from onebit.data import Augment


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_dir(root, gz=False, n_train=20, n_test=10, size=28):
    rng = np.random.default_rng(0)
    root.mkdir(exist_ok=True)
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, size, size)), gz)
    write_idx(root / "train-labels-idx1-ubyte", np.arange(n_train) % 10, gz)
    write_idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, size, size)), gz)
    write_idx(root / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, gz)
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_reads_images_and_labels(tmp_path, gz):
    root = make_idx_dir(tmp_path / "fmnist", gz=gz)
    bundle = data.load(str(root))
    assert bundle.num_classes == 10 and bundle.in_channels == 1 and bundle.image_size == (28, 28)
    assert len(bundle.train) == 20 and len(bundle.test) == 10
    x, y = bundle.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [i % 10 for i in range(20)]
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-2  # normalized with train stats


def test_idx_pixels_keep_their_order(tmp_path):
    root = make_idx_dir(tmp_path / "d")
    raw = np.arange(28 * 28).reshape(1, 28, 28) % 256
    write_idx(root / "train-images-idx3-ubyte", np.repeat(raw, 20, axis=0))
    x = data.load(str(root)).train.tensors[0][0, 0]
    assert torch.argmax(x.flatten()) == int(np.argmax(raw.flatten()))


def test_upsampling_to_32_pixels(tmp_path):
    bundle = data.load(str(make_idx_dir(tmp_path / "d")), image_size=32)
    assert bundle.image_size == (32, 32)
    assert data.load("digits", image_size=16).image_size == (16, 16)


def test_malformed_idx_files_are_named(tmp_path):
    root = make_idx_dir(tmp_path / "bad")
    (root / "train-images-idx3-ubyte").write_bytes(b"\x12\x34\x08\x03garbage")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: not an IDX file"):
        data.load(str(root))
    root = make_idx_dir(tmp_path / "short")
    raw = (root / "t10k-images-idx3-ubyte").read_bytes()
    (root / "t10k-images-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte: IDX header announces shape"):
        data.load(str(root))
    root = make_idx_dir(tmp_path / "count")
    write_idx(root / "train-labels-idx1-ubyte", np.arange(7))
    with pytest.raises(ValueError, match="7 labels for 20 images"):
        data.load(str(root))
    root = make_idx_dir(tmp_path / "missing")
    (root / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="missing test labels.*t10k-labels-idx1-ubyte"):
        data.load(str(root))


def cifar_python_dir(root, n=6):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), b"labels": list(range(n))}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"c%d" % i for i in range(6)]}, f, protocol=2)
    return root


def test_cifar_python_batches(tmp_path):
    bundle = data.load(str(cifar_python_dir(tmp_path / "cifar")))
    assert len(bundle.train) == 30 and len(bundle.test) == 6
    assert bundle.in_channels == 3 and bundle.image_size == (32, 32)
    assert bundle.classes == [f"c{i}" for i in range(6)] and bundle.augment == "crop+flip"


def test_cifar_binary_batches_keep_channel_major_pixels(tmp_path):
    root = tmp_path / "cifar-bin"
    root.mkdir()
    record = np.zeros(3073, np.uint8)
    record[0] = 3
    record[1 + 1024 + 5] = 255  # green channel, row 0, column 5
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        np.stack([record, record]).tofile(root / name)
    bundle = data.load(str(root))
    x, y = bundle.train.tensors
    assert y.tolist() == [3] * 10
    assert torch.argmax(x[0].flatten()) == 1024 + 5


def test_cifar_malformed_and_unsafe_batches_are_refused(tmp_path):
    root = cifar_python_dir(tmp_path / "evil")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR python batch.*refusing"):
        data.load(str(root))
    root = cifar_python_dir(tmp_path / "missing")
    (root / "data_batch_5").unlink()
    with pytest.raises(FileNotFoundError, match="missing CIFAR batch data_batch_5"):
        data.load(str(root))
    root = tmp_path / "badbin"
    root.mkdir()
    (root / "data_batch_1.bin").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="data_batch_1.bin: size 100 bytes"):
        data.load(str(root))


def write_images(folder, n, size, color, mode="RGB"):
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.new(mode, size, color).save(folder / f"{i}.png")


def test_image_folder_with_train_and_test_splits(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        write_images(tmp_path / "ds" / split / "cat", n, (20, 20), (255, 0, 0))
        write_images(tmp_path / "ds" / split / "dog", n, (24, 16), (0, 0, 255))
    bundle = data.load(str(tmp_path / "ds"), image_size=16)
    assert bundle.classes == ["cat", "dog"] and bundle.in_channels == 3
    assert len(bundle.train) == 6 and len(bundle.test) == 4 and bundle.image_size == (16, 16)
    x, y = bundle.train.tensors
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    assert x[0, 0].mean() > x[0, 2].mean() and x[-1, 2].mean() > x[-1, 0].mean()  # red cats, blue dogs


def test_image_folder_without_splits_is_split_per_class(tmp_path):
    for c in ("a", "b", "c"):
        write_images(tmp_path / "grey" / c, 5, (12, 12), 100, mode="L")
    bundle = data.load(str(tmp_path / "grey"))
    assert bundle.in_channels == 1 and bundle.image_size == (12, 12)
    assert len(bundle.train) == 12 and len(bundle.test) == 3
    assert sorted(bundle.test.tensors[1].tolist()) == [0, 1, 2]


def test_broken_image_and_unknown_directories_are_named(tmp_path):
    write_images(tmp_path / "ds" / "x", 4, (8, 8), (0, 0, 0))
    (tmp_path / "ds" / "x" / "broken.png").write_bytes(b"not a png")
    write_images(tmp_path / "ds" / "y", 4, (8, 8), (9, 9, 9))
    with pytest.raises(ValueError, match="broken.png: cannot read image"):
        data.load(str(tmp_path / "ds"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no known format"):
        data.load(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet")


def test_augment_translates_and_flips_reproducibly():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    aug = Augment(crop_padding=2, flip=True)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape
    assert Augment.parse("crop+flip", (32, 32)) == Augment(4, True)
    assert not Augment.parse("none", (28, 28)).enabled
    shifted = Augment(crop_padding=1)(x, torch.Generator().manual_seed(0))
    for i in range(2):  # every output is a translate of its input by at most one pixel
        found = any(
            torch.equal(shifted[i, 0, 1:-1, 1:-1], x[i, 0, 1 + dy : 5 + dy, 1 + dx : 5 + dx])
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
        assert found
    with pytest.raises(ValueError, match="unknown augmentation"):
        Augment.parse("rotate", (8, 8))


def test_sixteen_bit_grey_images_keep_their_precision(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    raw = {}
    for split in ("train", "test"):
        for c in ("a", "b"):
            folder = tmp_path / "deep" / split / c
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 65536, (6, 6)).astype(np.uint16)
                Image.fromarray(pixels).save(folder / f"{i}.png")
                raw[(split, c, i)] = pixels
    bundle = data.load(str(tmp_path / "deep"))
    x, _ = bundle.train.tensors
    pixels = x * bundle.std[0] + bundle.mean[0]  # undo the normalization
    expected = np.stack([raw[("train", c, i)] for c in ("a", "b") for i in range(3)]).astype(np.float64) / 65535
    np.testing.assert_allclose(pixels[:, 0].double().numpy(), expected, atol=1e-5)
    assert float((pixels > 1 - 1e-6).double().mean()) < 0.01  # not saturated at 8 bits' maximum


def test_an_idx_set_without_images_or_pixels_is_named(tmp_path):
    for shape in ((0, 28, 28), (5, 0, 0)):
        root = make_idx_dir(tmp_path / f"idx{shape[0]}")
        write_idx(root / "train-images-idx3-ubyte", np.zeros(shape))
        write_idx(root / "train-labels-idx1-ubyte", np.zeros(shape[0]))
        with pytest.raises(ValueError, match="train-images-idx3-ubyte: holds"):
            data.load(str(root))


def test_a_decompression_bomb_is_refused_with_its_name(tmp_path):
    from PIL import Image

    write_images(tmp_path / "ds" / "x", 3, (8, 8), (0, 0, 0))
    write_images(tmp_path / "ds" / "y", 3, (8, 8), (9, 9, 9))
    # above Pillow's limit (Pillow warns) and above twice the limit (Pillow raises): a few kB each
    for side in (10000, 14000):
        bomb = tmp_path / "ds" / "x" / "bomb.png"
        Image.new("1", (side, side)).save(bomb)
        with pytest.raises(ValueError, match="bomb.png: refused, too many pixels"):
            data.load(str(tmp_path / "ds"))


def test_a_dataset_registered_as_earlier_versions_did_still_loads_and_trains(tmp_path):
    from torch.utils.data import TensorDataset

    from onebit.data import register_dataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 6, 6, generator=g), torch.arange(40) % 2

    @register_dataset("old_style_blobs")
    def old_style():  # no image_size/mean/std, TensorDatasets of normalized images
        return data.DataBundle(
            name="old_style_blobs",
            train=TensorDataset(x[:32], y[:32]),
            test=TensorDataset(x[32:], y[32:]),
            num_classes=2,
            classes=["a", "b"],
        )

    bundle = data.load("old_style_blobs")
    assert torch.equal(bundle.train.tensors[0], x[:32]) and torch.equal(bundle.test[1][0], x[33])
    assert bundle.image_size == (6, 6) and bundle.in_channels == 1
    assert data.load("old_style_blobs", image_size=12).image_size == (12, 12)
    from onebit.train import TrainConfig, Trainer

    history = Trainer(
        TrainConfig(model="lenet_binary", data="old_style_blobs", epochs=1, batch_size=8, model_kwargs={"width": 4})
    ).fit()
    assert len(history) == 1
