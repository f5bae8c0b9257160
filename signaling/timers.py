"""
Timers for Autobahn's per-connection deadlines (keepalive pings, their
timeouts, the handshake and close timeouts), grouped in short slots.

Twisted keeps every ``callLater`` in one heap, ordered by ``DelayedCall``'s
``__lt__`` in Python: with 10,000 connections, each pinged and timed out
every interval, the heap holds some 15,000 to 20,000 calls, every push and
pop compares about 15 of them, and since nearly every ping timeout is
cancelled (its pong came), the reactor rebuilds the whole heap whenever
half of it is cancelled: a turn of 10 to 30 ms every few seconds.  Here
deadlines are kept in slots of ``resolution`` seconds, the slots' numbers
in a heap of integers (compared in C), and one ``callLater`` in all waits
for the earliest; a cancelled deadline is only marked, a slot left with no
live deadline is forgotten, and slots run their deadlines in the order they
were set: never early, at most ``resolution`` late.
"""

from heapq import heappop, heappush
from math import ceil, floor
from typing import Dict, List, Optional

from twisted.logger import Logger


class SlotTimer:
    """
    Autobahn's timer interface (``call_later(delay, func, *args, **kwargs)``
    answering something with ``cancel()``) on ``clock``, in slots of
    ``resolution`` seconds.  With no live deadline, no timed call is left
    pending: a server with no connections has none.
    """

    _log = Logger()

    def __init__(self, clock, resolution: float = 0.002):
        self._clock = clock
        self._per_second = 1.0 / resolution
        self._slots: Dict[int, _Slot] = {}
        self._numbers: List[int] = []  # a heap: the slots' numbers (and some forgotten ones)
        self._live = 0  # deadlines neither run nor cancelled
        self._wakeup = None  # the one timed call, for slot number _wakeup_at
        self._wakeup_at: Optional[int] = None

    def call_later(self, delay, func, *args, **kwargs):
        number = ceil((self._clock.seconds() + delay) * self._per_second)  # the first slot ending at or after it
        slot = self._slots.get(number)
        if slot is None:
            slot = self._slots[number] = _Slot(self, number)
            heappush(self._numbers, number)
            if self._wakeup_at is None or number < self._wakeup_at:
                self._wake_for(number)
        deadline = _Deadline(slot, func, args, kwargs)
        slot.deadlines.append(deadline)
        slot.live += 1
        self._live += 1
        return deadline

    def _wake_for(self, number):
        delay = max(0.0, number / self._per_second - self._clock.seconds())
        if self._wakeup is not None and self._wakeup.active():
            self._wakeup.reset(delay)  # (moved, not cancelled: the reactor's heap stays as it is)
        else:
            self._wakeup = self._clock.callLater(delay, self._due)
        self._wakeup_at = number

    def _due(self):
        until = max(self._wakeup_at or 0, floor(self._clock.seconds() * self._per_second))
        self._wakeup = self._wakeup_at = None
        numbers, slots = self._numbers, self._slots
        while numbers and numbers[0] <= until:
            slot = slots.pop(heappop(numbers), None)
            if slot is not None:
                self._run(slot)
        while numbers and numbers[0] not in slots:
            heappop(numbers)  # (forgotten: all cancelled)
        if numbers and (self._wakeup_at is None or numbers[0] < self._wakeup_at):
            self._wake_for(numbers[0])  # (a deadline set by a call just run may have woken it for a later one)

    def _run(self, slot):
        for deadline in slot.deadlines:
            if deadline.func is not None:
                func, args, kwargs = deadline.func, deadline.args, deadline.kwargs
                deadline.slot = deadline.func = deadline.args = deadline.kwargs = None
                self._live -= 1
                try:
                    func(*args, **kwargs)
                except Exception:  # (one connection's fault must not cost the others their deadlines)
                    self._log.failure("a timed call failed: {func!r}", func=func)

    def _cancelled(self, slot):
        self._live -= 1
        slot.live -= 1
        if slot.live == 0 and self._slots.get(slot.number) is slot:
            del self._slots[slot.number]  # (its number stays in the heap until reached)
        if self._live == 0 and self._wakeup is not None:
            if self._wakeup.active():
                self._wakeup.cancel()
            self._wakeup = self._wakeup_at = None
            self._numbers.clear()
            self._slots.clear()

    def pending(self) -> int:
        """Deadlines set and neither run nor cancelled."""
        return self._live


class _Slot:
    __slots__ = ("timer", "number", "deadlines", "live")

    def __init__(self, timer, number):
        self.timer, self.number = timer, number
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
        slot.timer._cancelled(slot)
