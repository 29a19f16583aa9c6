"""onebit.data: image-classification datasets from offline sources.

``load(source)`` takes a registered name (``"digits"``, the default) or a
directory -- IDX files in the MNIST/Fashion-MNIST layout, CIFAR-10/100 batches
(python or binary version) or an image-folder tree in ImageNet's layout -- and
returns a :class:`DataBundle`: train and test splits that give ``(x, y)``, the image
as a model sees it (normalized float32) and its class. In-memory sets are kept as
uint8; image folders are decoded an image at a time. :class:`Augment` names a run's
augmentation; :mod:`onebit.data.loader` serves the splits to the trainer.
"""

from onebit.data import cifar, digits, idx, imagefolder  # noqa: F401  (register their readers)
from onebit.data.augment import Augment
from onebit.data.bundle import DataBundle, load, names, register_dataset, register_directory_reader

__all__ = ["Augment", "DataBundle", "load", "names", "register_dataset", "register_directory_reader"]
