"""onebit installs beside other packages: pyproject.toml declares ranges, constraints.txt pins the set
`make` installs, and the bundled digits need no scikit-learn."""

import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from onebit import data
from onebit.data.digits import load_digits_arrays

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEPENDENCIES = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()}
BUILD_REQUIRES = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
DECLARED = DEPENDENCIES + [r for reqs in EXTRAS.values() for r in reqs] + BUILD_REQUIRES


def declared(name: str) -> Requirement:
    (req,) = [r for r in DECLARED if canonicalize_name(r.name) == canonicalize_name(name)]
    return req


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


@pytest.mark.parametrize("req", DECLARED, ids=str)
def test_every_declared_requirement_is_a_range_with_a_lower_bound(req):
    operators = {spec.operator for spec in req.specifier}
    assert not operators & {"==", "==="}, f"{req} pins one version: declare a range, pin in constraints.txt"
    assert operators & {">=", ">", "~="}, f"{req} has no lower bound"


def test_torch_is_declared_as_the_tested_minor_release():
    assert str(declared("torch").specifier) == str(Requirement("torch>=2.13,<2.14").specifier)


def test_pillow_is_a_runtime_dependency_and_scikit_learn_is_not():
    runtime = {canonicalize_name(r.name) for r in DEPENDENCIES}
    assert "pillow" in runtime  # onebit.data reads image folders with it
    assert "scikit-learn" not in runtime and "sklearn" not in runtime
    assert "scikit-learn" in {canonicalize_name(r.name) for r in EXTRAS["test"]}


def test_installed_torch_satisfies_the_declared_range():
    installed = metadata.version("torch")
    assert declared("torch").specifier.contains(installed, prereleases=True), installed
    assert Version(torch.__version__).release[:2] == (2, 13)


def test_constraints_pin_every_declared_package_within_its_range():
    pins = constraints()
    for req in DECLARED:
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt pins no version of {req.name} (make would resolve it freely)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt: {name}=={pins[name]} is outside {req}"
        )
    assert pins["torch"] == Version("2.13.0")


# -- the bundled digits --------------------------------------------------------------------------


def test_bundled_digits_are_scikit_learns_digits_and_default_split():
    pytest.importorskip(
        "sklearn", reason="scikit-learn (in the test extra) is needed to compare the bundled digits with its own"
    )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    raw = load_digits()
    images, labels, train_idx, test_idx = load_digits_arrays()
    expected_train, expected_test = train_test_split(
        np.arange(len(raw.target)), test_size=0.2, random_state=0, stratify=raw.target
    )
    assert images.dtype == np.uint8 and images.shape == (1797, 1, 8, 8)
    assert np.array_equal(images[:, 0].astype(np.float64), raw.images)
    assert labels.dtype == np.int64 and np.array_equal(labels, raw.target)
    assert train_idx.dtype == np.int64 and np.array_equal(train_idx, expected_train)  # same order, too
    assert test_idx.dtype == np.int64 and np.array_equal(test_idx, expected_test)


def test_digits_bundle_is_images_over_16_normalized_with_training_statistics():
    images, labels, train_idx, test_idx = (torch.from_numpy(a) for a in load_digits_arrays())
    x = images.float() / 16.0
    mean = x[train_idx].mean(dim=(0, 2, 3), keepdim=True)
    std = x[train_idx].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    bundle = data.load("digits")
    assert (len(bundle.train), len(bundle.test), bundle.num_classes) == (1437, 360, 10)
    for split, idx in ((bundle.train, train_idx), (bundle.test, test_idx)):
        got_x = torch.stack([split[i][0] for i in range(len(split))])
        got_y = torch.tensor([int(split[i][1]) for i in range(len(split))])
        assert torch.equal(got_x, (x[idx] - mean) / std), "digits are no longer bit-for-bit what they were"
        assert torch.equal(got_y, labels[idx])


def test_other_digits_splits_are_stratified_seeded_partitions():
    images, labels, train_idx, test_idx = load_digits_arrays(test_fraction=0.3, split_seed=1)
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(1797))
    per_class = np.bincount(labels)
    assert np.array_equal(np.bincount(labels[test_idx], minlength=10), np.round(per_class * 0.3).astype(int))
    assert all(np.array_equal(a, b) for a, b in zip(load_digits_arrays(0.3, 1)[2:], (train_idx, test_idx)))
    assert not np.array_equal(load_digits_arrays(0.3, 2)[3], test_idx)
    tiny = load_digits_arrays(test_fraction=0.001)[3]  # at least one test image per class
    assert np.array_equal(np.bincount(labels[tiny], minlength=10), np.ones(10, dtype=int))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="test_fraction"):
            load_digits_arrays(test_fraction=bad)


def test_digits_load_without_scikit_learn():
    code = (
        "import sys; sys.modules['sklearn'] = None\n"  # any `import sklearn...` now raises ImportError
        "from onebit import data\n"
        "b = data.load('digits')\n"
        "print(len(b.train), len(b.test))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1437", "360"]
