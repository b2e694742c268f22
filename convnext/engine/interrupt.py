"""Ctrl-C that is never lost.

Python raises KeyboardInterrupt wherever the main thread happens to be when SIGINT arrives; when that is inside a
finaliser or a weakref callback (matplotlib's figures, tqdm, tempfiles), the exception is printed as "ignored" and
the run goes on. `catching()` installs a handler that also records the signal, and training loops call `check()`
at each optimizer step, so a swallowed Ctrl-C still stops the run at the next step boundary.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_received: list[bool] = [False]  # process-wide, as signals are


def _handler(signum: int, frame: object) -> None:
    _received[0] = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def catching() -> Iterator[None]:
    """Within: SIGINT raises KeyboardInterrupt and is remembered for `check()`; the previous handler is restored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    _received[0] = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _received[0] = False


def check() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived (even one whose exception something swallowed)."""
    if _received[0]:
        raise KeyboardInterrupt
