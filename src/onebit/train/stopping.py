"""Stop requests: SIGINT/SIGTERM end a run's current step, which saves and raises :class:`Interrupted`."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

__all__ = ["Interrupted", "stop_signals"]


class Interrupted(KeyboardInterrupt):
    """Raised by :meth:`Trainer.fit` after a stop request (signal) once the checkpoint is saved.

    A ``KeyboardInterrupt`` so that code catching ``Exception`` does not swallow a stop request
    and callers that only handle Ctrl-C still stop cleanly."""

    def __init__(self, signum: int, epoch: int, step: int, directory: str | None):
        self.signum, self.epoch, self.step, self.directory = signum, epoch, step, directory
        where = f"epoch {epoch} step {step}"
        saved = f"; checkpoint saved, continue with `onebit train --resume {directory}`" if directory else ""
        super().__init__(f"stopped by {signal.Signals(signum).name} at {where}{saved}")


@contextlib.contextmanager
def stop_signals(on_signal: Callable[[int], None]) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM call ``on_signal(signum)`` instead of their handlers
    (restored after it). Off the main thread, where signals cannot be caught, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, lambda signum, frame: on_signal(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
