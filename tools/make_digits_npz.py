"""Write ``src/onebit/data/digits.npz``: the 1,797 8x8 handwritten digits onebit ships with.

The images and labels are scikit-learn's ``load_digits()`` (the UCI optical-recognition
digits, grey levels 0..16); the default train/test split is the one scikit-learn's
``train_test_split(arange(1797), test_size=0.2, random_state=0, stratify=labels)`` gives,
stored as two index arrays in that function's order, so onebit's default ``digits``
split needs no scikit-learn at run time and stays exactly what it was.

Arrays in the file (read with ``np.load(path, allow_pickle=False)``):

- ``images``    uint8 ``[1797, 8, 8]``, values 0..16
- ``labels``    uint8 ``[1797]``, values 0..9
- ``train_idx`` uint16 ``[1437]``, ``test_idx`` uint16 ``[360]``: a partition of ``0..1796``

Run once, with scikit-learn installed, from the repository root::

    .venv/bin/python tools/make_digits_npz.py            # writes src/onebit/data/digits.npz
    .venv/bin/python tools/make_digits_npz.py OUT.npz    # writes elsewhere

The file's arrays are checked against scikit-learn's by ``tests/test_packaging.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "onebit" / "data" / "digits.npz"


def digits_arrays() -> dict[str, np.ndarray]:
    raw = load_digits()
    if not (np.array_equal(raw.images, np.round(raw.images)) and raw.images.min() >= 0 and raw.images.max() <= 16):
        raise SystemExit("load_digits() no longer gives integer grey levels 0..16")
    labels = np.asarray(raw.target)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels)
    return {
        "images": raw.images.astype(np.uint8),
        "labels": labels.astype(np.uint8),
        "train_idx": np.asarray(train_idx, dtype=np.uint16),
        "test_idx": np.asarray(test_idx, dtype=np.uint16),
    }


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    arrays = digits_arrays()
    np.savez_compressed(out, **arrays)
    shapes = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in arrays.items())
    print(f"wrote {out} ({out.stat().st_size:,} bytes): {shapes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
