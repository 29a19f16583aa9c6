"""How a native kernel becomes a torch op: its ``torch.library`` registration, and the eager bypass.

Each op is registered once, as ``onebit::<name>`` with its schema (its arguments and result, as
``torch.library`` writes them) and a fake implementation that gives shapes under tracing. In eager
mode a public function calls its implementation directly when :func:`direct` allows it: the
dispatcher round trip of a Python custom op costs ~15 us, a tenth of a 256-channel layer.
"""

from __future__ import annotations

import torch

__all__ = ["custom_op", "direct"]


def custom_op(name: str, schema: str, impl, fake):
    """Register ``impl`` as the custom op ``onebit::name`` of ``schema``, with ``fake`` for tracing."""
    op = torch.library.custom_op(f"onebit::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_jit_tracing = torch._C._get_tracing_state
_Tensor = torch.Tensor


def direct(*tensors) -> bool:
    """True when the native kernels can run right here: plain tensors, nothing tracing. Otherwise
    (``torch.compile``, ``torch.export``, ``make_fx``, ``torch.jit.trace``, tensor subclasses) a call
    goes through ``torch.ops.onebit.*``."""
    if _is_compiling() or _dispatch_modes() or _function_modes() or _jit_tracing():
        return False
    for t in tensors:  # tensor subclasses (fake, functional, parameters...) take the dispatcher
        if t is not None and type(t) is not _Tensor and isinstance(t, _Tensor):
            return False
    return True  # non-tensors get their ValueError from the argument checks
