"""onebit.data: image-classification datasets from offline sources.

``load(source)`` takes a registered name (``"digits"``, the default) or a
directory -- IDX files in the MNIST/Fashion-MNIST layout, CIFAR-10/100 batches
(python or binary version) or an image-folder tree -- and returns a
:class:`DataBundle` of normalized float tensors. :class:`Augment` is the light
batch augmentation (random translation, flips) the trainer applies.
"""

from onebit.data.augment import Augment
from onebit.data.bundle import DataBundle, load, names, register_dataset, register_directory_reader
from onebit.data import cifar, digits, idx, imagefolder  # noqa: F401  (register their readers)

__all__ = ["Augment", "DataBundle", "load", "names", "register_dataset", "register_directory_reader"]
