"""
``twistd`` with a probe of its reactor's turns, for benchmarks: how long
each turn kept the reactor busy (from the end of its wait for events to the
beginning of the next wait: timed calls and every socket event handled),
in CPU time of the reactor thread (what other processes on the core do not
change) and in wall time.  On SIGUSR1 it prints one line,
``probe {"turns": N, "cpu_ms": {...}, "wall_ms": {...}}`` (percentiles and
maximum since the last), and starts counting again.

    python bench/_probe.py -n --pidfile= signaling --http=... --ws=...

(as ``twistd``; the epoll reactor).
"""

import json
import signal
import sys
import time


def main():
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    busy_cpu, busy_wall = [], []
    state = {"cpu": time.thread_time(), "wall": time.perf_counter()}
    class Poller:
        """The reactor's epoll object, noting when each wait for events ends."""

        def __init__(self, epoll):
            self._epoll = epoll

        def __getattr__(self, name):
            return getattr(self._epoll, name)

        def poll(self, *args):
            # the turn that ends here began when the last wait ended
            busy_cpu.append(time.thread_time() - state["cpu"])
            busy_wall.append(time.perf_counter() - state["wall"])
            try:
                return self._epoll.poll(*args)
            finally:
                state["cpu"], state["wall"] = time.thread_time(), time.perf_counter()

    def report(signum, frame):
        def pct(values, p):
            values = sorted(values)
            return round(values[min(len(values) - 1, int(p / 100 * (len(values) - 1)))] * 1000, 3) if values else None

        out = {"turns": len(busy_cpu)}
        for name, values in (("cpu_ms", busy_cpu), ("wall_ms", busy_wall)):
            out[name] = {"p50": pct(values, 50), "p99": pct(values, 99), "p999": pct(values, 99.9),
                         "max": pct(values, 100), "over_1ms": sum(1 for v in values if v > 0.001),
                         "total_s": round(sum(values), 3)}
        del busy_cpu[:], busy_wall[:]
        print("probe " + json.dumps(out), flush=True)

    reactor._poller = Poller(reactor._poller)
    signal.signal(signal.SIGUSR1, report)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
