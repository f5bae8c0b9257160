"""
Keeping Python's cyclic garbage collector out of connection bursts.

Now and then CPython runs a full collection, which walks every object it
tracks.  With 10,000 open WebSockets (some 25 objects each) that is a pause
of 100 ms or more, and a burst of new connections, which keeps growing the
heap, sets one off every few thousand connections: every connection waiting
for its welcome waits for the pause (measured: time-to-welcome p99 150 ms
for a burst of 10,000 at concurrency 200, instead of about 40 ms).

:class:`GenerationalFreeze` moves what survives each full collection into
the permanent generation (``gc.freeze()``), so that the next one walks only
what is newer: pauses stay a few milliseconds whatever the number of open
connections.  Frozen objects are still freed by reference counting, and a
closed connection frees itself that way (the protocol breaks the one cycle
Autobahn makes); only reference cycles that frozen objects join later wait,
so every ``interval`` seconds the whole heap is unfrozen and collected once,
timed and logged, and frozen again.
"""

import gc
import time

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class GenerationalFreeze(Service):
    """
    :param clock: schedules the periodic full collection (the reactor).
    :param interval: seconds between full collections of the whole heap.
    """

    _log = Logger()

    def __init__(self, clock, interval: float):
        self.clock = clock
        self.interval = interval
        self.freezes = 0  # full collections followed by a freeze
        self.full_collections = 0
        self._loop = None

    @staticmethod
    def supported() -> bool:
        return hasattr(gc, "freeze") and gc.isenabled()  # CPython with its collector on

    def startService(self):
        super().startService()
        if not self.supported():
            self._log.info("garbage collector left as it is (no gc.freeze, or it is disabled)")
            return
        gc.collect()
        gc.freeze()  # what startup made (modules, classes) is never garbage
        # A full collection every second collection of the middle
        # generation (CPython's default: every tenth), each walking only
        # what the one before left unfrozen: short pauses, often.
        self._thresholds = gc.get_threshold()
        gc.set_threshold(self._thresholds[0], self._thresholds[1], 1)
        gc.callbacks.append(self._collected)
        self._loop = LoopingCall(self.collect_all)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stopService(self):
        super().stopService()
        if self._loop is None:
            return
        self._loop.stop()
        self._loop = None
        gc.callbacks.remove(self._collected)
        gc.set_threshold(*self._thresholds)
        gc.unfreeze()

    def _collected(self, phase: str, info: dict) -> None:
        # Called by the collector itself, after every collection: after a
        # full one, nothing unreachable is left, and what is alive moves out
        # of the way of the next.
        if phase == "stop" and info["generation"] == 2:
            gc.freeze()
            self.freezes += 1

    def collect_all(self) -> int:
        """Unfreeze, collect the whole heap, freeze again; log and return what was freed."""
        started = time.perf_counter()
        gc.unfreeze()
        freed = gc.collect()  # a full collection: _collected freezes what is left
        self.full_collections += 1
        self._log.info(
            "full garbage collection: {freed} objects freed in {ms:.1f} ms, {kept} kept",
            freed=freed,
            ms=(time.perf_counter() - started) * 1000,
            kept=gc.get_freeze_count(),
        )
        return freed
