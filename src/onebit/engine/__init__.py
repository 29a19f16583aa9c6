"""The bit-packed CPU inference engine.

::

    packed = onebit.engine.pack(model.eval(), example_input)   # -> PackedModel (an nn.Module)
    y = packed(x)                                              # == model(x)
    packed.save("model.onebit.safetensors")
    packed = onebit.engine.load("model.onebit.safetensors")

Bit convention (one for the whole engine, see ``csrc/kernels/pack.h``): bit set = -1
(``x < 0``), sign(0) = +1, channels packed along 64-bit words in a channels-last layout,
unused bits 0. Modules: :mod:`~onebit.engine.geometry` (shapes and the one argument check),
:mod:`~onebit.engine.lowering` (model -> graph),
:mod:`~onebit.engine.graph` (the op whitelist), :mod:`~onebit.engine.packed`
(``PackedModel``), :mod:`~onebit.engine.fileformat` (files), :mod:`~onebit.engine.ops`
(kernel dispatch), :mod:`~onebit.engine.reference` (portable reference kernels),
``kernels`` (the native kernels as torch custom ops).
"""

from onebit.engine.fileformat import FormatError
from onebit.engine.graph import GraphError
from onebit.engine.lowering import UnsupportedModelError
from onebit.engine.ops import use_backend
from onebit.engine.packed import FallbackWarning, InputError, PackedModel, load, pack

__all__ = [
    "pack",
    "load",
    "PackedModel",
    "FormatError",
    "GraphError",
    "InputError",
    "FallbackWarning",
    "UnsupportedModelError",
    "use_backend",
]
