r"""Handles: every change onebit makes to a user's model comes with an exact undo.

A :class:`Handle` is the undo record of one change: ``register()`` applies it, ``remove()``
puts back every parameter, buffer, attribute, module and hook it touched, bit for bit.
Handles that touch the same modules stack (last registered, first removed);
:class:`CompositeHandle` holds several as one and :func:`register_all` registers a list of
them or none. A :class:`Canonizer` is a transformation whose ``apply(model)`` returns a
registered handle; :func:`canonize` applies several in order.

:class:`Patch` is the recorder the handles are built from: each in-place change it makes
(a tensor's values, an attribute, a submodule, a forward hook) pushes its own undo.

:func:`preserve` is the same promise for a tool that changes a model while it looks at it
(:func:`onebit.doctor.doctor`): a context manager that snapshots the model and puts it back
bit for bit on exit, exception or not.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "Handle",
    "CompositeHandle",
    "HandleOrderError",
    "Patch",
    "register_all",
    "Canonizer",
    "canonize",
    "ModelSnapshot",
    "preserve",
]


class HandleOrderError(RuntimeError):
    """``remove()`` of a handle while a later one that touches the same modules is registered.

    Changes stack: removing the earlier one first would restore the state it saw under the
    later change, which the later one's ``remove()`` then overwrites with a merged state.
    Nothing is changed when this is raised: remove the later handle first."""


#: the leaf handles registered now (weakly: a dropped handle can no longer be removed anyway)
_REGISTERED: weakref.WeakSet[Handle] = weakref.WeakSet()
_SERIALS = itertools.count(1)


class Handle:
    """Undo record of one change to a model: ``register()`` applies it, ``remove()`` undoes it.

    ``remove()`` restores every parameter, buffer, attribute, module and hook the change
    touched, bit for bit, and is idempotent. A handle is a context manager that removes
    itself on exit.

    Handles that touch the same modules stack: they are removed last registered first.
    ``remove()`` of a handle while a later one touching one of its modules is still
    registered raises :class:`HandleOrderError` and changes nothing.
    """

    def __init__(self) -> None:
        self._registered = False
        self._serial = 0

    @property
    def registered(self) -> bool:
        return self._registered

    def register(self) -> Handle:
        if not self._registered:
            self._apply()
            self._registered = True
            self._serial = next(_SERIALS)
            _REGISTERED.add(self)
        return self

    def remove(self) -> None:
        if self._registered:
            _check_removable(list(self._leaves()))
            self._undo()
            self._registered = False
            _REGISTERED.discard(self)

    def _leaves(self) -> Iterator[Handle]:
        """The registered handles that hold changes (a composite's, or this one)."""
        if self._registered:
            yield self

    def _touched(self) -> set[int]:
        """ids of the objects this handle changed while registered."""
        patch = getattr(self, "_patch", None)
        return set(patch.touched) if patch is not None else set()

    def _apply(self) -> None:
        raise NotImplementedError

    def _undo(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _check_removable(leaves: list[Handle]) -> None:
    """Raise :class:`HandleOrderError` when a handle outside ``leaves``, registered after one of
    them, touches the same objects (removing ``leaves`` first would leave the model changed)."""
    own = {id(h) for h in leaves}
    for h in leaves:
        touched = h._touched()
        for later in list(_REGISTERED):
            if id(later) not in own and later._registered and later._serial > h._serial and later._touched() & touched:
                raise HandleOrderError(
                    f"cannot remove {h!r}: {later!r}, registered after it, changed the same modules "
                    "and is still registered; remove it first (nothing was changed)"
                )


class CompositeHandle(Handle):
    """Several handles as one: registered in order, removed in reverse order.

    Removing in reverse order is what makes stacked changes exact: a layer touched by
    two merges first gets back the state the second merge saw, then the original.
    """

    def __init__(self, handles: Iterable[Handle] = ()) -> None:
        super().__init__()
        self.handles: list[Handle] = list(handles)
        self._registered = any(h.registered for h in self.handles)

    def append(self, handle: Handle) -> None:
        self.handles.append(handle)
        self._registered = self._registered or handle.registered

    def register(self) -> Handle:
        if not self._registered:
            self._apply()
            self._registered = True
        return self

    def remove(self) -> None:
        if self._registered:
            _check_removable(list(self._leaves()))
            self._undo()
            self._registered = False

    def _leaves(self) -> Iterator[Handle]:
        for h in self.handles:
            yield from h._leaves()

    def _apply(self) -> None:
        for h in self.handles:
            h.register()

    def _undo(self) -> None:
        for h in reversed(self.handles):
            h.remove()

    def __len__(self) -> int:
        return len(self.handles)

    def __iter__(self) -> Iterator[Handle]:
        return iter(self.handles)

    def __repr__(self) -> str:
        return f"CompositeHandle({len(self.handles)} handles, registered={self.registered})"


def register_all(handles: Iterable[Handle]) -> CompositeHandle:
    """Register every handle in order and return them as one :class:`CompositeHandle`, or none.

    When a handle raises (while registering, or while the iterable produces it), the ones
    registered so far are removed, last first, and the error propagates: the model is as
    it was, bit for bit. A handle that is registered already (what a :class:`Canonizer`
    returns) and an empty composite (a canonizer that found nothing to change) are taken
    as they are.
    """
    composite = CompositeHandle()
    try:
        for handle in handles:
            empty = isinstance(handle, CompositeHandle) and not handle.handles
            if not handle.registered and not empty:
                handle.register()
            composite.append(handle)
    except BaseException:
        composite.remove()
        raise
    return composite


class Patch:
    """Records in-place changes so they can be undone exactly, last first."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self.touched: set[int] = set()  # ids of the modules and tensors changed (alive while undo holds them)

    @torch.no_grad()
    def set_tensor(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        tensor = getattr(module, name)
        self.touched |= {id(module), id(tensor)}
        saved = tensor.detach().clone()
        tensor.copy_(value.to(dtype=tensor.dtype, device=tensor.device))

        def undo() -> None:
            with torch.no_grad():
                tensor.copy_(saved)

        self._undo.append(undo)

    def add_bias(self, module: nn.Module, value: torch.Tensor) -> None:
        weight = module.weight
        bias = nn.Parameter(value.to(dtype=weight.dtype, device=weight.device), requires_grad=weight.requires_grad)
        module.bias = bias
        self.touched.add(id(module))

        def undo() -> None:
            module.bias = None

        self._undo.append(undo)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        missing = object()
        old = obj.__dict__.get(name, missing) if not isinstance(obj, nn.Module) else getattr(obj, name, missing)
        setattr(obj, name, value)
        self.touched.add(id(obj))

        def undo() -> None:
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)

        self._undo.append(undo)

    def replace_module(self, root: nn.Module, qualified_name: str, new: nn.Module) -> None:
        parent_name, _, child = qualified_name.rpartition(".")
        parent = root.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, new)
        self.touched |= {id(parent), id(old)}
        self._undo.append(lambda: setattr(parent, child, old))

    def forward_hook(self, module: nn.Module, hook: Callable) -> None:
        handle = module.register_forward_hook(hook)
        self.touched.add(id(module))
        self._undo.append(handle.remove)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.touched = set()


class Canonizer:
    """A reversible model transformation: ``apply(model)`` changes the model in place and returns a :class:`Handle`."""

    def apply(self, model: nn.Module) -> Handle:
        raise NotImplementedError

    def __call__(self, model: nn.Module) -> Handle:
        return self.apply(model)


def canonize(model: nn.Module, canonizers: Sequence[Canonizer]) -> CompositeHandle:
    """Apply several canonizers in order; the returned handle removes them in reverse order.

    Each canonizer sees the model as the ones before it left it. When one raises, the ones
    applied before it are removed and the model is as it was."""
    return register_all(c.apply(model) for c in canonizers)


# ---------------------------------------------------------------------------
# preserve: a snapshot of a whole model, put back on exit

#: a module's own attributes that hold its parameters, buffers and submodules (restored entry by entry)
_SLOT_DICTS = ("_parameters", "_buffers", "_modules")


class ModelSnapshot:
    """What :func:`preserve` puts back: per module its parameter, buffer and submodule entries
    and its other attributes (``training`` among them, each by identity), and per parameter and
    buffer its values, ``requires_grad`` and ``.grad``.

    ``parameters`` maps each qualified name of ``model.named_parameters()`` to ``(parameter,
    saved values)``; ``slots`` lists every ``(module, name, parameter or None)`` entry of the
    modules' parameter dictionaries, as they were.
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(model.modules())
        self.entries = [{key: dict(getattr(m, key)) for key in _SLOT_DICTS} for m in self.modules]
        self.attributes = [{k: v for k, v in m.__dict__.items() if k not in _SLOT_DICTS} for m in self.modules]
        self.parameters = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
        self.buffers = {name: (b, b.detach().clone()) for name, b in model.named_buffers()}
        self.grads = [(p, p.grad, _clone(p.grad), p.requires_grad) for p, _ in self.parameters.values()]
        self.slots = [(m, name, p) for m in self.modules for name, p in m._parameters.items()]

    def restore(self) -> None:
        """Put the model back as it was when the snapshot was taken, bit for bit."""
        for module, entries, attributes in zip(self.modules, self.entries, self.attributes):
            for key, saved in entries.items():
                _restore_entries(getattr(module, key), saved)
            _restore_entries(module.__dict__, attributes, keep=_SLOT_DICTS)
        with torch.no_grad():
            for tensor, value in itertools.chain(self.parameters.values(), self.buffers.values()):
                _copy_back(tensor, value)
            for p, grad, value, requires_grad in self.grads:
                p.requires_grad_(requires_grad)
                p.grad = grad
                if grad is not None:
                    _copy_back(grad, value)


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach().clone() if t is not None else None


def _copy_back(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """``value`` into ``tensor`` itself; a tensor whose ``.data`` was swapped for another shape,
    dtype or device gets ``value`` as its data again."""
    if tensor.shape == value.shape and tensor.dtype == value.dtype and tensor.device == value.device:
        tensor.copy_(value)
    else:
        tensor.data = value


def _restore_entries(now: dict, saved: dict, keep: Sequence[str] = ()) -> None:
    """Give ``now`` exactly the entries of ``saved`` (the same objects), in place; keys in ``keep`` stay."""
    for key in [k for k in now if k not in saved and k not in keep]:
        del now[key]
    for key, value in saved.items():
        if key not in now or now[key] is not value:
            now[key] = value


@contextlib.contextmanager
def preserve(model: nn.Module) -> Iterator[ModelSnapshot]:
    """Within the ``with`` block the model may change; on exit it is put back bit for bit.

    Restored, exception or not: every parameter and buffer (its values, copied back into
    the same tensor, ``requires_grad`` and ``.grad``), every module's parameter, buffer and
    submodule entries (a parameter replaced or added in the block is put back or dropped),
    and every module's other attributes (``training``, ``eps``, flags a tool set) by
    identity. Hooks registered in the block stay registered: remove them before the block
    ends. An attribute object changed in place (a list appended to, a plain tensor
    attribute written to) is not copied. Yields the :class:`ModelSnapshot`, whose
    ``parameters`` hold the values as they were on entry.
    """
    snapshot = ModelSnapshot(model)
    try:
        yield snapshot
    finally:
        snapshot.restore()
