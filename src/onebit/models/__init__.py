"""onebit.models: the model zoo (``create(name, num_classes, in_channels)``, ``names()``)."""

from onebit.models import lenet  # noqa: F401  (registers its models)
from onebit.models.registry import create, names, register_model

__all__ = ["create", "names", "register_model"]
