"""Ctrl-C and SIGTERM during training, taken at a step boundary.

While :func:`deferred_interrupts` is active, the first SIGINT or SIGTERM only sets a flag; the loop looks
at it after each complete step, saves a checkpoint there and stops. A signal can therefore never land in
the middle of an optimizer update, and ``--resume`` continues bit for bit. A second Ctrl-C stops at once
(the last checkpoint is kept). Outside the main thread (a web app's worker) signals cannot be caught and
nothing is installed; such a caller passes ``should_stop`` to :func:`scenetok.training.train` instead, which
stops the run the same way (:meth:`StopRequest.request`).
"""

from __future__ import annotations

import contextlib
import signal
import threading


class StopRequest:
    """Which signal asked the run to stop (None: none yet)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        """Stop at the next step boundary for ``reason`` (a cancel button, not a signal)."""
        self.signal, self.reason = -1, reason

    @property
    def name(self) -> str:
        if self.reason:
            return self.reason
        return {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}.get(self.signal, str(self.signal))

    def __bool__(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def deferred_interrupts():
    """Yield a :class:`StopRequest` that SIGINT / SIGTERM set instead of interrupting the step."""
    req = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield req
        return
    previous = {}

    def handler(signum, _frame):
        if req.signal is not None and signum == signal.SIGINT:  # pressed twice: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        req.signal = signum

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield req
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
