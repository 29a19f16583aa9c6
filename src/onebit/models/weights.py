"""Trained weights to start from: a run directory, a weights file, a pushed folder or a Hub reference.

A reference names one of:

- a run directory written by ``onebit train --out`` (its ``model.safetensors`` and ``config.json``);
- a ``.safetensors`` file holding a ``state_dict`` (no config);
- a folder written by ``onebit push`` (``model.safetensors``, ``config.json`` recording each file's SHA-256);
- ``hf://ORG/NAME[@REVISION]``: such a folder on the Hugging Face Hub, downloaded to (or, without a
  network, read from) the Hub's local cache; needs ``huggingface_hub`` (``pip install 'onebit[hub]'``).

Weights are read from safetensors only, never pickle. A file is read once: its SHA-256 is checked
against the pushed ``config.json`` (and, from the Hub, against the Hub's own: the LFS SHA-256 or git
blob id of its listing, or offline the name of the cache's blob) and its tensors are parsed from those
same bytes. Errors are one line naming the reference or file: :class:`WeightsError` (a ``ValueError``),
:class:`ChecksumError`, :class:`HubError` (an ``OSError``). The model built with them is
:mod:`onebit.models.pretrained`'s (``create(name, weights=)``, ``from_pretrained``, ``build``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onebit import io
from onebit.models.config_file import CONFIG_FILE, read_config

__all__ = [
    "WEIGHTS_FILE",
    "CONFIG_FILE",
    "PACKED_FILE",
    "CARD_FILE",
    "WeightsError",
    "ChecksumError",
    "HubError",
    "HubRef",
    "Weights",
    "parse_hub_ref",
    "is_hub_ref",
    "is_pushed_folder",
    "fetch_weights",
    "resolve_weights",
    "load_weights",
    "load_into",
    "git_blob_sha1",
    "import_hub",
    "quiet_hub",
]

WEIGHTS_FILE = "model.safetensors"
PACKED_FILE = "model.onebit.safetensors"
CARD_FILE = "README.md"
HUB_PREFIX = "hf://"
#: suffixes of pickle-based checkpoints (torch.save, pickle), refused without being read
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


class WeightsError(ValueError):
    """A reference or its weights that cannot be used; the message names it and the problem."""


class ChecksumError(WeightsError):
    """A file whose SHA-256 (or git blob id) differs from the one recorded for it."""


class HubError(OSError):
    """An ``hf://`` reference that cannot be fetched (offline and not cached, no such repository, ...)."""


# -- references --------------------------------------------------------------------------------
_REPO_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?$")


@dataclass(frozen=True)
class HubRef:
    """``hf://REPO_ID[@REVISION]``: a Hub model repository and an optional branch, tag or commit."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return HUB_PREFIX + self.repo_id + (f"@{self.revision}" if self.revision else "")


def is_hub_ref(ref: object) -> bool:
    """Whether ``ref`` is a string starting with ``hf://``."""
    return isinstance(ref, str) and ref.startswith(HUB_PREFIX)


def parse_hub_ref(ref: str) -> HubRef:
    """``"hf://org/name@rev"`` -> ``HubRef("org/name", "rev")``; :class:`WeightsError` naming what is malformed."""
    form = "expected hf://ORG/NAME or hf://ORG/NAME@REVISION"
    if not is_hub_ref(ref):
        raise WeightsError(f"{ref!r}: not a Hub reference ({form})")
    body = ref[len(HUB_PREFIX) :]
    repo_id, at, revision = body.partition("@")
    if not repo_id:
        raise WeightsError(f"{ref!r}: no repository named ({form})")
    parts = repo_id.split("/")
    if len(parts) != 2:
        what = "no model name after the organization" if len(parts) == 1 else "more than ORG/NAME"
        raise WeightsError(f"{ref!r}: {what} ({form})")
    for part, role in zip(parts, ("organization", "model name")):
        if not part:
            raise WeightsError(f"{ref!r}: empty {role} ({form})")
        if not _REPO_PART.match(part) or "--" in part or ".." in part:
            raise WeightsError(
                f"{ref!r}: {role} {part!r} is not a valid Hub name (letters, digits, '-', '_', '.'; at most 96)"
            )
    if at and not revision:
        raise WeightsError(f"{ref!r}: empty revision after '@' ({form})")
    if revision and (any(c.isspace() for c in revision) or len(revision) > 256):
        raise WeightsError(f"{ref!r}: revision {revision!r} is not a branch, tag or commit name")
    return HubRef(repo_id, revision or None)


# -- the weights of a reference ----------------------------------------------------------------
@dataclass(frozen=True)
class Weights:
    """The checked ``state_dict`` of a reference, the ``config.json`` beside it (``None`` for a bare
    file), its local path, the name errors give it, and its SHA-256."""

    ref: str
    path: str
    name: str
    state: dict[str, torch.Tensor]
    config: dict[str, Any] | None
    sha256: str


def is_pushed_folder(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds an ``onebit push``: a ``config.json`` recording the files' SHA-256."""
    path = os.path.join(os.fspath(directory), CONFIG_FILE)
    if not os.path.isfile(path):
        return False
    try:
        meta = io.load_json(path)
    except (OSError, io.FileFormatError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("sha256"), dict)


def fetch_weights(ref: str | os.PathLike) -> Weights:
    """The verified weights of ``ref`` (see the module's docstring), read from safetensors only."""
    text = os.fspath(ref)
    if is_hub_ref(text):
        return _fetch_hub(text)
    if os.path.isdir(text):
        weights_path = os.path.join(text, WEIGHTS_FILE)
        config_path = os.path.join(text, CONFIG_FILE)
        config = read_config(config_path) if os.path.isfile(config_path) else None
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"{weights_path} not found: {text!r} is not a onebit run directory or pushed folder"
            )
        expected = {}
        if config is not None and "sha256" in config:
            expected["config.json"] = _recorded_sha256(config, config_path)
        return _read_weights(text, weights_path, weights_path, config, expected)
    if os.path.isfile(text):
        return _read_weights(text, text, text, None, {})
    raise FileNotFoundError(
        f"{text!r} not found: expected a run directory, a folder written by `onebit push`, "
        "a .safetensors weights file or hf://ORG/NAME"
    )


def resolve_weights(ref: str | os.PathLike) -> str:
    """The local path of ``ref``'s verified ``model.safetensors`` (downloaded first for ``hf://``)."""
    return fetch_weights(ref).path


def load_weights(ref: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """``(state_dict, config)`` of ``ref``: its verified weights and its ``config.json`` (``None`` for a bare file)."""
    weights = fetch_weights(ref)
    return weights.state, weights.config


def load_into(model: nn.Module, weights: Weights, model_name: str = "the model") -> nn.Module:
    """Copy ``weights.state`` into ``model`` (bit for bit); :class:`WeightsError` naming the file
    and the first missing key, unexpected key, or tensor of another shape or dtype."""
    expected = model.state_dict()
    state = weights.state
    problems = []
    for key, tensor in expected.items():
        if key not in state:
            problems.append(f"missing key {key!r}")
        elif tuple(state[key].shape) != tuple(tensor.shape):
            problems.append(f"{key!r} has shape {list(state[key].shape)}, the model's is {list(tensor.shape)}")
        elif state[key].dtype != tensor.dtype:
            problems.append(f"{key!r} has dtype {state[key].dtype}, the model's is {tensor.dtype}")
    problems += [f"unexpected key {key!r}" for key in state if key not in expected]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise WeightsError(f"{weights.name}: does not fit {model_name}: {problems[0]}{more}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(f"{weights.name}: does not fit {model_name}: {first}") from None
    return model


# -- reading and checking ----------------------------------------------------------------------
def _recorded_sha256(config: dict[str, Any], config_name: str) -> str:
    """The SHA-256 ``config.json`` records for ``model.safetensors``."""
    digest = config["sha256"].get(WEIGHTS_FILE)
    if digest is None:
        raise WeightsError(f"{config_name}: records no sha256 for {WEIGHTS_FILE} (an incomplete push?)")
    return digest


def _refuse_pickle(name: str, data: bytes | None = None) -> None:
    why = (
        f"{name}: a pickle file (torch.save / pickle); onebit reads weights from safetensors only, "
        "never pickle, which can run code: convert it with safetensors.torch.save_file where you trust it"
    )
    if data is None and name.lower().endswith(PICKLE_SUFFIXES):
        raise WeightsError(why)
    if data is not None and (data[:2] == b"PK" or data[:1] == b"\x80"):  # torch.save's zip, pickle's PROTO
        raise WeightsError(why)


def _header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (empty when absent or unreadable)."""
    if len(data) < 8:
        return {}
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        return {}
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub lists for a file not stored with LFS)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _check_digests(name: str, data: bytes, expected: dict[str, str]) -> str:
    """``data``'s SHA-256, after checking it against each ``{whose: digest}`` (SHA-256 or git sha1)."""
    sha256 = hashlib.sha256(data).hexdigest()
    for whose, digest in expected.items():
        actual = git_blob_sha1(data) if len(digest) == 40 else sha256
        kind = "git blob id" if len(digest) == 40 else "SHA-256"
        if actual != digest.lower():
            raise ChecksumError(
                f"{name}: {kind} {actual[:16]}... differs from the one {whose} records ({digest[:16]}...): "
                "the file was modified or damaged"
            )
    return sha256


def _read_weights(ref: str, path: str, name: str, config: dict | None, expected: dict[str, str]) -> Weights:
    """Read ``path`` once, check its digests, and parse its tensors from the same bytes."""
    from safetensors.torch import load as load_bytes

    _refuse_pickle(name)
    with open(path, "rb") as f:
        data = f.read()
    _refuse_pickle(name, data)
    sha256 = _check_digests(name, data, expected)
    if _header_metadata(data).get("format") == "onebit.packed":
        raise WeightsError(
            f"{name}: a packed engine file (onebit export / push), not a state_dict: "
            "load it with onebit.engine.load or evaluate it with `onebit eval`"
        )
    try:
        state = load_bytes(data)
    except Exception as error:  # safetensors raises its own error types on malformed bytes
        raise io.FileFormatError(
            f"{name}: not a readable safetensors file (truncated or damaged: {' '.join(str(error).split())})"
        ) from None
    return Weights(ref=ref, path=path, name=name, state=state, config=config, sha256=sha256)


# -- the Hub -----------------------------------------------------------------------------------
def import_hub(what: str):
    """The ``huggingface_hub`` module, or a :class:`HubError` naming ``what`` and the extra to install."""
    try:
        import huggingface_hub
    except ImportError:
        raise HubError(
            f"{what}: the Hugging Face Hub needs the huggingface_hub package: pip install 'onebit[hub]'"
        ) from None
    return huggingface_hub


@contextlib.contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub's warnings (retries, offline notes) silenced: errors are reported as one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, ImportError)


def _unreachable(error: Exception, hf) -> str:
    """Why the Hub could not be asked, in a few words."""
    if isinstance(error, hf.errors.OfflineModeIsEnabled) or hf.constants.HF_HUB_OFFLINE:
        return "cannot reach the Hugging Face Hub (offline mode: HF_HUB_OFFLINE is set)"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, hf.errors.HfHubHTTPError) and status is not None:
        return f"the Hugging Face Hub at {hf.constants.ENDPOINT} answered HTTP {status}"
    reason = " ".join(str(error).split()) or type(error).__name__
    return f"cannot reach the Hugging Face Hub at {hf.constants.ENDPOINT} ({reason})"


def _hub_listing(hf, ref: HubRef) -> tuple[str, dict[str, str]]:
    """``(commit, {file: SHA-256 or git blob id})`` of ``ref`` from the Hub; :class:`HubError` for a
    repository or revision the Hub does not have; other failures propagate for the caller to classify."""
    try:
        info = hf.HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    except hf.errors.GatedRepoError:
        raise HubError(
            f"{ref}: a gated repository: accept its terms on the Hub and configure a token (`hf auth login`)"
        ) from None
    except hf.errors.RevisionNotFoundError:
        raise HubError(f"{ref}: the repository has no revision {ref.revision!r}") from None
    except hf.errors.RepositoryNotFoundError:
        raise HubError(
            f"{ref}: no such model repository on the Hugging Face Hub (or it is private: configure a token "
            "with `hf auth login` or HF_TOKEN)"
        ) from None
    digests = {}
    for sibling in info.siblings or []:
        lfs = getattr(sibling, "lfs", None)
        digest = lfs.sha256 if lfs is not None else getattr(sibling, "blob_id", None)
        if digest:
            digests[sibling.rfilename] = digest
    return info.sha, digests


def _cached_digest(path: str) -> dict[str, str]:
    """The Hub's digest of a cached file: the name of the blob its snapshot entry links to."""
    blob = os.path.basename(os.path.realpath(path))
    return {"the Hub (the local cache's blob name)": blob} if re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", blob) else {}


def _fetch_hub(text: str) -> Weights:
    """Download (or find in the local cache) and verify ``config.json`` and ``model.safetensors``."""
    ref = parse_hub_ref(text)
    hf = import_hub(str(ref))
    files = (CONFIG_FILE, WEIGHTS_FILE)
    paths: dict[str, str] = {}
    expected: dict[str, dict[str, str]] = {name: {} for name in files}
    with quiet_hub():
        try:
            commit, listing = _hub_listing(hf, ref)
            cause = None
        except HubError:
            raise
        except _PROGRAMMING_ERRORS:
            raise
        except Exception as error:  # network, offline mode, HTTP errors: try the local cache
            cause = _unreachable(error, hf)
        if cause is None:
            for name in files:
                if name not in listing:
                    raise HubError(f"{ref}: the repository has no {name} (not written by `onebit push`)")
                expected[name]["the Hub"] = listing[name]
                try:
                    paths[name] = hf.hf_hub_download(ref.repo_id, name, revision=commit, library_name="onebit")
                except _PROGRAMMING_ERRORS:
                    raise
                except Exception as error:
                    raise HubError(f"{ref}: downloading {name} failed: {_unreachable(error, hf)}") from None
        else:
            for name in files:
                try:
                    paths[name] = hf.hf_hub_download(ref.repo_id, name, revision=ref.revision, local_files_only=True)
                except _PROGRAMMING_ERRORS:
                    raise
                except Exception:
                    raise HubError(
                        f"{ref}: {cause}, and its {name} is not in the local cache ({hf.constants.HF_HUB_CACHE})"
                    ) from None
                expected[name].update(_cached_digest(paths[name]))
    config_name = f"{ref}/{CONFIG_FILE}"
    with open(paths[CONFIG_FILE], "rb") as f:
        _check_digests(config_name, f.read(), expected[CONFIG_FILE])
    config = read_config(paths[CONFIG_FILE], config_name)
    if "sha256" not in config:
        raise WeightsError(f"{config_name}: records no SHA-256 of the files (not written by `onebit push`)")
    expected[WEIGHTS_FILE][CONFIG_FILE] = _recorded_sha256(config, config_name)
    return _read_weights(str(ref), paths[WEIGHTS_FILE], f"{ref}/{WEIGHTS_FILE}", config, expected[WEIGHTS_FILE])
