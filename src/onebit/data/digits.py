"""scikit-learn's digits: 1,797 real 8x8 grey-scale handwritten digits, bundled offline."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from onebit.data.bundle import DataBundle, normalize, register_dataset


@register_dataset("digits")
def digits(test_fraction: float = 0.2, split_seed: int = 0) -> DataBundle:
    """The digits dataset with a fixed, stratified train/test split (1,437 / 360 images by default)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw.target, dtype=torch.int64)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=test_fraction, random_state=split_seed, stratify=labels.numpy()
    )
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    x_train, x_test, mean, std = normalize(images[train_idx], images[test_idx])
    return DataBundle(
        name="digits",
        train=TensorDataset(x_train, labels[train_idx]),
        test=TensorDataset(x_test, labels[test_idx]),
        num_classes=10,
        classes=[str(i) for i in range(10)],
        mean=mean,
        std=std,
    )
