"""Ctrl-C (SIGINT) between the steps of a loop, never inside one.

:func:`interruptible` wraps a loop's iterable (a training loop's DataLoader): while the loop body runs,
a first SIGINT is only noted and takes effect when the body asks for the next item; while the next
item is being fetched (possibly blocked on slow data), it takes effect at once. Either way the
interrupt lands between two complete steps, and ``on_interrupt()`` — which may save a checkpoint —
builds the exception that is raised instead. A second SIGINT during a body interrupts at once.

It is active only in the main thread and when SIGINT has Python's default handler; otherwise the
iterable is passed through unchanged.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def interruptible(items: Iterable[T], on_interrupt: Callable[[], BaseException]) -> Iterator[T]:
    """Yield ``items``; on SIGINT between two items raise ``on_interrupt()`` (see the module doc)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield from items
        return
    state = {"defer": False, "pending": False}

    def handler(signum: int, frame: Any) -> None:
        if state["defer"] and not state["pending"]:
            state["pending"] = True
            return
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    it = iter(items)
    try:
        while True:
            try:
                state["defer"] = False
                if state["pending"]:
                    raise KeyboardInterrupt
                item = next(it)
            except StopIteration:
                return
            except KeyboardInterrupt:
                raise on_interrupt() from None
            state["defer"] = True
            yield item
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
