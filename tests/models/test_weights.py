"""Trained weights to start from: ``create(name, weights=REF)`` and ``from_pretrained(REF)`` for a run
directory, a ``.safetensors`` file, a pushed folder and ``hf://ORG/NAME`` (offline: the Hub's local cache,
or a one-line error); SHA-256 checks, pickle refused, one-line errors naming the file and the mismatch."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from onebit import data as datasets
from onebit.hub import push
from onebit.models import create, from_pretrained, load_weights, resolve_weights
from onebit.models.weights import ChecksumError, HubError, WeightsError, git_blob_sha1, parse_hub_ref
from onebit.train import TrainConfig, Trainer, load_run

SMALL = {"width": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch lenet_binary run on digits and its push to a local folder."""
    root = tmp_path_factory.mktemp("weights")
    run = root / "run"
    Trainer(TrainConfig(model="lenet_binary", data="digits", epochs=1, seed=5, out=str(run), model_kwargs=SMALL)).fit()
    push(str(run), str(root / "pushed"))
    return run, root / "pushed"


@pytest.fixture(scope="module")
def digits_test():
    return datasets.load("digits").test.tensors


def assert_same_state(model, path):
    """``model``'s state_dict holds exactly the tensors of the safetensors file ``path``, bit for bit."""
    reference = load_file(str(path))
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for key, tensor in reference.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("which", ["run", "file", "pushed"])
def test_create_with_weights_is_bit_identical_to_the_run(trained, digits_test, which):
    run, pushed = trained
    ref = {"run": run, "file": run / "model.safetensors", "pushed": pushed}[which]
    shape = {"in_channels": 1} if which == "file" else {}  # a bare file has no config to take them from
    model = create("lenet_binary", weights=str(ref), **shape, **SMALL)
    assert_same_state(model, run / "model.safetensors")
    reference, _ = load_run(str(run))
    x, _ = digits_test
    assert torch.equal(outputs(model, x), outputs(reference, x))


@pytest.mark.parametrize("which", ["run", "pushed"])
def test_from_pretrained_builds_the_model_its_config_names(trained, digits_test, which):
    run, pushed = trained
    model = from_pretrained(str(run if which == "run" else pushed))
    assert not model.training
    assert_same_state(model, run / "model.safetensors")
    reference, _ = load_run(str(run))
    assert torch.equal(outputs(model, digits_test[0]), outputs(reference, digits_test[0]))


def test_load_weights_returns_the_state_and_the_config(trained):
    run, pushed = trained
    state, config = load_weights(str(pushed))
    with open(pushed / "config.json") as f:
        assert config == json.load(f)
    assert config["sha256"]["model.safetensors"] == hashlib.sha256((run / "model.safetensors").read_bytes()).hexdigest()
    reference = load_file(str(run / "model.safetensors"))
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    assert load_weights(str(run / "model.safetensors"))[1] is None
    assert resolve_weights(str(pushed)) == str(pushed / "model.safetensors")


@pytest.mark.parametrize(
    "name, shape, named",
    [
        ("lenet", {}, ["'lenet_binary'", "'lenet'"]),
        ("lenet_binary", {"num_classes": 3}, ["num_classes=10", "num_classes=3"]),
        ("lenet_binary", {"in_channels": 3}, ["in_channels=1", "in_channels=3"]),
    ],
)
def test_a_config_naming_another_model_or_shape_is_refused(trained, name, shape, named):
    run, pushed = trained
    for ref in (run, pushed):
        with pytest.raises(ValueError) as caught:
            create(name, weights=str(ref), **shape, **SMALL)
        message = str(caught.value)
        assert "\n" not in message and str(ref) in message
        assert all(n in message for n in named), message


def test_a_missing_key_or_a_wrong_shape_names_the_file_and_the_first_mismatch(trained, tmp_path):
    run, _ = trained
    state = load_file(str(run / "model.safetensors"))
    first = next(iter(create("lenet_binary", num_classes=10, in_channels=1, **SMALL).state_dict()))
    missing = tmp_path / "missing.safetensors"
    save_file({k: v for k, v in state.items() if k != first}, str(missing))
    with pytest.raises(WeightsError) as caught:
        create("lenet_binary", in_channels=1, weights=str(missing), **SMALL)
    assert str(missing) in str(caught.value) and f"missing key {first!r}" in str(caught.value)

    with pytest.raises(WeightsError) as caught:  # the default width (32): every conv has another shape
        create("lenet_binary", weights=str(run))
    message = str(caught.value)
    assert str(run / "model.safetensors") in message and f"{first!r} has shape {list(state[first].shape)}" in message
    assert "\n" not in message

    extra = tmp_path / "extra.safetensors"
    save_file({**state, "bogus": torch.zeros(1)}, str(extra))
    with pytest.raises(WeightsError, match="unexpected key 'bogus'"):
        create("lenet_binary", in_channels=1, weights=str(extra), **SMALL)


def test_a_tampered_pushed_file_is_detected_by_its_sha256(trained, tmp_path):
    _, pushed = trained
    copy = shutil.copytree(pushed, tmp_path / "copy")
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor's data: still a readable safetensors file
    (copy / "model.safetensors").write_bytes(bytes(data))
    load_file(str(copy / "model.safetensors"))
    for load in (lambda: from_pretrained(str(copy)), lambda: create("lenet_binary", weights=str(copy), **SMALL)):
        with pytest.raises(ChecksumError) as caught:
            load()
        assert str(copy / "model.safetensors") in str(caught.value) and "SHA-256" in str(caught.value)


class _Marker:
    """Unpickling this creates a file: proof that a pickle was executed."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name", ["weights.pt", "weights.bin", "weights.safetensors"])
def test_a_pickle_file_is_refused_and_never_unpickled(tmp_path, name):
    marker = tmp_path / "unpickled"
    _Marker.path = str(marker)
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": _Marker()}, protocol=4))
    with pytest.raises(WeightsError, match="pickle") as caught:
        create("lenet_binary", in_channels=1, weights=str(path))
    assert str(path) in str(caught.value)
    torch.save({"w": torch.zeros(2)}, str(tmp_path / "zip.safetensors"))  # torch.save's zip format too
    with pytest.raises(WeightsError, match="pickle"):
        load_weights(str(tmp_path / "zip.safetensors"))
    assert not marker.exists()


def test_a_packed_engine_file_is_not_taken_for_a_state_dict(trained):
    _, pushed = trained
    with pytest.raises(WeightsError, match="packed engine file"):
        create("lenet_binary", weights=str(pushed / "model.onebit.safetensors"), **SMALL)


@pytest.mark.parametrize(
    "ref, why",
    [
        ("hf://", "no repository"),
        ("hf://a", "no model name"),
        ("hf://a/b@", "empty revision"),
        ("hf://a/b/c", "more than ORG/NAME"),
        ("hf:///b", "empty organization"),
        ("hf://a/-b", "not a valid Hub name"),
        ("hf://a/b@two words", "not a branch, tag or commit"),
    ],
)
def test_a_malformed_hub_reference_is_a_clear_error(ref, why, capsys):
    from onebit.cli import main

    with pytest.raises(WeightsError) as caught:
        from_pretrained(ref)
    assert repr(ref) in str(caught.value) and why in str(caught.value)
    with pytest.raises(ValueError, match=why):
        create("lenet_binary", weights=ref)
    assert main(["eval", ref]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and why in lines[0]


def test_a_hub_reference_without_huggingface_hub_installed_names_the_extra(monkeypatch, capsys):
    from onebit.cli import main

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # an installation without the hub extra
    with pytest.raises(HubError, match=r"hf://org/name: .*pip install 'onebit\[hub\]'"):
        from_pretrained("hf://org/name")
    assert main(["eval", "hf://org/name"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "onebit[hub]" in lines[0]


def test_hub_references_parse_into_repository_and_revision():
    assert parse_hub_ref("hf://org/name") == parse_hub_ref("hf://org/name")
    ref = parse_hub_ref("hf://my-org/lenet_binary.v2@refs/pr/1")
    assert (ref.repo_id, ref.revision, str(ref)) == (
        "my-org/lenet_binary.v2",
        "refs/pr/1",
        "hf://my-org/lenet_binary.v2@refs/pr/1",
    )
    assert parse_hub_ref("hf://org/name").revision is None


# -- hf:// for real: no network here; the Hub's local cache --------------------------------------
def hub_env(home, **extra):
    """The environment of a process whose Hugging Face home (cache, token) is ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
    env.update(HF_HOME=str(home), **extra)
    return env


def python(code, env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)


def onebit_cli(args, env):
    return subprocess.run([sys.executable, "-m", "onebit", *args], capture_output=True, text=True, env=env, timeout=600)


API_ERROR = """
import sys
from onebit.models import from_pretrained
try:
    from_pretrained(sys.argv[1] if len(sys.argv) > 1 else {ref!r})
except Exception as error:
    print(type(error).__name__, isinstance(error, OSError), isinstance(error, ValueError))
    print(error)
"""


@pytest.mark.parametrize(
    "extra, cause",
    [
        ({"HF_HUB_OFFLINE": "1"}, "offline mode"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hugging Face Hub at http://127.0.0.1:9"),
    ],
)
def test_a_hub_reference_offline_with_an_empty_cache_is_one_line(tmp_path, extra, cause):
    pytest.importorskip("huggingface_hub")
    ref = "hf://onebit-tests/no-such-model"
    env = hub_env(tmp_path / "hf", **extra)
    result = python(API_ERROR.format(ref=ref), env)
    kind, message = result.stdout.splitlines()
    assert kind == "HubError True False", result.stderr
    assert message.startswith(ref + ": ") and cause in message and "not in the local cache" in message
    assert result.stderr.strip() == ""  # no retry warnings either

    cli = onebit_cli(["eval", ref], env)
    lines = [line for line in cli.stderr.splitlines() if line.strip()]
    assert cli.returncode == 2 and len(lines) == 1, cli.stderr
    assert ref in lines[0] and cause in lines[0] and "Traceback" not in cli.stderr


def test_a_hub_reference_with_the_real_endpoint_fails_in_one_line_without_network(tmp_path):
    pytest.importorskip("huggingface_hub")
    ref = "hf://onebit-tests/no-such-model@v1"
    cli = onebit_cli(["eval", ref], hub_env(tmp_path / "hf"))
    lines = [line for line in cli.stderr.splitlines() if line.strip()]
    assert cli.returncode == 2 and len(lines) == 1, cli.stderr
    assert ref in lines[0] and "Traceback" not in cli.stderr
    # offline (as here): "cannot reach ... not in the local cache"; online: "no such model repository"
    assert "not in the local cache" in lines[0] or "no such model repository" in lines[0]


def fill_hub_cache(home, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """The Hub's local cache layout (as huggingface_hub writes it) holding ``folder``'s files at ``commit``:
    blobs named by their SHA-256 (LFS files) or git blob id, linked from the snapshot, ``refs/main``."""
    root = home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    (root / "snapshots" / commit).mkdir(parents=True)
    (root / "blobs").mkdir()
    for name, lfs in (("config.json", False), ("model.safetensors", True)):
        data = (folder / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest() if lfs else git_blob_sha1(data)
        (root / "blobs" / blob).write_bytes(data)
        os.symlink(f"../../blobs/{blob}", root / "snapshots" / commit / name)
    return root, commit


SAVE_STATE = """
import sys
from safetensors.torch import save_file
from onebit.models import from_pretrained
model = from_pretrained(sys.argv[1])
save_file(model.state_dict(), sys.argv[2])
print(type(model).__name__, model.training)
"""


def test_a_pushed_model_in_the_hub_cache_loads_offline_and_a_damaged_blob_is_caught(trained, tmp_path):
    pytest.importorskip("huggingface_hub")
    run, pushed = trained
    home = tmp_path / "hf"
    root, commit = fill_hub_cache(home, "onebit-tests/lenet-digits", pushed)
    env = hub_env(home, HF_HUB_OFFLINE="1")
    for ref in ("hf://onebit-tests/lenet-digits", f"hf://onebit-tests/lenet-digits@{commit}"):
        out = tmp_path / "state.safetensors"
        result = subprocess.run(
            [sys.executable, "-c", SAVE_STATE, ref, str(out)], capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0 and result.stdout.split()[1] == "False", result.stderr
        reference = load_file(str(run / "model.safetensors"))
        state = load_file(str(out))
        assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)

    accuracy = lambda text: [line for line in text.splitlines() if line.startswith("accuracy:")]  # noqa: E731
    from_hub = onebit_cli(["eval", "hf://onebit-tests/lenet-digits"], env)
    from_run = onebit_cli(["eval", str(run)], env)
    assert from_hub.returncode == 0, from_hub.stderr
    assert accuracy(from_hub.stdout) == accuracy(from_run.stdout) and accuracy(from_run.stdout)

    blob = os.path.realpath(root / "snapshots" / commit / "model.safetensors")
    data = bytearray(open(blob, "rb").read())
    data[-1] ^= 0x01
    open(blob, "wb").write(bytes(data))
    result = python(API_ERROR.format(ref="hf://onebit-tests/lenet-digits"), env)
    kind, message = result.stdout.splitlines()
    assert kind == "ChecksumError False True"
    assert "hf://onebit-tests/lenet-digits/model.safetensors" in message and "SHA-256" in message
