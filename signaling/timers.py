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
    ``resolution`` seconds.  A slot whose deadlines are all cancelled
    cancels its timed call: a server with no connections has none pending.
    """

    _log = Logger()

    def __init__(self, clock, resolution: float = 0.002):
        self._clock = clock
        self._per_second = 1.0 / resolution
        self._slots: Dict[int, _Slot] = {}

    def call_later(self, delay, func, *args, **kwargs):
        number = ceil((self._clock.seconds() + delay) * self._per_second)  # the first slot ending at or after it
        slot = self._slots.get(number)
        if slot is None:
            slot = self._slots[number] = _Slot(self, number)
            slot.call = self._clock.callLater(max(0.0, number / self._per_second - self._clock.seconds()),
                                              self._run, number)
        deadline = _Deadline(slot, func, args, kwargs)
        slot.deadlines.append(deadline)
        slot.live += 1
        return deadline

    def _run(self, number):
        slot = self._slots.pop(number)
        for deadline in slot.deadlines:
            if deadline.func is not None:
                func, args, kwargs = deadline.func, deadline.args, deadline.kwargs
                deadline.slot = deadline.func = deadline.args = deadline.kwargs = None
                try:
                    func(*args, **kwargs)
                except Exception:  # (one connection's fault must not cost the others their deadlines)
                    self._log.failure("a timed call failed: {func!r}", func=func)

    def _emptied(self, slot):
        if self._slots.get(slot.number) is slot:
            del self._slots[slot.number]
            slot.call.cancel()

    def pending(self) -> int:
        """Deadlines set and neither run nor cancelled."""
        return sum(slot.live for slot in self._slots.values())


class _Slot:
    __slots__ = ("timer", "number", "call", "deadlines", "live")

    def __init__(self, timer, number):
        self.timer, self.number, self.call = timer, number, None
        self.deadlines: List[_Deadline] = []  # in the order set
        self.live = 0  # neither run nor cancelled


class _Deadline:
    __slots__ = ("slot", "func", "args", "kwargs")

    def __init__(self, slot, func, args, kwargs):
        self.slot, self.func, self.args, self.kwargs = slot, func, args, kwargs

    def cancel(self):
        if self.func is None:
            return  # run or cancelled already
        slot = self.slot
        # (nothing kept: a connection may hold a deadline long after it ran or was cancelled)
        self.slot = self.func = self.args = self.kwargs = None
        slot.live -= 1
        if slot.live == 0:
            slot.timer._emptied(slot)
