"""onebit.data: image-classification datasets from offline sources.

``load(source)`` takes a registered name (``"digits"``, the default) or a
directory, and returns a :class:`DataBundle` of normalized float tensors.
"""

from onebit.data.bundle import DataBundle, load, names, register_dataset
from onebit.data import digits  # noqa: F401  (registers "digits")

__all__ = ["DataBundle", "load", "names", "register_dataset"]
