"""The digits: 1,797 real 8x8 grey-scale handwritten digits (grey levels 0..16), bundled with onebit.

The images are the UCI optical-recognition digits that scikit-learn ships as ``load_digits()``;
onebit carries its own copy, ``digits.npz`` beside this module (written by
``tools/make_digits_npz.py``), so loading them needs neither scikit-learn nor a download.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from onebit.data.bundle import DataBundle, array_bundle, register_dataset

__all__ = ["load_digits_arrays", "digits"]

#: the split stored in digits.npz: scikit-learn's train_test_split(test_size=0.2, random_state=0, stratify=labels)
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_SPLIT_SEED = 0


def load_digits_arrays(
    test_fraction: float = DEFAULT_TEST_FRACTION, split_seed: int = DEFAULT_SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The bundled digits and a stratified train/test split of them.

    Returns ``(images, labels, train_idx, test_idx)``: ``images`` uint8 ``[1797, 1, 8, 8]`` (values
    0..16), ``labels`` int64 ``[1797]`` (0..9), and two int64 index arrays that partition
    ``0..1796``, each in a shuffled order.

    With the default arguments the split is the stored one: exactly what scikit-learn's
    ``train_test_split(arange(1797), test_size=0.2, random_state=0, stratify=labels)`` returns
    (1,437 train / 360 test, in that function's order). Any other arguments give a stratified split
    computed here, which is *not* scikit-learn's for the same arguments: per class ``c`` with
    ``n_c`` images, ``clip(round(n_c * test_fraction), 1, n_c - 1)`` of them, drawn with
    ``np.random.default_rng(split_seed)``, go to the test split; both splits are then shuffled.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"digits: test_fraction must lie strictly between 0 and 1, got {test_fraction!r}")
    with resources.files(__package__).joinpath("digits.npz").open("rb") as f, np.load(f, allow_pickle=False) as npz:
        images = npz["images"][:, None].astype(np.uint8, copy=False)
        labels = npz["labels"].astype(np.int64)
        if test_fraction == DEFAULT_TEST_FRACTION and split_seed == DEFAULT_SPLIT_SEED:
            return images, labels, npz["train_idx"].astype(np.int64), npz["test_idx"].astype(np.int64)
    train_idx, test_idx = _stratified_split(labels, test_fraction, split_seed)
    return images, labels, train_idx, test_idx


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(np.clip(round(len(members) * test_fraction), 1, len(members) - 1))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


@register_dataset("digits")
def digits(
    test_fraction: float = DEFAULT_TEST_FRACTION,
    split_seed: int = DEFAULT_SPLIT_SEED,
    image_size: int | None = None,
    mean=None,
    std=None,
) -> DataBundle:
    """The digits with a fixed, stratified train/test split (1,437 / 360 images by default, see
    :func:`load_digits_arrays`), kept as uint8 and seen as ``images / 16`` normalized with the
    training split's statistics."""
    images_u8, labels_np, train_np, test_np = load_digits_arrays(test_fraction, split_seed)
    images, labels = torch.from_numpy(images_u8), torch.from_numpy(labels_np)
    train_idx, test_idx = torch.from_numpy(train_np), torch.from_numpy(test_np)
    return array_bundle(
        "digits",
        (images[train_idx], labels[train_idx]),
        (images[test_idx], labels[test_idx]),
        scale=16.0,
        num_classes=10,
        classes=[str(i) for i in range(10)],
        augment="none",
        image_size=image_size,
        mean=mean,
        std=std,
    )
