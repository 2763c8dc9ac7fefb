"""Ctrl-C during training: a request honoured at safe points, not an exception raised at any bytecode.

Python's default SIGINT handler raises :class:`KeyboardInterrupt` wherever the main thread happens to be.
Inside code that shares state with another thread that can tear that state: a ``threading.Condition.notify``
cut between releasing a waiter and removing it from the waiter list (TensorBoard's event writer queue, fed
from the epoch log) makes the next notify wake nobody, so closing the writer then waits for the writer
thread's flush timer (up to two minutes) before the process can exit; an interrupt between a checkpoint's
rename and the bookkeeping after it names the wrong checkpoint in the resume hint.

:class:`DeferredInterrupt` turns the first SIGINT into a flag. The trainer calls :meth:`DeferredInterrupt.check`
at safe points (before each training step, and after each epoch's checkpoint, metrics row and log line are
written), where it raises :class:`KeyboardInterrupt`. A second SIGINT raises at once (the old behaviour), so
a stuck run can still be stopped. The handler is only installed over Python's default one, in the main thread:
an ignored SIGINT (``nohup``, a background job) or a caller's own handler is left alone.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class DeferredInterrupt:
    """Within ``with DeferredInterrupt():`` a first SIGINT only sets :attr:`requested`; a second raises.

    Args:
        enabled: False keeps Python's handler (every SIGINT raises at once), e.g. for a multi-process run,
            whose ranks would stop at different steps and leave the others waiting in a collective.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> DeferredInterrupt:
        self.requested = False  # a request belongs to one run: a finished run's late Ctrl-C is not carried over
        if (self.enabled and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # the second Ctrl-C: stop now, wherever the run is
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        """A safe point: raise :class:`KeyboardInterrupt` if SIGINT arrived since the run started."""
        if self.requested:
            raise KeyboardInterrupt
