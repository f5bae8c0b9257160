"""
Metrics: what ``GET /metrics`` (Prometheus) and ``/api/dashboard`` show.

The hot path only adds to plain integers and dictionaries
(:class:`Counts`, :class:`Histogram`); :class:`SignalingCollector` turns
them into metric families when Prometheus scrapes, through
``prometheus_client``'s registry and text exposition (nothing here writes
the format by hand).  Every label takes its values from a fixed set (relay
types, error codes, HTTP statuses, disconnect reasons, protocols): no peer
id and no address ever becomes a label.

Users, pairs and peers in grace are the registry's (with ``--redis``, the
cluster's: the same on every node); connections, relays, errors and the
rest are this process's.

Scrapes cost the relays nothing much however often they come: the users by
state come from the stats' shared captures (:mod:`signaling.stats`), the
exposition and the dashboard's JSON are made at most once per
:data:`~signaling.stats.INTERVAL` and shared by everyone waiting (an answer
is never older than its request), and the count of open file descriptors,
which the kernel lists one by one (some 9 ms with 10,000 connections), is
taken at most every :data:`FD_INTERVAL` seconds, in a thread.
"""

import gc
import os
import platform
import time
from bisect import bisect_left
from collections import Counter
from itertools import islice
from typing import Any, Callable, Dict, Iterable, Optional

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from signaling import __version__, errors, messages, topics
from signaling.registry import IClusterRegistry
from signaling.stats import INTERVAL, Body, Captures, StatsCache

__all__ = ["CONTENT_TYPE_LATEST", "Counts", "Histogram", "ServerMetrics", "SignalingCollector", "make_registry"]

#: why a peer's WebSocket ended (the ``reason`` label of disconnects)
DISCONNECT_REASONS = (
    "closed",  # the peer sent a close frame
    "lost",  # no close frame: a reset, a keepalive timeout, a network change
    "not_reading",  # dropped: too many bytes waited unsent to it
    "flood",  # closed with 1008 for flooding
    "too_big",  # closed with 1009
    "protocol",  # failed for breaking the WebSocket protocol (1002, 1007)
    "replaced",  # 4409: a newer connection took its id or session over
    "shutdown",  # 1001: this server stopped
    "unavailable",  # 1013: the cluster's state was unreachable at its join
    "other",
)

_CLOSE_REASONS = {1001: "shutdown", 1008: "flood", 1009: "too_big", 1002: "protocol", 1007: "protocol",
                  4409: "replaced", 1013: "unavailable"}

#: the error codes a client may be sent (the ``code`` label of errors)
ERROR_CODES = tuple(sorted(set(errors.ERROR_CODES)))

#: the wire protocols a connection may speak (the ``protocol`` label)
PROTOCOLS = ("native", "peerjs", "yjs")

#: what becomes of a PeerJS message for an id that is not connected (signaling_peerjs_held)
PEERJS_OUTCOMES = ("held", "flushed", "expired", "expire_sent", "refused")

#: why a y-webrtc topic is refused to a subscribe (signaling_yjs_refused)
YJS_REFUSALS = tuple(topics.REASONS)

#: latency buckets, in seconds: 50 µs to 5 s
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0)


def close_reason(code: Optional[int]) -> str:
    """The disconnect reason for a close this server started with ``code``."""
    return _CLOSE_REASONS.get(code, "other") if code is not None else "other"


class Histogram:
    """A latency histogram as plain integers: ``observe`` is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds=LATENCY_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def quantile(self, q: float) -> Optional[float]:
        """The upper bound of the bucket holding the ``q`` quantile (None if empty, inf if past the last)."""
        total = self.count
        if not total:
            return None
        rank, running = q * total, 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            if running >= rank:
                return bound
        return float("inf")

    def buckets(self):
        """Cumulative ``(le, count)`` pairs, as Prometheus wants them, ``+Inf`` last."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((repr(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


class Counts:
    """What happened in this process since it started, counted on the hot path."""

    #: one relay in SAMPLE has its latency measured (timing every relay costs
    #: a few percent of the relay throughput)
    SAMPLE = 16

    def __init__(self, clock=time):
        self.started = clock.time()
        self.connects = 0
        self.disconnects: Dict[str, int] = dict.fromkeys(DISCONNECT_REASONS, 0)
        self.relays: Dict[str, int] = dict.fromkeys(sorted(messages.CLIENT_TYPES), 0)
        self.relayed_bytes = 0
        self.errors: Dict[str, int] = dict.fromkeys(ERROR_CODES, 0)
        self.handshake_refusals: Counter = Counter()  # HTTP status -> handshakes refused so
        self.grace_started = 0
        self.grace_refused = 0  # lost sockets given no grace period (caps)
        self.resumes: Dict[str, int] = {"resumed": 0, "moved": 0, "new": 0}
        self.grace_expired = 0
        self.relay_latency = Histogram()  # of one relay in SAMPLE
        self.until_sample = 1  # relays until the next one timed (the first is)

    def error(self, code: str) -> None:
        if code in self.errors:
            self.errors[code] += 1

    def disconnect(self, reason: str) -> None:
        self.disconnects[reason if reason in self.disconnects else "other"] += 1


class SignalingCollector:
    """
    The server's metric families, read from :class:`Counts` and the live
    state at each scrape.

    :param counts: :class:`Counts`.
    :param connections: ``() -> {protocol: open WebSockets}``.
    :param http: ``() -> (open HTTP connections (not yet WebSockets),
        {HTTP status: refusals by the HTTP guard})``.
    :param summary: ``() -> the registry's last summary`` (``users``, ``idle``,
        ``connecting``, ``connected``, ``pairs``, ``offline``), or None.
    :param cluster: the cluster registry (its state and Redis latency), or None.
    :param node: this process's node id, or None.
    :param wires: ``() -> metric families`` of the other wire formats served.
    """

    def __init__(self, counts: Counts, connections, http, summary, cluster=None, node=None, wires=None):
        self.counts = counts
        self.connections = connections
        self.http = http
        self.summary = summary
        self.wires = wires  # () -> the other wire formats' families (PeerJS, y-webrtc), if any
        self.cluster = cluster
        self.node = node

    def collect(self) -> Iterable:
        c = self.counts
        info = GaugeMetricFamily("signaling_info", "This server: version, registry and node.",
                                 labels=["version", "registry", "node"])
        info.add_metric([__version__, "redis" if self.cluster is not None else "memory", self.node or ""], 1)
        yield info
        start = GaugeMetricFamily("signaling_start_time_seconds", "When this process started (unix time).")
        start.add_metric([], c.started)
        yield start

        open_ = GaugeMetricFamily("signaling_connections", "WebSocket connections open on this process.",
                                  labels=["protocol"])
        by_protocol = self.connections()
        for protocol in PROTOCOLS:
            open_.add_metric([protocol], by_protocol.get(protocol, 0))
        yield open_
        http_open, http_refusals = self.http()
        http = GaugeMetricFamily("signaling_http_connections",
                                 "HTTP connections open on this process (not WebSockets).")
        http.add_metric([], http_open)
        yield http

        summary = self.summary()
        if summary is not None:
            users = GaugeMetricFamily("signaling_users", "Users by state (the cluster's with --redis).",
                                      labels=["state"])
            for state in ("idle", "connecting", "connected"):
                users.add_metric([state], summary.get(state, 0))
            yield users
            pairs = GaugeMetricFamily("signaling_pairs", "Connected pairs (the cluster's with --redis).")
            pairs.add_metric([], summary.get("pairs", 0))
            yield pairs
            offline = GaugeMetricFamily(
                "signaling_users_offline", "Users in their grace period: socket lost, may resume.")
            offline.add_metric([], summary.get("offline", 0))
            yield offline

        yield _counter("signaling_connects", "Peers welcomed.", c.connects)
        yield _labelled("signaling_disconnects", "Peers' WebSockets ended, by why.", "reason", c.disconnects)
        yield _labelled("signaling_relays", "Messages relayed, by type.", "type", c.relays)
        yield _counter("signaling_relayed_bytes", "Bytes of the messages relayed (as received).", c.relayed_bytes)
        yield _labelled("signaling_errors", "Error messages sent to clients, by code.", "code", c.errors)
        yield _labelled("signaling_handshake_refusals", "WebSocket handshakes refused, by HTTP status.",
                        "status", {str(k): v for k, v in sorted(c.handshake_refusals.items())})
        yield _labelled("signaling_http_refusals",
                        "HTTP requests or connections refused by the HTTP guard, by HTTP status.",
                        "status", {str(k): v for k, v in sorted(http_refusals.items())})
        yield _counter("signaling_floods", "Peers closed for flooding (1008).", c.disconnects["flood"])
        yield _counter("signaling_grace_started", "Peers put in their grace period (socket lost).",
                       c.grace_started)
        yield _counter("signaling_grace_refused",
                       "Lost sockets given no grace period (too many peers in grace).", c.grace_refused)
        yield _labelled("signaling_resumes", "Resume tokens honoured, by outcome (resumed: from grace; "
                        "moved: from an open older socket; new: the same id, idle).", "outcome", c.resumes)
        yield _counter("signaling_grace_expired", "Grace periods this process ended without a resume.",
                       grace_expired(c, self.cluster))
        yield _histogram("signaling_relay_seconds",
                         "Time from reading a message to handing its relay on (to the write batch, or "
                         "to Redis for a peer elsewhere); one relay in 16 is timed.", c.relay_latency)

        if self.wires is not None:
            yield from self.wires()

        if self.cluster is not None:
            up = GaugeMetricFamily("signaling_redis_up", "1 if this node is registered in Redis and admitting.")
            up.add_metric([], 1 if self.cluster.ready else 0)
            yield up
            yield _histogram("signaling_redis_seconds", "Round trips of this node's Redis scripts.",
                             self.cluster.latency)


def grace_expired(counts: Counts, cluster) -> int:
    """Grace periods this process ended: in memory (its sessions), or in Redis (its expiry timers)."""
    return counts.grace_expired + (cluster.expired if cluster is not None else 0)


def _counter(name, doc, value):
    family = CounterMetricFamily(name, doc)
    family.add_metric([], value)
    return family


def _labelled(name, doc, label, values: Dict[str, int]):
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def _histogram(name, doc, histogram: Histogram):
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], histogram.buckets(), histogram.sum)
    return family


#: seconds between two counts of the open file descriptors, at least
FD_INTERVAL = 5.0


def open_fds_by_stat(proc: str = "/proc/self") -> Optional[int]:
    """
    This process's open file descriptors as Linux 6.2 and later give them:
    the size ``stat`` reports for ``/proc/PID/fd`` (the kernel counts its
    descriptor table's bits: microseconds, whatever the count).  None where
    that size is 0 (older kernels) or there is no ``/proc``.
    """
    try:
        return os.stat(proc + "/fd").st_size or None
    except OSError:
        return None


def count_open_fds() -> int:
    """
    This process's open file descriptors: by :func:`open_fds_by_stat`, or
    else by listing them (O(descriptors): 9 ms with 10,000 connections, and
    the listing takes and drops the GIL at every entry: run it in a thread).
    """
    return open_fds_by_stat() or len(os.listdir("/proc/self/fd"))


class ProcessMetrics:
    """
    The standard ``process_*`` metrics (the names and meanings of
    prometheus_client's ``ProcessCollector``, on Linux), with
    ``process_open_fds`` counted at most every ``interval`` seconds, by
    ``count_later`` (``() -> Deferred`` of the count: in a thread), and
    read from the last count at a scrape.

    :param clock: ``seconds()``.
    :param count_later: ``None`` counts at once, on the caller's thread.
    """

    def __init__(self, clock, count_later: Optional[Callable] = None, interval: float = FD_INTERVAL,
                 proc: str = "/proc/self"):
        self.clock = clock
        self.count_later = count_later
        self.interval = interval
        self.proc = proc
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.pagesize = os.sysconf("SC_PAGE_SIZE")
        self.boot: Optional[float]
        try:
            with open("/proc/stat", "rb") as f:
                self.boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
            self.open_fds: Optional[int] = count_open_fds()
        except (OSError, StopIteration):
            self.boot, self.open_fds = None, None  # (no /proc: no process metrics)
        self.counted_at = clock.seconds()
        self.counting = False
        self.counts = 1  # how many times the descriptors were counted

    def refresh(self) -> None:
        """Count the open descriptors again if the last count is old enough (not waiting for it)."""
        if self.boot is None or self.counting or self.clock.seconds() - self.counted_at < self.interval:
            return
        self.counted_at = self.clock.seconds()
        self.counts += 1
        if self.count_later is None:
            self.open_fds = count_open_fds()
            return
        self.counting = True

        def done(result):
            self.counting = False
            if isinstance(result, int):
                self.open_fds = result

        self.count_later().addBoth(done)

    def collect(self) -> Iterable:
        if self.boot is None:
            return
        try:
            with open(self.proc + "/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[-1].split()
            with open(self.proc + "/limits", "rb") as f:
                max_fds = next((float(line.split()[3]) for line in f if line.startswith(b"Max open files")), None)
        except OSError:
            return
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.",
                                value=float(fields[20]))
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                                value=float(fields[21]) * self.pagesize)
        yield GaugeMetricFamily("process_start_time_seconds",
                                "Start time of the process since unix epoch in seconds.",
                                value=float(fields[19]) / self.ticks + self.boot)
        yield CounterMetricFamily("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                                  value=(float(fields[11]) + float(fields[12])) / self.ticks)
        if self.open_fds is not None:
            yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors (counted at most "
                                    f"every {self.interval:g} s).", value=self.open_fds)
        if max_fds is not None:
            yield GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.", value=max_fds)


class _WallClock:
    def seconds(self) -> float:
        return time.time()


def collectors(collector: SignalingCollector, process: Optional[ProcessMetrics] = None) -> list:
    """The server's metrics and the standard process, platform and GC ones."""
    process = process if process is not None else ProcessMetrics(_WallClock())
    members = [collector, process, PlatformCollector(registry=None)]
    if hasattr(gc, "get_stats") and platform.python_implementation() == "CPython":  # (as GCCollector decides)
        members.append(GCCollector(registry=CollectorRegistry(auto_describe=False)))
    return members


def registry_of(*members) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    for member in members:
        registry.register(member)
    return registry


def make_registry(collector: SignalingCollector, process: Optional[ProcessMetrics] = None) -> CollectorRegistry:
    """A registry of the server's metrics and the standard process, platform and GC ones."""
    return registry_of(*collectors(collector, process))


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry`` (``CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)


#: metric families exposed per step of a capture of ``/metrics``
FAMILIES_PER_STEP = 4


class _Families:
    """A collector of the metric families given (a few of a collector's, exposed in one step)."""

    def __init__(self, families: list):
        self.families = families

    def collect(self) -> list:
        return self.families


class ServerMetrics:
    """
    The metrics of one server process, as the web routes serve them:
    ``/metrics`` (:meth:`exposition`) and ``/api/dashboard`` (:meth:`dashboard`).

    :param factory: the :class:`~signaling.protocol.SignalingFactory`
        (its :class:`Counts` and connections).
    :param registry: the registry (users by state, and with ``--redis`` the
        cluster's state, nodes and Redis latency).
    :param clock: ``seconds()`` and ``callLater``.
    :param stats: the :class:`~signaling.stats.StatsCache` the users by
        state come from (the web app's); by default one of its own.
    :param interval: seconds between two builds of the exposition (and of
        the dashboard's JSON), at least.
    :param count_fds: ``() -> Deferred`` of the count of open file
        descriptors (in a thread); None counts on the reactor thread.
    """

    def __init__(self, factory, registry, clock, stats: Optional[StatsCache] = None, interval: float = INTERVAL,
                 count_fds: Optional[Callable] = None):
        self.factory = factory
        self.registry = registry
        self.clock = clock
        self.stats = stats if stats is not None else StatsCache(registry, clock, interval=interval)
        self.cluster: Any = registry if IClusterRegistry.providedBy(registry) else None
        self.node = self.cluster.node if self.cluster is not None else None
        self.site: Any = None  # the HTTP site (its connections and refusals), once made
        self.summary: Optional[dict] = None  # the registry's, at the last refresh
        self.collector = SignalingCollector(
            factory.metrics, self._connections, self._http, lambda: self.summary, self.cluster, self.node,
            self._wire_families,
        )
        self.process = ProcessMetrics(clock, count_fds)
        members = collectors(self.collector, self.process)
        self.prometheus = registry_of(*members)
        self._members = members  # (the exposition is made a few families a step)
        self.expositions = Captures(clock, self._capture_exposition, interval, slicer=self.stats.slicer)
        self.dashboards = Captures(clock, self._capture_dashboard, interval, slicer=self.stats.slicer)

    def _connections(self) -> Dict[str, int]:
        others = dict(self.factory.opened_by_wire)  # (PeerJS, y-webrtc: from their handshake's path on)
        return {"native": self.factory.admitted - sum(others.values()), **others}

    def _wire_families(self):
        """What the PeerJS and y-webrtc sides of this process did (those served)."""
        peerjs = getattr(self.factory, "peerjs", None)
        if peerjs is not None:
            yield _labelled(
                "signaling_peerjs_held",
                "PeerJS messages for ids not connected yet, by outcome (held; flushed to the id; expired "
                "unsent; refused: past a bound), and EXPIRE frames sent (expire_sent).",
                "outcome", {k: peerjs.counts.get(k, 0) for k in PEERJS_OUTCOMES})
        yjs = getattr(self.factory, "yjs", None)
        if yjs is not None:
            counters = yjs.counters()
            yield _counter("signaling_yjs_publishes", "y-webrtc publishes received by this process.",
                           counters["publishes"])
            yield _counter("signaling_yjs_delivered",
                           "y-webrtc publish frames handed to this process's subscribers.", counters["delivered"])
            yield _labelled("signaling_yjs_refused", "y-webrtc topics refused to a subscribe, by reason.",
                            "reason", {k: counters["refused"].get(k, 0) for k in YJS_REFUSALS})
            summary = yjs.summary()
            for name, doc in (("topics", "y-webrtc topics with subscribers on this process."),
                              ("subscriptions", "y-webrtc subscriptions on this process.")):
                family = GaugeMetricFamily("signaling_yjs_" + name, doc)
                family.add_metric([], summary[name])
                yield family

    def _http(self):
        site = self.site
        return (site.counts.total, site.refusals) if site is not None else (0, {})

    def refresh(self):
        """
        Fetch the registry's summary (from the stats' shared captures: with
        ``--redis``, the cluster's peers from Redis); fires when done.
        """

        def got(summary):
            self.summary = summary

        def failed(_):
            self.summary = None  # (the gauges are left out rather than stale)

        return self.stats.summary().addCallbacks(got, failed)

    def exposition(self) -> bytes:
        """The Prometheus text exposition (``CONTENT_TYPE_LATEST``), made now."""
        self.process.refresh()
        return generate_latest(self.prometheus)

    def exposition_body(self):
        """Fires with the exposition as a :class:`~signaling.stats.Body`, from a shared capture."""
        return self.expositions.get()

    def dashboard_body(self):
        """Fires with ``/api/dashboard``'s JSON as a :class:`~signaling.stats.Body`, from a shared capture."""
        return self.dashboards.get()

    def _capture_exposition(self):
        return self.stats.slicer.run(self._exposition_in_steps())

    def _exposition_in_steps(self):
        """
        The exposition, :data:`FAMILIES_PER_STEP` metric families a step
        (about 20 us each; the whole is 0.5 to 1 ms, too long for one turn).
        """
        yield self.refresh()
        self.process.refresh()
        parts = []
        for member in self._members:
            families = iter(member.collect())
            while True:
                some = list(islice(families, FAMILIES_PER_STEP))
                if not some:
                    break
                parts.append(generate_latest(_Families(some)))
                yield
        return Body.of(b"".join(parts), CONTENT_TYPE_LATEST.encode("ascii"))

    def _capture_dashboard(self):
        return self.refresh().addCallback(lambda _: Body.of(messages.encode(self.dashboard())))

    def dashboard(self) -> dict:
        """What ``/api/dashboard`` answers: this process's counters and the registry's summary."""
        c = self.factory.metrics
        latency = c.relay_latency
        http_open, http_refusals = self._http()
        doc = {
            "time": self.clock.seconds(),
            "started": c.started,
            "version": __version__,
            "registry": "redis" if self.cluster is not None else "memory",
            "node": self.node,
            "connections": self._connections(),
            "http_connections": http_open,
            "users": self.summary,
            "connects": c.connects,
            "disconnects": dict(c.disconnects),
            "relays": dict(c.relays),
            "relayed_bytes": c.relayed_bytes,
            "errors": dict(c.errors),
            "handshake_refusals": {str(k): v for k, v in c.handshake_refusals.items()},
            "http_refusals": {str(k): v for k, v in http_refusals.items()},
            "grace": {"started": c.grace_started, "refused": c.grace_refused, "resumes": dict(c.resumes),
                      "expired": grace_expired(c, self.cluster)},
            "relay_latency": _quantiles(latency),
        }
        if self.cluster is not None:
            doc["redis"] = {"state": self.cluster.health().get("redis"), **_quantiles(self.cluster.latency)}
        return doc


def _quantiles(histogram: Histogram) -> dict:
    """Count, p50 and p99 (bucket upper bounds, seconds; None when empty or past the last bucket)."""

    def finite(value):
        return None if value is None or value == float("inf") else value

    return {"count": histogram.count, "p50": finite(histogram.quantile(0.5)),
            "p99": finite(histogram.quantile(0.99))}
