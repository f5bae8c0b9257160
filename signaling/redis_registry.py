"""
A registry shared by several server processes ("nodes") through Redis.

Every operation of :class:`~signaling.registry.IRegistry` is one Lua script,
so that pairing rules hold even when peers on different nodes act at the
same time (no read-then-write).  Messages for a peer on another node are
published on that node's channel.  Each node heartbeats; any node removes
the peers of a node whose heartbeat is older than ``node_timeout`` and tells
their partners ``peer_left``.

The invariant that makes that complete: no peer exists in Redis whose node
is not tracked for liveness in ``P nodes``.  The scripts that create a
node's state (``add``, ``sync``) record the node's heartbeat in the same
atomic step, so a node that dies at any moment, even before its first
heartbeat, leaves nothing the reaper cannot find.  A node that finds its
own entry gone (it was silent too long and reaped, or Redis lost it)
re-registers its peers at once.

Keys (``P`` is the prefix, ``signaling:`` by default):

- ``P peers``: hash, peer id -> JSON ``{"n": node, "ip", "at", "s": state, "t": target}``;
- ``P watch:<id>``: set of the peers whose target is ``<id>``;
- ``P node:<node>``: set of the peers connected to ``<node>``;
- ``P nodes``: sorted set, node -> time of its last heartbeat (Redis clock, ms);
- channel ``P to:<node>``: messages for peers on ``<node>``, as ``<peer id>\\n<frame>``.

Not for Redis Cluster: the scripts touch keys they compute.
"""

import json
import os
import socket
import time
from importlib import resources
from urllib.parse import urlparse

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from signaling.errors import CLUSTER_UNREACHABLE, PeerIdTaken, SignalingError, Unavailable, refusal
from signaling.registry import IClusterRegistry, ILocalPeers, IRegistry, Peer, Transition
from signaling.results import then


def load_scripts() -> dict:
    """The Lua scripts (package data), each with the shared prelude: name -> source."""
    folder = resources.files("signaling").joinpath("lua")
    prelude = folder.joinpath("prelude.lua").read_text("utf-8")
    return {
        entry.name[: -len(".lua")]: prelude + entry.read_text("utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".lua") and entry.name != "prelude.lua"
    }


#: loaded once, when this module is first imported
SCRIPTS = load_scripts()


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _transitions(reply):
    """Turn a script's reply into transitions, or raise the refusal it names."""
    reply = [_text(x) for x in reply]
    if reply and reply[0] != "":
        raise refusal(reply[0])
    return [
        Transition(reply[i], reply[i + 1], reply[i + 2], reply[i + 3] or None)
        for i in range(1, len(reply), 4)
    ]


@implementer(IRegistry)
class RedisRules:
    """
    The pairing rules as the Lua scripts apply them in Redis, over any way
    of running a script: ``execute(name, *args)`` runs ``SCRIPTS[name]``
    with ``ARGV`` = (prefix, *args) and returns its reply, or a Deferred of
    it (:class:`RedisRegistry` uses txredisapi; the tests also use a
    blocking client, to hold both registries to one behaviour suite).

    :param node: the node whose peers :meth:`add` registers.
    :param clock: ``seconds()`` for the time a peer arrived.
    """

    def __init__(self, execute, node: str, clock):
        self._execute = execute
        self.node = node
        self.clock = clock

    def add(self, peer_id, ip):
        at = self.clock.seconds()

        def added(reply):
            if reply and _text(reply[0]) == "taken":
                raise PeerIdTaken(peer_id)
            return Peer(peer_id, ip, at, self.node)

        return then(self._execute("add", peer_id, self.node, ip, repr(at)), added)

    def remove(self, peer_id):
        return then(self._execute("remove", peer_id), _transitions)

    def ping(self, sender, to):
        return then(self._execute("ping", sender, to), _transitions)

    def pong(self, sender, to):
        return then(self._execute("pong", sender, to), _transitions)

    def check_paired(self, sender, to):
        return then(self._execute("check_paired", sender, to), _transitions)

    def disconnect(self, sender, to):
        return then(self._execute("disconnect", sender, to), _transitions)

    def check_and_route(self, sender, to, frame: bytes):
        """
        ``check_paired`` and, if it passes, ``route``, in one round trip to
        Redis (for a peer on another node); answers whether a node took
        the frame, or fails as ``check_paired`` would.
        """

        def routed(reply):
            if _text(reply[0]) != "":
                _transitions(reply)  # raises the refusal
            return reply[1] > 0

        return then(self._execute("check_and_route", sender, to, frame.decode("utf-8")), routed)

    def route(self, to, frame: bytes):
        """Publish a frame for a peer on another node; answers whether a node took it."""
        return then(self._execute("route", to, frame.decode("utf-8")), lambda receivers: receivers > 0)

    def peers(self):
        return then(self._execute("peers"), _peers)

    def summary(self):
        def count(peers):
            counts = {"idle": 0, "connecting": 0, "connected": 0}
            for p in peers:
                counts[p.state] += 1
            return {"users": len(peers), **counts, "pairs": counts["connected"] // 2}

        return then(self.peers(), count)


def _peers(flat):
    out = []
    for i in range(0, len(flat), 2):
        info = json.loads(flat[i + 1])
        peer = Peer(_text(flat[i]), info["ip"], float(info["at"]), info["n"])
        peer.state = info["s"]
        peer.target = info["t"] or None
        out.append(peer)
    return out


def parse_url(url: str):
    """``redis://[:password@]host[:port][/db]`` -> (host, port, db, password)."""
    parts = urlparse(url)
    if parts.scheme != "redis":
        raise ValueError(f"not a redis:// URL: {url!r}")
    db = int(parts.path.lstrip("/") or 0)
    return parts.hostname or "127.0.0.1", parts.port or 6379, db, parts.password


class _Subscriber(txredisapi.SubscriberProtocol):
    def connectionMade(self):
        super().connectionMade()
        self.whenConnected().addCallback(lambda _: self.factory.registry._subscribed(self))

    def connectionLost(self, why):
        super().connectionLost(why)
        self.factory.registry._listening = False
        self.factory.registry._lost()

    def messageReceived(self, pattern, channel, message):
        self.factory.registry._message(message)


class _SubscriberFactory(txredisapi.SubscriberFactory):
    protocol = _Subscriber
    maxDelay = 5


class _PoolFactory(txredisapi.RedisFactory):
    """The command pool; tells the registry when a connection is ready."""

    maxDelay = 5

    def addConnection(self, conn):
        super().addConnection(conn)
        if conn in self.pool:
            self.registry._register()


#: the registry's states, as /api/health reports them
STARTING, CONNECTED, DISCONNECTED = "starting", "connected", "disconnected"


@implementer(IClusterRegistry)
class RedisRegistry(RedisRules, Service):
    """
    The registry shared by the nodes: :class:`RedisRules` run through a
    txredisapi pool, this node's channel, heartbeats and the reaper.

    :param url: ``redis://host:port/db``.
    :param node: this node's id.
    :param clock: ``seconds``/``callLater`` for timestamps, heartbeats and
        timeouts (a ``Clock`` in tests).
    :param node_timeout: seconds without a heartbeat after which a node's
        peers are removed.
    :param op_timeout: seconds an operation may wait for Redis.
    :param reactor: what connects to Redis (the global reactor by default).

    The node is :attr:`ready` (peers may be admitted) once it is registered:
    its channel subscribed, its heartbeat recorded and its peers in Redis.
    Until then (``starting``), and whenever Redis is unreachable
    (``disconnected``), it is not.
    """

    _log = Logger()

    def __init__(self, url, node, clock, node_timeout=10.0, prefix="signaling:", op_timeout=5.0, reactor=None):
        RedisRules.__init__(self, self._run, node, clock)
        self.url = url
        self.reactor = clock if reactor is None else reactor
        self.node_timeout = node_timeout
        self.prefix = prefix
        self.op_timeout = op_timeout
        self.host, self.port, self.db, self.password = parse_url(url)
        self._local = _NoLocalPeers()  # until attach()
        self.state = STARTING
        self.state_since = clock.seconds()
        self._pool = None
        self._subscriber = None
        self._listening = False  # this node's channel is subscribed
        self._beating = None  # the heartbeat (or registration) in flight
        self._waiting_ready = []
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = clock

    def attach(self, local) -> None:
        """Deliver to, and register, the peers of ``local`` (an :class:`~signaling.registry.ILocalPeers`)."""
        self._local = local

    @property
    def ready(self) -> bool:
        return self.state == CONNECTED

    def whenReady(self) -> defer.Deferred:
        """A Deferred that fires once this node is (or is again) registered and admitting peers."""
        if self.ready:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting_ready.append(d)
        return d

    # -- service --------------------------------------------------------------

    def startService(self):
        super().startService()
        endpoint = TCP4ClientEndpoint(self.reactor, self.host, self.port, timeout=5)
        factory = _PoolFactory(
            f"{self.host}:{self.port}", self.db, 2, isLazy=True, password=self.password,
            replyTimeout=self.op_timeout, convertNumbers=True,
        )
        factory.registry = self
        factory.startConnecting(endpoint)
        self._pool_factory = factory
        self._pool = factory.handler
        sub = _SubscriberFactory(isLazy=True)
        sub.registry = self
        if self.password:
            sub.password = self.password
        sub.startConnecting(endpoint)
        self._subscriber = sub
        self._beat.start(self.heartbeat_interval, now=False)
        self._log.info(
            "redis registry: node {node} using {host}:{port} db {db}; not admitting peers until registered",
            node=self.node, host=self.host, port=self.port, db=self.db,
        )

    @property
    def heartbeat_interval(self) -> float:
        return max(0.2, self.node_timeout / 3.0)

    def stopService(self):
        super().stopService()
        if self._beat.running:
            self._beat.stop()
        d = defer.gatherResults(
            [self._pool_factory.disconnect(), self._subscriber.disconnect()], consumeErrors=True
        )
        d.addErrback(lambda _: None)
        return d

    # -- connection state ----------------------------------------------------------

    def _subscribed(self, protocol):
        d = protocol.subscribe(self.prefix + "to:" + self.node)

        def listening(_):
            self._listening = True
            self._register()

        d.addCallback(listening)
        d.addErrback(lambda f: self._log.warn("redis: subscribing failed: {e}", e=f.getErrorMessage()))

    def _register(self):
        """Register this node now, if it is not and Redis is reachable (not at the next beat)."""
        if self.running and self.state != CONNECTED and self._reachable():
            self._heartbeat()

    def _lost(self):
        """Redis is unreachable: stop admitting peers (a node still starting stays so for a while)."""
        if self.state == CONNECTED or (
            self.state == STARTING and self.clock.seconds() - self.state_since >= self.node_timeout
        ):
            self._set_state(DISCONNECTED)

    def _set_state(self, state, sync=None):
        if state == self.state:
            return
        self.state = state
        self.state_since = self.clock.seconds()
        if state == CONNECTED:
            dropped, added = sync or (0, 0)
            self._log.info(
                "redis: connected; node {node} re-registered {added} peers, forgot {dropped}; admitting peers",
                node=self.node, added=added, dropped=dropped,
            )
            waiting, self._waiting_ready = self._waiting_ready, []
            for d in waiting:
                d.callback(None)
        else:
            self._log.warn("redis: unreachable; refusing new peers (HTTP 503) and retrying with backoff")

    def health(self) -> dict:
        return {
            "registry": "redis",
            "redis": self.state,
            "node": self.node,
            "since": self.state_since,
        }

    def _run(self, name, *args):
        """Run one script; fail fast with Unavailable when Redis is unreachable."""
        if not self._reachable():
            self._lost()
            return defer.fail(Unavailable(CLUSTER_UNREACHABLE))
        d = self._pool.eval(SCRIPTS[name], [], [self.prefix, *args])
        d.addTimeout(self.op_timeout, self.clock)

        def failed(failure):
            if failure.check(SignalingError):
                return failure
            self._log.warn("redis: {name} failed: {error}", name=name, error=failure.getErrorMessage())
            if failure.check(txredisapi.ConnectionError, defer.TimeoutError, defer.CancelledError):
                self._lost()
            raise Unavailable(CLUSTER_UNREACHABLE)

        d.addErrback(failed)
        return d

    def route(self, to, frame: bytes):
        """As :meth:`RedisRules.route`; a failure (Redis unreachable) answers "not delivered"."""
        return RedisRules.route(self, to, frame).addErrback(lambda _: False)

    # -- cluster upkeep ------------------------------------------------------------------

    def _reachable(self) -> bool:
        return self._listening and self._pool is not None and self._pool_factory.size > 0

    def _heartbeat(self):
        """
        Every heartbeat interval, and as soon as Redis is reachable while
        not registered: register this node (its heartbeat and its live
        peers) if it is not, else beat; then remove the peers of silent
        nodes.  One at a time.
        """
        if self._beating is not None:
            return self._beating
        if not self._reachable():
            self._lost()
            return None
        if self.state == CONNECTED:
            d = self._run("heartbeat", self.node).addCallback(self._beaten)
        else:
            d = self._sync().addCallback(lambda result: self._set_state(CONNECTED, result))
        d.addCallback(lambda _: self._run("reap", str(int(self.node_timeout * 1000)), self.node))
        d.addCallback(self._reaped)
        d.addErrback(lambda f: None)  # logged by _run; the next beat retries

        finished = []

        def done(_):
            self._beating = None
            finished.append(True)

        d.addBoth(done)
        if not finished:  # (not d.called: a Deferred waiting on another one is "called")
            self._beating = d
        return d

    def _beaten(self, untracked):
        if untracked:
            # Removed by another node while alive (silent longer than
            # node_timeout), or Redis lost the entry: its peers may be gone
            # from Redis too.  Put them back now.
            self._log.warn("redis: node {node} was no longer tracked; re-registering its peers", node=self.node)
            return self._sync().addCallback(
                lambda result: self._log.info(
                    "redis: node {node} re-registered {added} peers, forgot {dropped}",
                    node=self.node, dropped=result[0], added=result[1],
                )
            )
        return None

    def _reaped(self, removed):
        if removed:
            self._log.warn(
                "redis: removed {count} peers of nodes silent for over {timeout}s",
                count=len(removed), timeout=self.node_timeout,
            )

    def _sync(self):
        """Record the heartbeat and make Redis hold exactly this node's live peers."""
        args = []
        for peer_id, ip, at in self._local.local_peers():
            args += [peer_id, ip, repr(at)]
        return self._run("sync", self.node, *args)

    def _message(self, message):
        if isinstance(message, bytes):
            message = message.decode("utf-8")
        to, _, frame = message.partition("\n")
        if not self._local.deliver_local(to, frame.encode("utf-8")):
            self._log.debug("redis: no local peer {to} for a message", to=to)


@implementer(ILocalPeers)
class _NoLocalPeers:
    """Before :meth:`RedisRegistry.attach`: no local peers."""

    def deliver_local(self, to, frame):
        return False

    def local_peers(self):
        return []


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time()) % 100000}"
