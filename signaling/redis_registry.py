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
from urllib.parse import urlparse

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from signaling.registry import IClusterRegistry, Peer, PeerIdTaken, SignalingError, Transition


class Unavailable(SignalingError):
    code = "unavailable"


# Shared Lua: peers are JSON in one hash; "" stands for "no target".
_PRELUDE = r"""
local P = ARGV[1]
local PEERS = P .. 'peers'
local trans = {''}
local function get(id)
  local v = redis.call('HGET', PEERS, id)
  if v then return cjson.decode(v) end
  return nil
end
local function put(id, p) redis.call('HSET', PEERS, id, cjson.encode(p)) end
-- the Redis clock in ms: one clock for every node's heartbeats
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- record that a node is alive; 1 if it was not tracked until now
local function beat(node) return redis.call('ZADD', P .. 'nodes', now_ms(), node) end
local function set(id, p, state, target)
  table.insert(trans, id); table.insert(trans, p.s)
  table.insert(trans, state); table.insert(trans, target)
  if p.t ~= target then
    if p.t ~= '' then redis.call('SREM', P .. 'watch:' .. p.t, id) end
    if target ~= '' then redis.call('SADD', P .. 'watch:' .. target, id) end
  end
  p.s = state; p.t = target
  put(id, p)
end
local function pair(a_id, b_id)
  local a = get(a_id)
  if not a then return nil, nil, {'peer-not-found', 'you are not registered'} end
  if a_id == b_id then return nil, nil, {'peer-not-found', 'you cannot signal yourself'} end
  local b = get(b_id)
  if not b then return nil, nil, {'peer-not-found', 'no connected peer has that id'} end
  return a, b, nil
end
-- the offer/answer/ICE check: both registered, and the sender connected to the target
local function paired(a_id, b_id)
  local a, b, err = pair(a_id, b_id)
  if err then return nil, nil, err end
  if not (a.s == 'connected' and a.t == b_id) then
    return nil, nil, {'invalid-state', 'you are not connected to that peer; pair with ping/pong first'}
  end
  return a, b, nil
end
-- forget a peer; its watchers go idle; with notify, they are sent peer_left
local function drop(id, notify)
  local p = get(id)
  if not p then return end
  redis.call('HDEL', PEERS, id)
  redis.call('SREM', P .. 'node:' .. p.n, id)
  if p.t ~= '' then redis.call('SREM', P .. 'watch:' .. p.t, id) end
  local left = cjson.encode({type = 'disconnect', from = id, data = {reason = 'peer_left'}})
  for _, w in ipairs(redis.call('SMEMBERS', P .. 'watch:' .. id)) do
    local wp = get(w)
    if wp then
      set(w, wp, 'idle', '')
      if notify then redis.call('PUBLISH', P .. 'to:' .. wp.n, w .. '\n' .. left) end
    end
  end
  redis.call('DEL', P .. 'watch:' .. id)
end
"""

_SCRIPTS = {
    # ARGV: prefix, id, node, ip, at.  The node's heartbeat is recorded with
    # the peer: a node that dies before its first heartbeat is still reaped.
    "add": r"""
if redis.call('HEXISTS', PEERS, ARGV[2]) == 1 then return {'taken'} end
beat(ARGV[3])
put(ARGV[2], {n = ARGV[3], ip = ARGV[4], at = tonumber(ARGV[5]), s = 'idle', t = ''})
redis.call('SADD', P .. 'node:' .. ARGV[3], ARGV[2])
return trans
""",
    # ARGV: prefix, id
    "remove": r"""
drop(ARGV[2], false)
return trans
""",
    # ARGV: prefix, sender, to
    "ping": r"""
local a, b, err = pair(ARGV[2], ARGV[3])
if err then return err end
if a.s == 'connected' then
  if a.t == ARGV[3] then return trans end
  return {'invalid-state', 'you are connected to another peer; send disconnect to it first'}
end
if b.s == 'connected' then return {'peer-busy', 'that peer is connected to someone else'} end
if a.s == 'connecting' and a.t == ARGV[3] then return trans end
set(ARGV[2], a, 'connecting', ARGV[3])
return trans
""",
    "pong": r"""
local b, a, err = pair(ARGV[2], ARGV[3])
if err then return err end
if b.s == 'connected' and b.t == ARGV[3] then return trans end
if a.s == 'connecting' and a.t == ARGV[2] and b.s ~= 'connected' then
  set(ARGV[3], a, 'connected', ARGV[2])
  set(ARGV[2], b, 'connected', ARGV[3])
  return trans
end
return {'invalid-state', 'that peer is not waiting for a pong from you'}
""",
    "check_paired": r"""
local a, b, err = paired(ARGV[2], ARGV[3])
if err then return err end
return trans
""",
    "disconnect": r"""
local a, b, err = pair(ARGV[2], ARGV[3])
if err then return err end
if a.t ~= ARGV[3] then return {'invalid-state', 'you are not connecting or connected to that peer'} end
set(ARGV[2], a, 'idle', '')
if b.t == ARGV[2] then set(ARGV[3], b, 'idle', '') end
return trans
""",
    # ARGV: prefix, sender, to, frame -> check_paired's error, or {'', receivers of
    # the publish on the target's node}: the check and the delivery in one round trip
    "check_and_route": r"""
local a, b, err = paired(ARGV[2], ARGV[3])
if err then return err end
return {'', redis.call('PUBLISH', P .. 'to:' .. b.n, ARGV[3] .. '\n' .. ARGV[4])}
""",
    # ARGV: prefix, to, frame -> receivers of the publish, or -1 if no such peer
    "route": r"""
local p = get(ARGV[2])
if not p then return -1 end
return redis.call('PUBLISH', P .. 'to:' .. p.n, ARGV[2] .. '\n' .. ARGV[3])
""",
    # ARGV: prefix, node -> 1 if the node was not tracked (reaped, or Redis
    # lost it): its peers must then be registered again
    "heartbeat": r"""
return beat(ARGV[2])
""",
    # ARGV: prefix, timeout_ms, the calling node (alive: never reaped) -> ids removed
    "reap": r"""
local removed = {}
for _, node in ipairs(redis.call('ZRANGEBYSCORE', P .. 'nodes', '-inf', now_ms() - tonumber(ARGV[2]))) do
  if node ~= ARGV[3] then
    for _, id in ipairs(redis.call('SMEMBERS', P .. 'node:' .. node)) do
      drop(id, true)
      table.insert(removed, id)
    end
    redis.call('DEL', P .. 'node:' .. node)
    redis.call('ZREM', P .. 'nodes', node)
  end
end
return removed
""",
    # ARGV: prefix, node, then id, ip, at triples of this node's live peers.
    # Record the node's heartbeat, forget its peers that are gone (their
    # watchers get peer_left), and register the live ones that Redis lost (idle).
    "sync": r"""
local node = ARGV[2]
beat(node)
local live = {}
for i = 3, #ARGV, 3 do live[ARGV[i]] = true end
local dropped, added = 0, 0
for _, id in ipairs(redis.call('SMEMBERS', P .. 'node:' .. node)) do
  if not live[id] then drop(id, true); dropped = dropped + 1 end
end
for i = 3, #ARGV, 3 do
  local id = ARGV[i]
  local p = get(id)
  if not p then
    put(id, {n = node, ip = ARGV[i + 1], at = tonumber(ARGV[i + 2]), s = 'idle', t = ''})
    redis.call('SADD', P .. 'node:' .. node, id)
    added = added + 1
  end
end
return {dropped, added}
""",
}


def _transitions(reply):
    """Turn a script's reply into transitions, or raise its error."""
    reply = [x.decode("utf-8") if isinstance(x, bytes) else x for x in reply]
    if reply and reply[0] != "":
        error = SignalingError(reply[1])
        error.code = reply[0]
        raise error
    return [
        Transition(reply[i], reply[i + 1], reply[i + 2], reply[i + 3] or None)
        for i in range(1, len(reply), 4)
    ]


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
class RedisRegistry(Service):
    """
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
        self.url = url
        self.node = node
        self.clock = clock
        self.reactor = clock if reactor is None else reactor
        self.node_timeout = node_timeout
        self.prefix = prefix
        self.op_timeout = op_timeout
        self.host, self.port, self.db, self.password = parse_url(url)
        self.deliver_local = lambda to, frame: False  # set by the factory's owner
        self.local_peers = lambda: []  # (id, ip, at) of this node's connections
        self.state = STARTING
        self.state_since = clock.seconds()
        self._scripts = {name: _PRELUDE + body for name, body in _SCRIPTS.items()}
        self._pool = None
        self._subscriber = None
        self._listening = False  # this node's channel is subscribed
        self._beating = None  # the heartbeat (or registration) in flight
        self._waiting_ready = []
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = clock

    @property
    def ready(self) -> bool:
        return self.state == CONNECTED

    def whenReady(self) -> defer.Deferred:
        """A Deferred that fires once this node is (or is again) registered and admitting peers."""
        if self.ready:
            return defer.succeed(None)
        d = defer.Deferred()
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
            return defer.fail(Unavailable("the signaling cluster's state (Redis) is unreachable; try again"))
        d = self._pool.eval(self._scripts[name], [], [self.prefix, *args])
        d.addTimeout(self.op_timeout, self.clock)

        def failed(failure):
            if failure.check(SignalingError):
                return failure
            self._log.warn("redis: {name} failed: {error}", name=name, error=failure.getErrorMessage())
            if failure.check(txredisapi.ConnectionError, defer.TimeoutError, defer.CancelledError):
                self._lost()
            raise Unavailable("the signaling cluster's state (Redis) is unreachable; try again")

        d.addErrback(failed)
        return d

    # -- IRegistry ------------------------------------------------------------------

    def add(self, peer_id, ip):
        at = self.clock.seconds()
        d = self._run("add", peer_id, self.node, ip, repr(at))

        def added(reply):
            if reply and reply[0] in ("taken", b"taken"):
                raise PeerIdTaken(peer_id)
            return Peer(peer_id, ip, at, self.node)

        return d.addCallback(added)

    def remove(self, peer_id):
        return self._run("remove", peer_id).addCallback(_transitions)

    def ping(self, sender, to):
        return self._run("ping", sender, to).addCallback(_transitions)

    def pong(self, sender, to):
        return self._run("pong", sender, to).addCallback(_transitions)

    def check_paired(self, sender, to):
        return self._run("check_paired", sender, to).addCallback(_transitions)

    def disconnect(self, sender, to):
        return self._run("disconnect", sender, to).addCallback(_transitions)

    def check_and_route(self, sender, to, frame: bytes):
        """
        ``check_paired`` and, if it passes, ``route``, in one round trip to
        Redis (for a peer on another node); fires with whether a node took
        the frame, or fails as ``check_paired`` would.
        """
        d = self._run("check_and_route", sender, to, frame.decode("utf-8"))

        def routed(reply):
            if reply[0] not in ("", b""):
                _transitions(reply)  # raises the script's error
            return reply[1] > 0

        return d.addCallback(routed)

    def route(self, to, frame: bytes):
        """Publish a frame for a peer on another node; fires with whether a node took it."""
        d = self._run("route", to, frame.decode("utf-8"))
        return d.addCallbacks(lambda receivers: receivers > 0, lambda f: False)

    def peers(self):
        if self._pool is None or self._pool_factory.size == 0:
            return defer.fail(Unavailable("Redis is unreachable"))
        d = self._pool.hgetall(self.prefix + "peers")
        d.addTimeout(self.op_timeout, self.clock)
        return d.addCallback(self._peers)

    def _peers(self, table):
        out = []
        for peer_id, raw in table.items():
            info = json.loads(raw)
            peer = Peer(peer_id, info["ip"], float(info["at"]), info["n"])
            peer.state = info["s"]
            peer.target = info["t"] or None
            out.append(peer)
        return out

    def summary(self):
        def count(peers):
            counts = {"idle": 0, "connecting": 0, "connected": 0}
            for p in peers:
                counts[p.state] += 1
            return {"users": len(peers), **counts, "pairs": counts["connected"] // 2}

        return self.peers().addCallback(count)

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
        for peer_id, ip, at in self.local_peers():
            args += [peer_id, ip, repr(at)]
        return self._run("sync", self.node, *args)

    def _message(self, message):
        if isinstance(message, bytes):
            message = message.decode("utf-8")
        to, _, frame = message.partition("\n")
        if not self.deliver_local(to, frame.encode("utf-8")):
            self._log.debug("redis: no local peer {to} for a message", to=to)


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time()) % 100000}"
