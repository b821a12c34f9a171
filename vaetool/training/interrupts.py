"""Ctrl-C between training steps, never inside one: an interrupt that lands mid-step waits until the step is counted."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StepGuard:
    """While entered, SIGINT inside `with guard.step():` is held and raised once that block has finished.

    A KeyboardInterrupt between `optimizer.step()` and `step += 1` would save weights one update ahead
    of the counter, and the resumed run would apply that update twice. In a thread, or under a caller
    that installed its own SIGINT handler, signals are left alone.
    """

    def __init__(self) -> None:
        self.in_step = False
        self.held = False
        self._previous: object = None
        self._installed = False

    def __enter__(self) -> StepGuard:
        self.in_step, self.held = False, False
        self._installed = (threading.current_thread() is threading.main_thread()
                           and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        if self._installed:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.in_step:
            self.held = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One step, indivisible by Ctrl-C: a held interrupt is raised once the counters are updated."""
        self.in_step = True
        try:
            yield
        finally:
            self.in_step = False
        if self.held:
            self.held = False
            raise KeyboardInterrupt

