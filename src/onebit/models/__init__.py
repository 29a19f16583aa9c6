"""onebit.models: the model zoo and the constructor it is built with.

``create(name, num_classes=..., in_channels=..., **kwargs)`` builds a registered
model, ``names(pattern)`` lists them; ``create(name, weights=REF)`` loads trained weights into it
and ``from_pretrained(REF)`` builds the model a run, a pushed folder or ``hf://ORG/NAME`` names
(:mod:`onebit.models.pretrained`). Zoo models built by
:class:`ModelConstructor` accept any of its fields as keyword arguments, so
``create("birealnet18", conv_layer="twist")`` swaps every block convolution.
"""

from onebit.models import bireal, bitnet, densenet, lenet, resnet  # noqa: F401  (register their models)
from onebit.models.constructor import (
    BasicBlock,
    BiRealBlock,
    DenseLayer,
    ModelConstructor,
    Net,
    Transition,
)
from onebit.models.pretrained import create, from_pretrained
from onebit.models.registry import is_file_model, names, register_model
from onebit.models.weights import load_weights, resolve_weights

__all__ = [
    "create",
    "from_pretrained",
    "load_weights",
    "resolve_weights",
    "is_file_model",
    "names",
    "register_model",
    "ModelConstructor",
    "Net",
    "BasicBlock",
    "BiRealBlock",
    "DenseLayer",
    "Transition",
]
