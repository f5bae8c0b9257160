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

- ``P peers``: hash, peer id -> JSON ``{"n": node, "ip", "at", "s": state,
  "t": target, "c": connection}``, and ``"o": 0`` while in its grace period;
- ``P watch:<id>``: set of the peers whose target is ``<id>``;
- ``P node:<node>``: set of the (online) peers connected to ``<node>``;
- ``P nodes``: sorted set, node -> time of its last heartbeat (Redis clock, ms);
- ``P grace``: sorted set, peer id -> end of its grace period (Redis clock, ms);
- ``P q:<id>``: list, the frames queued for a peer in its grace period;
- ``P resume-secret``: the secret of resume tokens, if no node has its own;
- channel ``P to:<node>``: messages for peers on ``<node>``, as
  ``<peer id>\\n<frame>``, or several frames as ``*`` and
  ``<peer id>\\n<length>\\n<frame>`` for each (``check_and_route_many``:
  the relays across nodes a node called in one reactor turn, one script
  and one publish per node), and the control messages ``<peer id>\\n!evict:<conn>``
  (it resumed elsewhere: close that connection without ending the session)
  and ``<peer id>\\n!settled:<conn>`` (its grace period began: every message
  published to this node for it before then has arrived, and is handed over
  with ``settle.lua``; a resume waits for that, at most 2 s).

Resume: a peer whose socket was lost is put in its grace period (not on
any node, in ``P grace``); messages to it are queued; a connection to any
node that presents its resume token takes it back (``resume.lua``); the
node that suspended it ends the period when due (``expire.lua``), and the
reaper does it for nodes that died.  The peers of a dead node get their
grace period too.

Not for Redis Cluster: the scripts touch keys they compute.
"""

import json
import os
import socket
import time
from importlib import resources
from time import perf_counter
from typing import Optional
from urllib.parse import urlparse

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from signaling.errors import CLUSTER_UNREACHABLE, QUEUE_FULL, PeerIdTaken, SignalingError, Unavailable, refusal
from signaling.metrics import Histogram
from signaling.redis_wire import ConnectionLost, RedisLink, SubscriberLink
from signaling.registry import IClusterRegistry, ILocalPeers, IRegistry, Peer, Transition
from signaling.results import then
from signaling.sessions import MOVED, NEW, RESUMED, ISessions


def load_scripts() -> dict:
    """The Lua scripts (package data), each with the shared prelude: name -> source."""
    folder = resources.files("signaling").joinpath("lua")
    base, parts = prelude_parts(folder.joinpath("prelude.lua").read_text("utf-8"))
    scripts = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".lua") or entry.name == "prelude.lua":
            continue
        source = entry.read_text("utf-8")
        first = source.split("\n", 1)[0]
        if first.startswith("-- @needs "):
            prelude = base + "".join(parts[name][1] for name in needed(parts, first.split()[2:]))
        else:
            prelude = base + "".join(text for _, text in parts.values())
        scripts[entry.name[: -len(".lua")]] = prelude + source
    return scripts


def prelude_parts(prelude: str):
    """
    The prelude as (what every script gets, name -> (the parts it needs,
    its text)), in the prelude's order: it is cut at each
    ``-- @part NAME (needs A B)`` line.
    """
    base, *rest = prelude.split("-- @part ")
    parts = {}
    for chunk in rest:
        head, text = chunk.split("\n", 1)
        name, _, needs = head.partition(" (needs ")
        parts[name] = (needs.rstrip(")").split(), text)
    return base, parts


def needed(parts, names):
    """``names`` and every part they need, in the prelude's order."""
    wanted, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name not in parts:
            raise ValueError(f"no prelude part {name!r}")
        if name not in wanted:
            wanted.add(name)
            todo.extend(parts[name][0])
    return [name for name in parts if name in wanted]


#: loaded once, when this module is first imported
SCRIPTS = load_scripts()

#: resume.lua's answer while the hand-over of a peer's last frames is due (RedisRules.resume)
SETTLING = "settling"


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _delivered(receivers):
    """What a delivery answers for what ``send()`` in the scripts answered."""
    if receivers == -2:
        return QUEUE_FULL
    return receivers > 0


def _outcomes(reply, count: int):
    """What check_and_route_many.lua answered, as :meth:`RedisRules.check_and_route_many` answers it."""
    if type(reply) is not list or len(reply) != count:
        raise ValueError(f"check_and_route_many answered {reply!r:.100} for {count} relays")
    return [_delivered(answer) if type(answer) is int else refusal(_text(answer)) for answer in reply]


def _settle(outcome, d: defer.Deferred) -> None:
    """Fire ``d`` with what :meth:`RedisRegistry.relay_across` answered."""
    if isinstance(outcome, Exception):
        d.errback(outcome)
    else:
        d.callback(outcome)


def _transitions(reply):
    """Turn a script's reply into transitions, or raise the refusal it names."""
    reply = [_text(x) for x in reply]
    if reply and reply[0] != "":
        raise refusal(reply[0])
    return [
        Transition(reply[i], reply[i + 1], reply[i + 2], reply[i + 3] or None)
        for i in range(1, len(reply), 4)
    ]


@implementer(IRegistry, ISessions)
class RedisRules:
    """
    The pairing rules and sessions as the Lua scripts apply them in Redis,
    over any way of running a script: ``execute(name, *args)`` runs
    ``SCRIPTS[name]`` with ``ARGV`` = (prefix, *args) and returns its
    reply, or a Deferred of it (:class:`RedisRegistry` uses :mod:`signaling.redis_wire`; the
    tests also use a blocking client, to hold both registries to one
    behaviour suite).

    :param node: the node whose peers :meth:`add` registers.
    :param clock: ``seconds()`` for the time a peer arrived.
    :param grace: seconds a peer whose socket was lost stays in its grace period.
    :param queue_limit: frames queued for a peer in its grace period, at most.
    :param queue_bytes: bytes queued for a peer in its grace period, at most.
    """

    def __init__(self, execute, node: str, clock, grace: float = 15.0, queue_limit: int = 256,
                 queue_bytes: int = 1024 * 1024):
        self._run_script = execute
        self.node = node
        self.clock = clock
        self.grace = grace
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        self._settings = (str(queue_limit), str(queue_bytes), str(int(grace * 1000)))

    def _execute(self, name, *args):
        return self._run_script(name, *self._settings, *args)

    def add(self, peer_id, ip, conn=""):
        at = self.clock.seconds()

        def added(reply):
            if reply and _text(reply[0]) == "taken":
                raise PeerIdTaken(peer_id)
            return Peer(peer_id, ip, at, self.node)

        return then(self._execute("add", peer_id, self.node, ip, repr(at), conn), added)

    def remove(self, peer_id, conn=""):
        return then(self._execute("remove", peer_id, self.node, conn), _transitions)

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

        def routed(outcomes):
            if isinstance(outcomes[0], SignalingError):
                raise outcomes[0]
            return outcomes[0]

        return then(self.check_and_route_many([(sender, to, frame)]), routed)

    def check_and_route_many(self, relays):
        """
        :meth:`check_and_route` for each ``(sender, to, frame)`` of
        ``relays``, in order, as one script: answers a list with, for each,
        what ``check_and_route`` answers or the refusal it would raise (a
        :class:`~signaling.errors.SignalingError`, returned).  The frames
        for one node's peers go in one publish.
        """
        args: list = []
        for sender, to, frame in relays:
            args += (sender, to, frame)
        return then(self._execute("check_and_route_many", *args), lambda reply: _outcomes(reply, len(relays)))

    def route(self, to, frame: bytes):
        """
        Publish a frame for a peer on another node, or queue it for a peer in
        its grace period; answers whether a node took it (or the queue), or
        ``QUEUE_FULL``.
        """
        return then(self._execute("route", to, frame.decode("utf-8")), _delivered)

    # -- sessions (resume) ---------------------------------------------------------

    def suspend(self, peer_id, conn, ip):
        """
        Begin ``peer_id``'s grace period if ``conn`` on this node still
        holds it; answers its deadline (Redis clock, ms), or 0 if not.
        """
        return self._execute("suspend", peer_id, self.node, conn)

    def resume(self, peer_id, ip, at, conn):
        """
        As :meth:`ISessions.resume`, in one script; or ``(SETTLING, [])``:
        the node that lost the peer's socket has not yet handed over what
        reached it then (``settle``), and nothing changed: ask again shortly.
        """

        def outcome(reply):
            kind = _text(reply[0])
            frames = [f if isinstance(f, bytes) else f.encode("utf-8") for f in reply[1:]]
            return {"resumed": RESUMED, "moved": MOVED, "new": NEW, "settling": SETTLING}[kind], frames

        return then(self._execute("resume", peer_id, self.node, ip, repr(at), conn), outcome)

    def expire(self, peer_id, conn):
        """
        End the grace period that the loss of ``conn`` began: the peer is
        removed, its watchers get ``peer_left``.  Answers how many queued
        frames were dropped, or -1 if the peer is not in that grace period
        any more (it resumed).
        """
        return self._execute("expire", peer_id, conn)

    def forward(self, peer_id, frames):
        """
        Pass on frames that reached this node for a peer no longer connected
        to it: queued if it is in grace, published to its node if it is on
        another one.  Answers how many were passed on.
        """
        return self._execute("forward", peer_id, self.node, *[f.decode("utf-8") for f in frames])

    def settle(self, peer_id, conn, frames):
        """
        Hand over the frames that reached this node for ``peer_id`` between
        the loss of ``conn``'s socket and ``!settled``: queued in front of
        those queued since, if that grace period is still on (a resume
        waits until this has run); else passed on as :meth:`forward` does.
        Answers how many were passed on.
        """
        return self._execute("settle", peer_id, self.node, conn, *[f.decode("utf-8") for f in frames])

    def peers(self):
        return then(self._execute("peers"), _peers)

    def peers_lazily(self):
        """Like :meth:`peers`, each peer parsed as it is iterated (the stats read them in slices)."""
        return then(self._execute("peers"), lambda flat: (_peer(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)))

    def summary(self):
        def count(peers):
            counts = {"idle": 0, "connecting": 0, "connected": 0}
            for p in peers:
                counts[p.state] += 1
            offline = sum(1 for p in peers if not p.online)
            return {"users": len(peers), **counts, "pairs": counts["connected"] // 2, "offline": offline}

        return then(self.peers(), count)


def _peers(flat):
    return [_peer(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _peer(key, value):
    info = json.loads(value)
    peer = Peer(_text(key), info["ip"], float(info["at"]), info["n"])
    peer.state = info["s"]
    peer.target = info["t"] or None
    peer.online = info.get("o") != 0
    return peer


def parse_url(url: str):
    """``redis://[:password@]host[:port][/db]`` -> (host, port, db, password)."""
    parts = urlparse(url)
    if parts.scheme != "redis":
        raise ValueError(f"not a redis:// URL: {url!r}")
    db = int(parts.path.lstrip("/") or 0)
    return parts.hostname or "127.0.0.1", parts.port or 6379, db, parts.password


#: the registry's states, as /api/health reports them
STARTING, CONNECTED, DISCONNECTED = "starting", "connected", "disconnected"


class _Limbo:
    """
    Frames that reach this node for a peer between the loss of its socket
    and the moment Redis has put it in grace (``!settled``): queued again
    in front of what Redis queued after.
    """

    __slots__ = ("conn", "frames", "size", "done", "timer")

    def __init__(self, conn: str):
        self.conn = conn
        self.frames: list = []
        self.size = 0  # bytes in frames
        self.done: defer.Deferred = defer.Deferred()
        self.timer = None


@implementer(IClusterRegistry, ISessions)
class RedisRegistry(RedisRules, Service):
    """
    The registry shared by the nodes: :class:`RedisRules` run through a
    lean connection of :mod:`signaling.redis_wire`, this node's channel (a subscriber connection
    of the same module), heartbeats and the reaper.

    :param url: ``redis://host:port/db``.
    :param node: this node's id.
    :param clock: ``seconds``/``callLater`` for timestamps, heartbeats and
        timeouts (a ``Clock`` in tests).
    :param node_timeout: seconds without a heartbeat after which a node's
        peers are removed.
    :param op_timeout: seconds an operation may wait for Redis.
    :param reactor: what connects to Redis (the global reactor by default).
    :param grace: seconds a peer whose socket was lost may resume in.
    :param queue_limit: frames queued for a peer in its grace period, at most.
    :param queue_bytes: bytes queued for a peer in its grace period, at most.

    The node is :attr:`ready` (peers may be admitted) once it is registered:
    its channel subscribed, its heartbeat recorded and its peers in Redis.
    Until then (``starting``), and whenever Redis is unreachable
    (``disconnected``), it is not.
    """

    _log = Logger()

    def __init__(self, url, node, clock, node_timeout=10.0, prefix="signaling:", op_timeout=5.0, reactor=None,
                 grace=15.0, queue_limit=256, queue_bytes=1024 * 1024):
        RedisRules.__init__(self, self._run, node, clock, grace, queue_limit, queue_bytes)
        self.url = url
        self.reactor = clock if reactor is None else reactor
        self.node_timeout = node_timeout
        self.prefix = prefix
        self.op_timeout = op_timeout
        self.host, self.port, self.db, self.password = parse_url(url)
        self._local = _NoLocalPeers()  # until attach()
        self.state = STARTING
        self.state_since = clock.seconds()
        self._link: Optional[RedisLink] = None  # the command connection (scripts)
        self._subscriber = None
        self._listening = False  # this node's channel is subscribed
        self._beating = None  # the heartbeat (or registration) in flight
        self._waiting_ready = []
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = clock
        #: the cluster's resume secret (shared through Redis), once registered
        self.resume_secret = None
        self._limbo = {}  # peer id -> _Limbo, while its suspension settles
        self._expiries = {}  # (peer id, conn) -> the timer that ends that grace period
        self._resuming = {}  # peer id -> _Limbo, while its resume script runs
        self.latency = Histogram()  # of every script's round trip (metrics)
        self.expired = 0  # grace periods this node ended (metrics)
        self.node_channel = prefix + "to:" + node
        self._node_channel = self.node_channel.encode("utf-8")
        #: handler(channel, message) of the messages on channels other than this node's, if any
        self.channel_handler = None
        #: called with the subscriber connection whenever it is (re)connected and this node's channel subscribed
        self.subscriber_hooks = []
        self._relays = None  # (sender, to, frame, answer, args) held in this turn (relay_across)

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
        self._link = RedisLink(endpoint, SCRIPTS, self.clock, self.reactor, db=self.db, password=self.password,
                               timeout=self.op_timeout, on_ready=self._register, on_lost=self._lost)
        self._link.start()
        self._subscriber = SubscriberLink(endpoint, self.reactor, self._subscribed, self._subscriber_lost,
                                          self._published, password=self.password)
        self._subscriber.start()
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
        for timer in self._expiries.values():
            if timer.active():
                timer.cancel()  # (the other nodes' reapers end those periods)
        self._expiries.clear()
        d = defer.gatherResults([self._link.stop(), self._subscriber.stop()], consumeErrors=True)
        d.addErrback(lambda _: None)
        return d

    # -- connection state ----------------------------------------------------------

    def _subscribed(self, protocol):
        d = protocol.subscribe(self.node_channel)

        def listening(_):
            self._listening = True
            for hook in self.subscriber_hooks:
                hook(protocol)
            self._register()

        d.addCallback(listening)
        d.addErrback(lambda f: self._log.warn("redis: subscribing failed: {e}", e=f.getErrorMessage()))

    def _subscriber_lost(self):
        self._listening = False
        self._lost()

    def _published(self, channel: bytes, message: bytes):
        """A message on a channel this node subscribed to: its own (peers here), or another module's (topics)."""
        if channel == self._node_channel or self.channel_handler is None:
            self._message(message)
        else:
            self.channel_handler(channel.decode("utf-8", "replace"), message)  # (yjs topics)

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

    def _got_secret(self, secret):
        self.resume_secret = _text(secret).encode("ascii")

    def _set_state(self, state, sync=None):
        if state == self.state:
            return
        self.state = state
        self.state_since = self.clock.seconds()
        self._local.forget_links()  # (registered anew, or cut off: nothing Redis said about pairs holds)
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
        if self._relays:  # (relays held in this turn were called first: they run first)
            self._flush_relays()
        if not self._reachable():
            self._lost()
            return defer.fail(Unavailable(CLUSTER_UNREACHABLE))
        started = perf_counter()
        d = self._link.run(name, (self.prefix, *args))
        # (answers late: the link drops its connection at op_timeout, failing what waits)
        d.addCallbacks(self._timed, self._failed, callbackArgs=(started,), errbackArgs=(name,))
        return d

    def _timed(self, result, started):
        self.latency.observe(perf_counter() - started)
        return result

    def _failed(self, failure, name):
        if failure.check(SignalingError):
            return failure
        self._log.warn("redis: {name} failed: {error}", name=name, error=failure.getErrorMessage())
        if failure.check(ConnectionLost):
            self._lost()
        raise Unavailable(CLUSTER_UNREACHABLE)

    def relay_across(self, sender, to, frame: bytes, answer, *args) -> None:
        """
        :meth:`~RedisRules.check_and_route`, answered to ``answer(outcome,
        *args)`` (``IClusterRegistry.relay_across``).  The relays called in
        one reactor turn (up to :attr:`RELAY_BATCH`) are checked and
        published together (:meth:`~RedisRules.check_and_route_many`): one
        command and one answer for them all, one publish for each node's
        frames.  They are sent at the end of the turn, or before this
        node's next operation if that comes first, so Redis still runs this
        node's operations in the order they were called.
        """
        if not self._reachable():
            self._lost()
            answer(Unavailable(CLUSTER_UNREACHABLE), *args)
            return
        held = self._relays
        if held is None:
            held = self._relays = []
            self.reactor.callLater(0, self._flush_relays)
        held.append((sender, to, frame, answer, args))
        if len(held) >= self.RELAY_BATCH:
            self._flush_relays()

    def check_and_route(self, sender, to, frame: bytes) -> defer.Deferred:
        """As :meth:`relay_across`, answering a Deferred (that fails with a refusal)."""
        d: defer.Deferred = defer.Deferred()
        self.relay_across(sender, to, frame, _settle, d)
        return d

    #: relays that go to Redis as one script, at most (Redis spends about 3 us on each)
    RELAY_BATCH = 64

    def _flush_relays(self) -> None:
        held, self._relays = self._relays, None
        if held:
            d = self.check_and_route_many([relay[:3] for relay in held])
            d.addCallbacks(self._relays_answered, self._relays_failed, callbackArgs=(held,), errbackArgs=(held,))

    def _relays_answered(self, outcomes, held) -> None:
        for (_, _, _, answer, args), outcome in zip(held, outcomes):
            try:
                answer(outcome, *args)
            except Exception:  # (one caller's fault must not cost the others their answers)
                self._log.failure("answering a relay failed")

    def _relays_failed(self, failure, held) -> None:
        if not failure.check(SignalingError):
            self._log.failure("redis: relays failed", failure)
        self._relays_answered([failure.value] * len(held), held)

    def route(self, to, frame: bytes):
        """As :meth:`RedisRules.route`; a failure (Redis unreachable) answers "not delivered"."""
        return RedisRules.route(self, to, frame).addErrback(lambda _: False)

    # -- cluster upkeep ------------------------------------------------------------------

    def _reachable(self) -> bool:
        return self._listening and self._link is not None and self._link.ready

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
            d = self._execute("heartbeat", self.node).addCallback(self._beaten)
        else:
            d = self._execute("secret", os.urandom(32).hex()).addCallback(self._got_secret)
            d.addCallback(lambda _: self._sync()).addCallback(lambda result: self._set_state(CONNECTED, result))
        d.addCallback(lambda _: self._execute("reap", str(int(self.node_timeout * 1000)), self.node))
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

    def _reaped(self, reply):
        graced, removed = reply[0], reply[1:]
        if graced:
            self._log.warn(
                "redis: {count} peers of nodes silent for over {timeout}s are in grace for {grace}s",
                count=graced, timeout=self.node_timeout, grace=self.grace,
            )
        if removed:
            self._log.info(
                "redis: removed {count} peers (their node was silent, or their grace period ended)",
                count=len(removed),
            )

    def _sync(self):
        """Record the heartbeat and make Redis hold exactly this node's live peers."""
        self._local.forget_links()  # (perhaps reaped meanwhile: its pairs may be gone from Redis)
        args = []
        for peer_id, ip, at, conn in self._local.local_peers():
            args += [peer_id, ip, repr(at), conn]

        def synced(reply):
            stale = [_text(x) for x in reply[2:]]
            for peer_id in stale:  # resumed elsewhere while this node was cut off
                self._local.evict(peer_id, None)
            return reply[0], reply[1]

        return self._execute("sync", self.node, *args).addCallback(synced)

    # -- sessions (resume) ---------------------------------------------------------

    def suspend(self, peer_id, conn, ip):
        """
        As :meth:`RedisRules.suspend`; frames that reach this node for the
        peer until Redis has put it in grace are held and queued again, in
        front (see :class:`_Limbo`).  Fires once Redis's answer is handled
        and the hand-over done (``settle``); the grace period is ended by
        this node when due (by the reaper if it dies).
        """
        previous = self._limbo.pop(peer_id, None)
        if previous is not None:
            self._settle(peer_id, previous)
        limbo = self._limbo[peer_id] = _Limbo(conn)
        limbo.timer = self.clock.callLater(self.op_timeout, self._settled, peer_id, conn)

        def suspended(deadline):
            if not deadline:  # not this connection's any more: nothing will settle
                self._settled(peer_id, conn)
                return
            self._expiries[peer_id, conn] = self.clock.callLater(self.grace, self._expire, peer_id, conn)

        def failed(failure):
            self._log.warn("peer {peer} not put in grace: {why}", peer=peer_id, why=failure.getErrorMessage())
            self._settled(peer_id, conn)

        answered = RedisRules.suspend(self, peer_id, conn, ip).addCallbacks(suspended, failed)
        # (Redis writes !settled to the subscriber before the script's answer:
        # the grace period's timer is set when the answer is handled)
        both = defer.gatherResults([limbo.done, answered], consumeErrors=True)
        return both.addCallback(lambda _: None)

    def _settled(self, peer_id, conn):
        limbo = self._limbo.get(peer_id)
        if limbo is not None and (conn is None or limbo.conn == conn):
            del self._limbo[peer_id]
            self._settle(peer_id, limbo)

    def _settle(self, peer_id, limbo):
        if limbo.timer is not None and limbo.timer.active():
            limbo.timer.cancel()
        frames = limbo.frames
        if frames and self._deliver_here(peer_id, frames):
            limbo.done.callback(None)
            return
        # (even with no frames: a resume waits for this hand-over)
        handed = self._lost_if_failed(self.settle(peer_id, limbo.conn, frames), peer_id, frames)
        handed.addBoth(lambda _: limbo.done.callback(None))

    def _pass_on(self, peer_id, frames):
        """Frames for a peer not connected here: to it if it is here again, else through Redis."""
        if not self._deliver_here(peer_id, frames):
            self._lost_if_failed(self.forward(peer_id, frames), peer_id, frames)

    def _deliver_here(self, peer_id, frames) -> bool:
        """Deliver ``frames`` if ``peer_id`` is connected here (again); return whether it is."""
        if not self._local.deliver_local(peer_id, frames[0]):
            return False
        for frame in frames[1:]:
            self._local.deliver_local(peer_id, frame)
        return True

    def _lost_if_failed(self, d, peer_id, frames):
        return d.addErrback(lambda f: self._log.warn(
            "redis: {count} messages for peer {peer} lost: {why}",
            count=len(frames), peer=peer_id, why=f.getErrorMessage(),
        ))

    def _expire(self, peer_id, conn):
        self._expiries.pop((peer_id, conn), None)

        def expired(dropped):
            if dropped >= 0:
                self.expired += 1
                self._log.info(
                    "peer {peer} did not resume within {grace}s: removed ({queued} queued messages dropped)",
                    peer=peer_id, grace=self.grace, queued=dropped,
                )

        d = self.expire(peer_id, conn).addCallback(expired)
        d.addErrback(lambda f: None)  # logged by _run; the reaper ends it instead
        return d

    def resume(self, peer_id, ip, at, conn):
        """
        As :meth:`RedisRules.resume`.  Frames published to this node for the
        peer while the script runs wait, and follow the queued ones.  While
        the node that lost its socket has not handed over what reached it
        then (``SETTLING``: about a round trip, at most 2 s if that node
        died), the script is run again, 2 ms later, then 4, 8, ... up to
        100 ms apart.
        """
        waiting = self._resuming[peer_id] = _Limbo(conn)
        result: defer.Deferred = defer.Deferred()
        pause = [0.002]

        def attempt():
            RedisRules.resume(self, peer_id, ip, at, conn).addCallbacks(done, failed)

        def done(outcome):
            kind, frames = outcome
            if kind is SETTLING:
                self.clock.callLater(pause[0], attempt)
                pause[0] = min(pause[0] * 2, 0.1)
                return
            self._resuming.pop(peer_id, None)
            result.callback((kind, frames + waiting.frames))

        def failed(failure):
            self._resuming.pop(peer_id, None)
            result.errback(failure)

        attempt()
        return result

    def _message(self, message: bytes):
        if message[:1] == b"*":  # several frames (check_and_route_many.lua): '<id>\n<length>\n<frame>' each
            pos, end = 1, len(message)
            try:
                while pos < end:
                    a = message.index(b"\n", pos)
                    b = message.index(b"\n", a + 1)
                    start = b + 1
                    size = int(message[a + 1:b])
                    if size < 0 or start + size > end:
                        raise ValueError(size)
                    to, pos = message[pos:a].decode("utf-8"), start + size
                    self._frame(to, message[start:pos])
            except ValueError:  # (UnicodeDecodeError too) no script of ours publishes that
                self._log.warn("redis: an unreadable batch of frames on this node's channel; dropped the rest")
            return
        head, _, payload = message.partition(b"\n")
        to = head.decode("utf-8")
        if payload[:1] == b"!":  # a control message (see the module's docstring)
            kind, _, conn = payload[1:].decode("utf-8").partition(":")
            if kind == "settled":
                self._settled(to, conn)
            elif kind == "evict":
                self._local.evict(to, conn)
            return
        self._frame(to, payload)

    def _frame(self, to: str, payload: bytes) -> None:
        """A frame published for peer ``to`` of this node."""
        waiting = self._limbo.get(to) or self._resuming.get(to)
        if waiting is not None:
            if len(waiting.frames) >= self.queue_limit or waiting.size + len(payload) > self.queue_bytes:
                self._log.warn("redis: a message for peer {peer} dropped: too many wait for it", peer=to)
                return
            waiting.frames.append(payload)
            waiting.size += len(payload)
        elif not self._local.deliver_local(to, payload):
            # not connected here (any more): it resumed elsewhere, or is in grace
            self._pass_on(to, [payload])


@implementer(ILocalPeers)
class _NoLocalPeers:
    """Before :meth:`RedisRegistry.attach`: no local peers."""

    def deliver_local(self, to, frame):
        return False

    def local_peers(self):
        return []

    def evict(self, peer_id, conn):
        pass

    def forget_links(self):
        pass


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time()) % 100000}"
