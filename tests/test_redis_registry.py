"""
Tier 2: the Redis registry's liveness rules (heartbeats, the reaper,
registration before admission) in process, against a real redis-server,
with each node's timers on its own fake clock.

Redis's own clock cannot be faked: where a test needs "this node has been
silent for longer than the timeout", the reaping node runs with a timeout of
0, so that every other node is past it at once.
"""
import json

import pytest
import redis
from redis_server import RedisServer
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.trial import unittest
from zope.interface import implementer

from signaling.redis_registry import RedisRegistry
from signaling.registry import IClusterRegistry, ILocalPeers

pytestmark = pytest.mark.redis

PREFIX = "t:"


@implementer(ILocalPeers)
class Node:
    """One node's registry, on a fake clock, recording what it delivers to its local peers."""

    def __init__(self, url, name, node_timeout):
        self.clock = Clock()
        self.registry = RedisRegistry(
            url, name, self.clock, node_timeout=node_timeout, prefix=PREFIX, reactor=reactor
        )
        self.delivered = []
        self._waiting = []
        self.peers = {}  # id -> (ip, at): this node's open connections
        self.registry.attach(self)

    def local_peers(self):
        return [(i, ip, at) for i, (ip, at) in self.peers.items()]

    def deliver_local(self, to, frame):
        self.delivered.append((to, json.loads(frame)))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
        return to in self.peers

    def delivery(self):
        """Fires once a frame has been delivered to this node (at once if one has been)."""
        if self.delivered:
            return succeed(None)
        d = Deferred()
        self._waiting.append(d)
        return d

    @inlineCallbacks
    def add(self, peer_id):
        peer = yield self.registry.add(peer_id, "127.0.0.1")
        self.peers[peer_id] = ("127.0.0.1", peer.connected_at)

    def beat(self):
        """Let one heartbeat interval pass on this node's clock; fires when its heartbeat is done."""
        self.clock.advance(self.registry.heartbeat_interval)
        return self.registry._beating


class RegistryLiveness(unittest.TestCase):
    timeout = 30  # seconds, for each test (trial's default is 120)

    def setUp(self):
        self.server = RedisServer().start()
        self.addCleanup(self.server.cleanup)
        self.redis = redis.Redis(port=self.server.port, decode_responses=True)
        self.addCleanup(self.redis.close)

    @inlineCallbacks
    def start(self, name, node_timeout=10.0):
        node = Node(self.server.url, name, node_timeout)
        self.assertTrue(IClusterRegistry.providedBy(node.registry))
        self.assertFalse(node.registry.ready)
        self.assertEqual(node.registry.health()["redis"], "starting")
        node.registry.startService()
        self.addCleanup(lambda: node.registry.running and node.registry.stopService())
        yield node.registry.whenReady()  # registered as soon as Redis answers, not at the first beat
        if node.registry._beating is not None:
            yield node.registry._beating  # the rest of that first upkeep (its reap), so tests start quiet
        return node

    def tracked(self, name):
        return self.redis.zscore(PREFIX + "nodes", name) is not None

    def stored(self, peer_id):
        raw = self.redis.hget(PREFIX + "peers", peer_id)
        return None if raw is None else json.loads(raw)

    @inlineCallbacks
    def test_registered_and_tracked_before_admitting_peers(self):
        """A node is ready once its heartbeat is in Redis, without waiting for its first heartbeat interval."""
        a = yield self.start("a")
        self.assertTrue(a.registry.ready)
        self.assertEqual(a.registry.health()["redis"], "connected")
        self.assertTrue(self.tracked("a"))
        self.assertEqual(a.clock.seconds(), 0)  # no heartbeat interval has passed

    @inlineCallbacks
    def test_adding_a_peer_records_its_node_heartbeat(self):
        """The script that adds a peer tracks its node in the same step: no peer without a tracked node."""
        a = yield self.start("a")
        self.redis.zrem(PREFIX + "nodes", "a")  # as before a node's first heartbeat
        yield a.add("p1")
        self.assertEqual(self.stored("p1")["n"], "a")
        self.assertTrue(self.tracked("a"))

    @inlineCallbacks
    def test_node_dead_before_its_first_heartbeat_is_reaped(self):
        """
        A node that added a peer, paired it across nodes and died before any
        heartbeat of its own is found by the reaper: the peer is removed and
        its partner on another node gets peer_left.
        """
        a = yield self.start("a", node_timeout=0)
        c = yield self.start("c")
        self.redis.zrem(PREFIX + "nodes", "c")  # c has not beaten yet: only its add can track it
        yield a.add("a1")
        yield c.add("c1")
        yield a.registry.ping("a1", "c1")
        yield c.registry.pong("c1", "a1")
        self.assertEqual(self.stored("a1")["s"], "connected")
        yield c.registry.stopService()  # c dies: no more heartbeats, nothing cleaned up
        yield a.beat()
        self.assertIsNone(self.stored("c1"))
        self.assertEqual(self.stored("a1")["s"], "idle")
        self.assertFalse(self.tracked("c"))
        self.assertTrue(self.tracked("a"))  # the reaper never removes its own node
        yield a.delivery()  # published by the reaper's script, through a's channel
        self.assertEqual(
            a.delivered, [("a1", {"type": "disconnect", "from": "c1", "data": {"reason": "peer_left"}})]
        )

    @inlineCallbacks
    def test_live_node_is_not_reaped_within_the_timeout(self):
        """A node that beat within the timeout keeps its peers when others reap."""
        a = yield self.start("a", node_timeout=3600)
        c = yield self.start("c")
        yield c.add("c1")
        yield a.beat()
        self.assertIsNotNone(self.stored("c1"))
        self.assertTrue(self.tracked("c"))

    @inlineCallbacks
    def test_untracked_live_node_registers_its_peers_again(self):
        """A live node reaped by another (or forgotten by Redis) puts its live peers back at its next beat."""
        a = yield self.start("a")
        reaper = yield self.start("reaper", node_timeout=0)
        yield a.add("a1")
        yield a.add("a2")
        del a.peers["a2"]  # a2's socket closed while a was cut off: it must not come back
        yield reaper.beat()
        self.assertIsNone(self.stored("a1"))
        self.assertFalse(self.tracked("a"))
        yield a.beat()
        self.assertTrue(self.tracked("a"))
        self.assertEqual(self.stored("a1")["n"], "a")
        self.assertEqual(self.stored("a1")["s"], "idle")
        self.assertIsNone(self.stored("a2"))
        self.assertEqual(self.redis.smembers(PREFIX + "node:a"), {"a1"})

    def test_provides_the_cluster_interface(self):
        """The Redis registry provides IClusterRegistry, verified against the interface's declarations."""
        from zope.interface.verify import verifyObject

        node = Node(self.server.url, "n1", 10.0)
        self.assertTrue(verifyObject(IClusterRegistry, node.registry))
