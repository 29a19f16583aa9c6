"""From a config's names to objects: the one place where a training run's names are resolved.

- ``config.model`` -> :func:`onebit.models.create` (a zoo name or ``path/to/file.py:NAME``), with
  ``config.model_kwargs``, probed with one example of the data;
- ``config.data`` -> :func:`onebit.data.load` (a dataset name or directory);
- ``config.optimizer`` / ``config.schedule`` -> torch optimizers (Adam, SGD, Bop; weight decay on float
  parameters only) and schedulers (one-cycle, cosine, linear decay, constant).

:meth:`Trainer.from_config <onebit.train.Trainer.from_config>` builds a trainer through
:func:`build`; ``onebit train``, ``onebit demo``, ``onebit plot flips`` and resume use it.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from onebit import data as datasets
from onebit import models
from onebit.optim import Bop
from onebit.quant import Quantizer
from onebit.train.config import TrainConfig

__all__ = ["build", "load_data", "create_model", "make_optimizers", "make_scheduler", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (model initialization draws from torch's)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build(
    config: TrainConfig, *, model: nn.Module | None = None, data: datasets.DataBundle | None = None
) -> tuple[nn.Module, datasets.DataBundle]:
    """The model and data ``config`` names (those not given): the global generators seeded
    from ``config.seed``, then the data loaded, then the model created for the data's classes
    and channels (so that a seed always gives the same initial weights)."""
    config.validate()
    seed_everything(config.seed)
    if data is None:
        data = load_data(config)
    if model is None:
        model = create_model(config.model, data.num_classes, data.in_channels, config.model_kwargs)
        probe(model, config.model, config.model_kwargs, data.test[0][0][None])
    if config.weights:
        load_start_weights(model, config.weights)
    return model, data


def load_data(config: TrainConfig) -> datasets.DataBundle:
    """The dataset ``config.data`` names, at ``config.image_size`` and normalized with
    ``config.mean`` / ``config.std`` when given."""
    return datasets.load(config.data, image_size=config.image_size, mean=config.mean, std=config.std)


def load_start_weights(model: nn.Module, ref: str) -> None:
    """Put the weights ``ref`` names (run directory, weights file, pushed folder, ``hf://``) into
    ``model``; a file that does not fit the model raises ``ValueError`` naming it and the first mismatch."""
    from onebit.models.weights import load_weights

    state, _ = load_weights(ref)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"--weights {ref}: does not fit model ({_first_line(error)})") from None


def create_model(name: str, num_classes: int, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    """``models.create``; a model its arguments cannot build raises ``ValueError`` naming them."""
    try:
        with warnings.catch_warnings(record=True) as caught:  # torch's warnings about empty tensors:
            warnings.simplefilter("always")  # raised as one error below instead
            model = models.create(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
        if not any(p.numel() == 0 for p in model.parameters()):
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return model
    except (ValueError, TypeError, RuntimeError, IndexError, ZeroDivisionError, OverflowError) as error:
        raise ValueError(f"model {name!r} cannot be built with {_args(kwargs)}: {_first_line(error)}") from None


def probe(model: nn.Module, name: str, kwargs: dict[str, Any], example: torch.Tensor) -> None:
    """One example through the model (eval mode, no gradient): a model its arguments made
    empty or of the wrong shape for the data raises ``ValueError`` naming them, before training."""
    args = _args(kwargs)
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise ValueError(f"model {name!r} built with {args} has empty parameters ({empty[0]}, ...)")
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    except (RuntimeError, ValueError, IndexError, TypeError) as error:
        raise ValueError(
            f"model {name!r} built with {args} cannot take the data's input of shape {list(example.shape)}: "
            f"{_first_line(error)}"
        ) from None
    finally:
        model.train(was_training)


def make_optimizers(
    config: TrainConfig, model: nn.Module, binary_params: list[nn.Parameter]
) -> list[torch.optim.Optimizer]:
    """The optimizers ``config.optimizer`` names, the float one (Adam or SGD) first; ``"bop"`` is
    Adam for the float parameters and Bop for ``binary_params``."""
    c = config
    if c.optimizer == "bop":
        binary = {id(p) for p in binary_params}
        if not binary:
            raise ValueError(f"--optimizer bop needs binary weights, and model {c.model!r} has none")
        rest: Any = [p for p in model.parameters() if id(p) not in binary]
        steps = {id(p) for p in quantizer_parameters(model)}
        if c.weight_decay and steps:
            rest = [
                {"params": [p for p in rest if id(p) not in steps]},
                {"params": [p for p in rest if id(p) in steps], "weight_decay": 0.0},
            ]
        return [
            torch.optim.Adam(rest, lr=c.lr, weight_decay=c.weight_decay),
            Bop(binary_params, threshold=c.bop_threshold, gamma=c.bop_gamma),
        ]
    # weight decay pulls latent binary weights towards 0, where their sign flips for nothing, and a
    # quantizer's learned step (LSQ) towards a coarser grid: it applies to the other float parameters
    # only (as in ReActNet's and LSQ's recipes)
    params: Any = model.parameters()
    undecayed = {id(p) for p in binary_params} | {id(p) for p in quantizer_parameters(model)}
    if c.weight_decay and undecayed:  # (without decay: one group, as runs written before had)
        params = [
            {"params": [p for p in model.parameters() if id(p) not in undecayed]},
            {"params": [p for p in model.parameters() if id(p) in undecayed], "weight_decay": 0.0},
        ]
    if c.optimizer == "adam":
        return [torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)]
    return [torch.optim.SGD(params, lr=c.lr, momentum=0.9, nesterov=True, weight_decay=c.weight_decay)]


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters quantizers own (an ``int8`` quantizer's step), which weight decay leaves alone."""
    return [p for m in model.modules() if isinstance(m, Quantizer) for p in m.parameters(recurse=False)]


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The learning-rate schedule ``config.schedule`` names over ``total_steps`` steps (None: constant)."""
    if config.schedule == "one-cycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total_steps)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.schedule == "linear":  # lr * (1 - step / total): ReActNet's decay
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total_steps))
    return None


def _args(kwargs: dict[str, Any]) -> str:
    return " ".join(f"--model-arg {k}={v!r}" for k, v in kwargs.items()) or "no --model-arg"


def _first_line(error: Exception) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__
