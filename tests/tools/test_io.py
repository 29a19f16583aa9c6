"""Atomic, pickle-free files."""

import os

import pytest
import torch

from onebit import io


def test_tensors_round_trip_without_pickle(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"w": torch.randn(3, 4), "n": torch.tensor(7), "view": torch.arange(10)[::2]}
    io.save_tensors(path, tensors, metadata={"k": "v"})
    loaded = io.load_tensors(path)
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert torch.equal(loaded[key], value)
    assert open(path, "rb").read(2) != b"\x80\x04"  # not a pickle


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    io.save_json(path, {"version": 1})
    with pytest.raises(TypeError):
        io.save_json(path, {"bad": object()})  # not JSON-serializable: fails mid-write
    assert io.load_json(path) == {"version": 1}
    assert os.listdir(tmp_path) == ["config.json"]


def test_an_interrupted_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "data.bin"
    io.atomic_write_bytes(path, b"old")
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"partial")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["data.bin"]


def test_written_files_have_ordinary_permissions(tmp_path):
    path = tmp_path / "h.csv"
    io.save_csv(path, ["a", "b"], [[1, 2]])
    assert path.read_text() == "a,b\n1,2\n"
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc, a directory no file can be made in")
def test_a_write_that_fails_names_the_file_asked_for_not_its_temporary():
    with pytest.raises(FileNotFoundError) as failed:
        io.save_tensors("/proc/x.safetensors", {"w": torch.zeros(2)})
    assert failed.value.filename == "/proc/x.safetensors" and ".tmp-" not in str(failed.value)
    with pytest.raises(FileNotFoundError, match="without a name"):
        io.save_json("", {})
