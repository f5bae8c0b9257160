"""
Timers for Autobahn's per-connection deadlines (keepalive pings, their
timeouts, the handshake and close timeouts), grouped in short slots.

Twisted keeps every ``callLater`` in one heap, ordered by ``DelayedCall``'s
``__lt__`` in Python: with 10,000 connections, each pinged and timed out
every interval, the heap holds some 20,000 calls, every push and pop
compares about 15 of them, and since nearly every ping timeout is
cancelled (its pong came), the reactor rebuilds the whole heap whenever
half of it is cancelled: a turn of 10 to 30 ms every few seconds.  Here
each slot of ``resolution`` seconds that has deadlines in it is one
``callLater``, a cancelled deadline is only marked, and a slot runs its
deadlines in the order they were set: never early, at most
``resolution`` late.
"""

from math import ceil
from typing import Dict, List

from twisted.logger import Logger


class SlotTimer:
    """
    Autobahn's timer interface (``call_later(delay, func, *args, **kwargs)``
    answering something with ``cancel()``) on ``clock``, in slots of
    ``resolution`` seconds.
    """

    _log = Logger()

    def __init__(self, clock, resolution: float = 0.002):
        self._clock = clock
        self._per_second = 1.0 / resolution
        self._slots: Dict[int, List[_Deadline]] = {}  # slot number -> its deadlines, in the order set

    def call_later(self, delay, func, *args, **kwargs):
        slot = ceil((self._clock.seconds() + delay) * self._per_second)  # the first slot ending at or after it
        deadline = _Deadline(func, args, kwargs)
        due = self._slots.get(slot)
        if due is None:
            self._slots[slot] = [deadline]
            self._clock.callLater(max(0.0, slot / self._per_second - self._clock.seconds()), self._run, slot)
        else:
            due.append(deadline)
        return deadline

    def _run(self, slot):
        for deadline in self._slots.pop(slot):
            if deadline.func is not None:
                func, args, kwargs = deadline.func, deadline.args, deadline.kwargs
                deadline.func = deadline.args = deadline.kwargs = None
                try:
                    func(*args, **kwargs)
                except Exception:  # (one connection's fault must not cost the others their deadlines)
                    self._log.failure("a timed call failed: {func!r}", func=func)

    def pending(self) -> int:
        """Deadlines set and neither run nor cancelled."""
        return sum(1 for due in self._slots.values() for d in due if d.func is not None)


class _Deadline:
    __slots__ = ("func", "args", "kwargs")

    def __init__(self, func, args, kwargs):
        self.func, self.args, self.kwargs = func, args, kwargs

    def cancel(self):
        self.func = self.args = self.kwargs = None
