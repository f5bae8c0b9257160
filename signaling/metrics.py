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
"""

import time
from bisect import bisect_left
from collections import Counter
from typing import Dict, Iterable, Optional

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.defer import maybeDeferred

from signaling import __version__, errors, messages
from signaling.registry import IClusterRegistry

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
PROTOCOLS = ("native",)

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
    """

    def __init__(self, counts: Counts, connections, http, summary, cluster=None, node=None):
        self.counts = counts
        self.connections = connections
        self.http = http
        self.summary = summary
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


def make_registry(collector: SignalingCollector) -> CollectorRegistry:
    """A registry of the server's metrics and the standard process, platform and GC ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry`` (``CONTENT_TYPE_LATEST``)."""
    return generate_latest(registry)


class ServerMetrics:
    """
    The metrics of one server process, as the web routes serve them:
    ``/metrics`` (:meth:`exposition`) and ``/api/dashboard`` (:meth:`dashboard`).

    :param factory: the :class:`~signaling.protocol.SignalingFactory`
        (its :class:`Counts` and connections).
    :param registry: the registry (users by state, and with ``--redis`` the
        cluster's state, nodes and Redis latency).
    :param clock: ``seconds()``.
    """

    def __init__(self, factory, registry, clock):
        self.factory = factory
        self.registry = registry
        self.clock = clock
        self.cluster = registry if IClusterRegistry.providedBy(registry) else None
        self.node = self.cluster.node if self.cluster is not None else None
        self.site = None  # the HTTP site (its connections and refusals), once made
        self.summary: Optional[dict] = None  # the registry's, at the last refresh
        self.collector = SignalingCollector(
            factory.metrics, self._connections, self._http, lambda: self.summary, self.cluster, self.node
        )
        self.prometheus = make_registry(self.collector)

    def _connections(self) -> Dict[str, int]:
        return {"native": self.factory.admitted}

    def _http(self):
        site = self.site
        return (site.counts.total, site.refusals) if site is not None else (0, {})

    def refresh(self):
        """Fetch the registry's summary (a round trip to Redis with ``--redis``); fires when done."""

        def got(summary):
            self.summary = summary

        def failed(_):
            self.summary = None  # (the gauges are left out rather than stale)

        return maybeDeferred(self.registry.summary).addCallbacks(got, failed)

    def exposition(self) -> bytes:
        """The Prometheus text exposition (``CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.prometheus)

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
