"""The config.json beside a model's weights: one checker (onebit.models.config_file) for a run's and a
push's, used by both readers (onebit.train.read_run_config and onebit.models.weights.fetch_weights), whose
errors name the file and the entry."""

import json

import pytest

from onebit import io
from onebit.models.config_file import check_config, read_config
from onebit.models.weights import fetch_weights
from onebit.train import read_run_config

GOOD = {
    "config": {"model": "lenet_binary", "model_kwargs": {"width": 8}},
    "num_classes": 10,
    "in_channels": 1,
    "image_size": [8, 8],
    "sha256": {"model.safetensors": "0" * 64},
}


def changed(**entries):
    meta = json.loads(json.dumps(GOOD))
    for key, value in entries.items():
        if value is None:
            del meta[key]
        else:
            meta[key] = value
    return meta


DAMAGED = [
    ([GOOD], "not a JSON object"),
    (changed(image_size=None), "missing entry 'image_size'"),
    (changed(config=None), "missing entry 'config'"),
    (changed(config={"model_kwargs": {}}), "entry 'config' has no model name"),
    (changed(config={"model": "lenet", "model_kwargs": [1]}), "entry 'config.model_kwargs' is not an object"),
    (changed(num_classes="ten"), "entry 'num_classes' is not a positive integer: 'ten'"),
    (changed(in_channels=True), "entry 'in_channels' is not a positive integer: True"),
    (changed(num_classes=0), "entry 'num_classes' is not a positive integer: 0"),
    (changed(image_size=[0, 8]), "entry 'image_size' is not a list of 1 to 3 positive integers: [0, 8]"),
    (changed(image_size=[8, 8, 8, 8]), "entry 'image_size' is not a list of 1 to 3 positive integers"),
    (changed(image_size=8), "entry 'image_size' is not a list of 1 to 3 positive integers: 8"),
    (changed(sha256={"model.safetensors": "abc"}), "entry 'sha256' is not an object of SHA-256 hex digests"),
    (changed(sha256=["0" * 64]), "entry 'sha256' is not an object of SHA-256 hex digests"),
]
IDS = [
    "not-an-object",
    "no-image-size",
    "no-config",
    "no-model-name",
    "kwargs-not-object",
    "classes-string",
    "channels-bool",
    "classes-zero",
    "size-zero",
    "size-four-dims",
    "size-not-list",
    "sha256-not-hex",
    "sha256-not-object",
]


def test_a_well_formed_config_is_returned_as_it_is(tmp_path):
    assert check_config(GOOD, "x/config.json") is GOOD
    without_sums = changed(sha256=None)  # a run's config records no SHA-256
    assert check_config(without_sums, "run/config.json") == without_sums
    io.save_json(tmp_path / "config.json", GOOD)
    assert read_config(tmp_path / "config.json") == GOOD


@pytest.mark.parametrize("meta, why", DAMAGED, ids=IDS)
def test_the_checker_names_the_file_and_the_entry(meta, why):
    with pytest.raises(io.FileFormatError) as caught:
        check_config(meta, "somewhere/config.json")
    message = str(caught.value)
    assert message.startswith(f"somewhere/config.json: {why}") and "config.json, or damaged" in message


@pytest.mark.parametrize("meta, why", DAMAGED, ids=IDS)
def test_a_run_directory_and_a_pushed_folder_are_checked_alike(tmp_path, meta, why):
    io.save_json(tmp_path / "config.json", meta)
    path = str(tmp_path / "config.json")
    for read in (lambda: read_run_config(str(tmp_path)), lambda: fetch_weights(str(tmp_path))):
        with pytest.raises(io.FileFormatError) as caught:
            read()
        assert str(caught.value).startswith(f"{path}: {why}")


def test_a_file_that_is_not_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(io.FileFormatError, match="config.json: not a valid JSON file"):
        read_config(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="not a onebit run directory"):
        read_run_config(str(tmp_path / "elsewhere"))
