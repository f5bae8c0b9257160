"""
Tier 2: the Redis registry's liveness rules (heartbeats, the reaper,
registration before admission) in process, against a real redis-server,
with each node's timers on its own fake clock.

Redis's own clock cannot be faked: where a test needs "this node has been
silent for longer than the timeout", the reaping node runs with a timeout of
0, so that every other node is past it at once; where it needs "this grace
period is over", it moves the period's end into the past in Redis.

Nodes run without grace periods (a dead node's peers are removed at once)
unless a test gives them one.
"""
import json

import pytest
import redis
from redis_server import RedisServer
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest
from zope.interface import implementer

from signaling.errors import SignalingError
from signaling.redis_registry import RedisRegistry
from signaling.registry import IClusterRegistry, ILocalPeers

pytestmark = pytest.mark.redis

PREFIX = "t:"


@implementer(ILocalPeers)
class Node:
    """One node's registry, on a fake clock, recording what it delivers to its local peers."""

    def __init__(self, url, name, node_timeout, grace=0.0, queue_limit=256, queue_bytes=1024 * 1024):
        self.clock = Clock()
        self.registry = RedisRegistry(
            url, name, self.clock, node_timeout=node_timeout, prefix=PREFIX, reactor=reactor,
            grace=grace, queue_limit=queue_limit, queue_bytes=queue_bytes,
        )
        self.delivered = []
        self._waiting = []
        self.peers = {}  # id -> (ip, at, conn): this node's open connections
        self.evicted = []  # (id, conn) the registry told this node to close
        self.forgot_links = 0  # how many times the registry said its answers about pairs may no longer hold
        self.registry.attach(self)

    def forget_links(self):
        self.forgot_links += 1

    def local_peers(self):
        return [(i, ip, at, conn) for i, (ip, at, conn) in self.peers.items()]

    def evict(self, peer_id, conn):
        self.evicted.append((peer_id, conn))
        if peer_id in self.peers and conn in (None, self.peers[peer_id][2]):
            del self.peers[peer_id]
        self._notify()

    def deliver_local(self, to, frame):
        self.delivered.append((to, json.loads(frame)))
        self._notify()
        return to in self.peers

    def _notify(self):
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def delivery(self):
        """Fires once a frame has been delivered to (or a peer evicted from) this node (at once if one has been)."""
        if self.delivered or self.evicted:
            return succeed(None)
        d = Deferred()
        self._waiting.append(d)
        return d

    @inlineCallbacks
    def deliveries(self, count):
        """Fires once ``count`` frames have been delivered to this node."""
        while len(self.delivered) < count:
            d = Deferred()
            self._waiting.append(d)
            yield d

    @inlineCallbacks
    def add(self, peer_id, conn=None):
        conn = conn or f"{peer_id}-conn"
        peer = yield self.registry.add(peer_id, "127.0.0.1", conn)
        self.peers[peer_id] = ("127.0.0.1", peer.connected_at, conn)

    def lose(self, peer_id):
        """``peer_id``'s socket here is lost: its grace period begins; fires once that has settled."""
        _, _, conn = self.peers.pop(peer_id)
        return self.registry.suspend(peer_id, conn, "127.0.0.1")

    @inlineCallbacks
    def resume(self, peer_id, conn=None):
        conn = conn or f"{peer_id}-conn2"
        kind, frames = yield self.registry.resume(peer_id, "127.0.0.1", 0.0, conn)
        self.peers[peer_id] = ("127.0.0.1", 0.0, conn)
        return kind, [json.loads(f) for f in frames]

    def beat(self):
        """Let one heartbeat interval pass on this node's clock; fires when its heartbeat is done."""
        self.clock.advance(self.registry.heartbeat_interval)
        return self.registry._beating


class RedisNodes(unittest.TestCase):
    """A redis-server of the test's own, and nodes started on it (:meth:`start`)."""

    timeout = 30  # seconds, for each test (trial's default is 120)

    def setUp(self):
        self.server = RedisServer().start()
        self.addCleanup(self.server.cleanup)
        self.redis = redis.Redis(port=self.server.port, decode_responses=True)
        self.addCleanup(self.redis.close)

    @inlineCallbacks
    def start(self, name, node_timeout=10.0, **kwargs):
        node = Node(self.server.url, name, node_timeout, **kwargs)
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


class RegistryLiveness(RedisNodes):
    """Heartbeats, the reaper, registration before admission."""

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


def offer(n):
    return {"type": "offer", "from": "c1", "data": {"n": n}}


def frame(message):
    return json.dumps(message).encode("utf-8")


class RegistryResume(RedisNodes):
    """Grace periods in Redis: a peer whose socket was lost may resume on any node."""

    @inlineCallbacks
    def pair_across(self, grace=15.0, **limits):
        """Nodes a and c (grace periods on), a1 on a paired with c1 on c."""
        a = yield self.start("a", grace=grace, **limits)
        c = yield self.start("c", grace=grace, **limits)
        yield a.add("a1")
        yield c.add("c1")
        yield a.registry.ping("a1", "c1")
        yield c.registry.pong("c1", "a1")
        return a, c

    @inlineCallbacks
    def test_lost_socket_keeps_the_session_and_queues_in_order(self):
        """
        A peer in grace keeps its state and partner, shows offline, has what
        is sent to it queued, and resumes on another node with the queue in
        order and its pairing intact.
        """
        a, c = yield self.pair_across()
        yield a.lose("a1")
        stored = self.stored("a1")
        self.assertEqual((stored["o"], stored["s"], stored["t"]), (0, "connected", "c1"))
        self.assertEqual(self.redis.smembers(PREFIX + "node:a"), set())
        self.assertIsNotNone(self.redis.zscore(PREFIX + "grace", "a1"))
        peers = {p.id: p for p in (yield c.registry.peers())}
        self.assertFalse(peers["a1"].online)
        self.assertTrue(peers["c1"].online)
        for n in range(3):
            delivered = yield c.registry.check_and_route("c1", "a1", frame(offer(n)))
            self.assertIs(delivered, True)
        kind, frames = yield c.resume("a1")
        self.assertEqual((kind, frames), ("resumed", [offer(0), offer(1), offer(2)]))
        stored = self.stored("a1")
        self.assertEqual((stored.get("o"), stored["n"], stored["s"], stored["t"]), (None, "c", "connected", "c1"))
        self.assertEqual(self.redis.smembers(PREFIX + "node:c"), {"a1", "c1"})
        self.assertIsNone(self.redis.zscore(PREFIX + "grace", "a1"))
        self.assertEqual(self.redis.llen(PREFIX + "q:a1"), 0)
        yield c.registry.check_paired("a1", "c1")  # still paired: offers flow both ways
        self.assertEqual(c.delivered, [])  # the partner was never told peer_left

    @inlineCallbacks
    def test_queue_full(self):
        """Past --resume-queue messages, a sender gets QUEUE_FULL and the frame is not kept."""
        from signaling.errors import QUEUE_FULL

        a, c = yield self.pair_across(queue_limit=2)
        yield a.lose("a1")
        results = []
        for n in range(3):
            results.append((yield c.registry.check_and_route("c1", "a1", frame(offer(n)))))
        results.append((yield c.registry.route("a1", frame(offer(3)))))
        self.assertEqual(results, [True, True, QUEUE_FULL, QUEUE_FULL])
        kind, frames = yield a.resume("a1")
        self.assertEqual(frames, [offer(0), offer(1)])

    @inlineCallbacks
    def test_queue_full_in_bytes(self):
        """The queue also holds at most queue_bytes bytes (--max-outbound-buffer); the count goes with the queue."""
        from signaling.errors import QUEUE_FULL

        a, c = yield self.pair_across(queue_bytes=200)
        yield a.lose("a1")
        big = {"type": "offer", "from": "c1", "data": {"pad": "x" * 30}}
        results = []
        for _ in range(3):
            results.append((yield c.registry.route("a1", frame(big))))
        self.assertEqual(results, [True, True, QUEUE_FULL])
        self.assertEqual(int(self.redis.get(PREFIX + "qb:a1")), 2 * len(frame(big)))
        kind, frames = yield a.resume("a1")
        self.assertEqual(len(frames), 2)
        self.assertEqual(self.redis.exists(PREFIX + "q:a1", PREFIX + "qb:a1"), 0)

    @inlineCallbacks
    def test_grace_period_ends_on_the_suspending_nodes_clock(self):
        """When its grace period ends without a resume, the peer is removed and its partner gets peer_left."""
        a, c = yield self.pair_across(grace=5.0)
        yield a.lose("a1")
        yield c.registry.route("a1", frame(offer(0)))
        a.clock.advance(4.9)
        self.assertIsNotNone(self.stored("a1"))
        a.clock.advance(0.1)
        yield c.delivery()
        self.assertIsNone(self.stored("a1"))
        self.assertEqual(self.stored("c1")["s"], "idle")
        self.assertEqual(self.redis.exists(PREFIX + "q:a1"), 0)
        self.assertIsNone(self.redis.zscore(PREFIX + "grace", "a1"))
        self.assertEqual(c.delivered, [("c1", {"type": "disconnect", "from": "a1", "data": {"reason": "peer_left"}})])

    @inlineCallbacks
    def test_a_resumed_session_is_not_ended_by_the_old_timer(self):
        """A peer that resumed (and lost its socket again later) is not removed when its first period would end."""
        a, c = yield self.pair_across(grace=5.0)
        yield a.lose("a1")
        a.clock.advance(3)
        yield c.resume("a1")
        yield c.lose("a1")  # in grace again, with its own deadline
        a.clock.advance(2)  # a's timer for the first period fires
        yield a.registry.expire("a1", "a1-conn")  # (and once more, for certain)
        self.assertEqual(self.stored("a1")["o"], 0)
        self.assertEqual(self.stored("c1")["s"], "connected")

    @inlineCallbacks
    def test_resume_of_a_session_held_by_another_node_moves_it(self):
        """
        A peer that reconnects to another node before its old socket was
        found dead takes its session there; the old node is told to close
        that connection without ending the session.
        """
        a, c = yield self.pair_across()
        kind, frames = yield c.resume("a1", conn="new")
        self.assertEqual((kind, frames), ("moved", []))
        self.assertEqual(self.stored("a1")["n"], "c")
        while not a.evicted:
            yield a.delivery()  # (the evict travels on a's channel, after any frame before it)
        self.assertEqual(a.evicted, [("a1", "a1-conn")])
        self.assertEqual(self.redis.smembers(PREFIX + "node:a"), set())
        # the old connection's close (or a late suspend) leaves the moved session alone
        yield a.registry.remove("a1", "a1-conn")
        self.assertEqual(self.stored("a1")["n"], "c")
        self.assertEqual((yield a.registry.suspend("a1", "a1-conn", "127.0.0.1")), None)
        self.assertNotIn("o", self.stored("a1"))

    @inlineCallbacks
    def test_frames_in_flight_at_the_loss_go_first(self):
        """
        Frames that reach the old node after the socket was lost but before
        Redis put the peer in grace are queued again in front of the ones
        queued after.
        """
        a, c = yield self.pair_across()
        settled = a.lose("a1")
        a.registry._message(b"a1\n" + json.dumps(offer(0)).encode())  # published before the suspend ran
        yield settled
        yield c.registry.route("a1", frame(offer(1)))
        kind, frames = yield c.resume("a1")
        self.assertEqual(frames, [offer(0), offer(1)])

    def hold_settled(self, node):
        """Keep ``node`` from acting on ``!settled`` until the returned release() (it has not read it yet)."""
        held, arrived = [], Deferred()
        original = node.registry._settled

        def hold(peer_id, conn):
            held.append((peer_id, conn))
            if not arrived.called:
                arrived.callback(None)

        node.registry._settled = hold

        def release():
            node.registry._settled = original
            for peer_id, conn in held:
                original(peer_id, conn)

        return arrived, release

    @inlineCallbacks
    def test_a_resume_elsewhere_waits_for_the_frames_held_at_the_loss(self):
        """
        A peer that resumes on another node before its old node has handed
        over the frames that reached it at the loss (!settled not yet acted
        on) waits for them: it gets them first, then those queued since,
        none after.
        """
        a, c = yield self.pair_across()
        arrived, release = self.hold_settled(a)
        a.lose("a1")
        a.registry._message(b"a1\n" + frame(offer(0)))  # published before the suspend ran
        yield arrived  # Redis has put a1 in grace; node a has not handed offer 0 over
        yield c.registry.route("a1", frame(offer(1)))  # queued in Redis
        resumed = c.resume("a1")
        yield c.registry.peers()  # (answered after the resume's first attempt, on the same connection)
        self.assertFalse(resumed.called)
        self.assertEqual(self.stored("a1")["o"], 0)  # nothing changed by the attempt
        release()
        yield a.registry.peers()  # (after the hand-over, on a's connection)
        while not resumed.called:
            c.clock.advance(0.002)
            yield c.registry.peers()
        kind, frames = resumed.result
        self.assertEqual(frames, [offer(0), offer(1)])
        self.assertNotIn("h", self.stored("a1"))
        yield c.registry.route("a1", frame(offer(2)))
        self.assertEqual(c.delivered, [])  # (c's test node records deliveries; a1 is c's now: published to c)
        while not c.delivered:
            yield c.delivery()
        self.assertEqual(c.delivered, [("a1", offer(2))])

    @inlineCallbacks
    def test_a_resume_waits_no_longer_than_the_hand_over_deadline(self):
        """If the old node never hands over (it died), the resume goes ahead once the deadline (2 s) is past."""
        a, c = yield self.pair_across()
        arrived, _ = self.hold_settled(a)  # never released
        a.lose("a1")
        yield arrived
        yield c.registry.route("a1", frame(offer(1)))
        resumed = c.resume("a1")
        yield c.registry.peers()
        self.assertFalse(resumed.called)
        stored = self.stored("a1")
        stored["h"] = 1  # (Redis's clock cannot be faked: the deadline moved into the past)
        self.redis.hset(PREFIX + "peers", "a1", json.dumps(stored))
        while not resumed.called:
            c.clock.advance(0.1)
            yield c.registry.peers()
        kind, frames = resumed.result
        self.assertEqual(frames, [offer(1)])

    @inlineCallbacks
    def test_frames_reaching_a_node_the_peer_left_are_passed_on(self):
        """A frame that reaches a node for a peer that moved to another node is published to that node."""
        a, c = yield self.pair_across()
        yield c.resume("a1", conn="new")
        while not a.evicted:
            yield a.delivery()
        a.registry._message(b"a1\n" + json.dumps(offer(7)).encode())
        while ("a1", offer(7)) not in c.delivered:
            c.delivered.clear()
            c.evicted.clear()
            yield c.delivery()

    @inlineCallbacks
    def test_a_gone_session_gives_the_same_id_idle(self):
        """A resume for a session that no longer exists registers the same id again, idle."""
        a = yield self.start("a", grace=15.0)
        kind, frames = yield a.resume("z1")
        self.assertEqual((kind, frames), ("new", []))
        self.assertEqual((self.stored("z1")["s"], self.stored("z1")["n"]), ("idle", "a"))

    @inlineCallbacks
    def test_dead_nodes_peers_get_their_grace_period(self):
        """
        The peers of a node that died are put in grace by the reaper (their
        partners are not told), resume elsewhere, and are removed by the
        reaper once their period is over.
        """
        a = yield self.start("a", grace=15.0)
        reaper = yield self.start("reaper", node_timeout=0, grace=15.0)
        yield a.add("a1")
        yield a.add("a2")
        yield reaper.add("r1")
        yield reaper.registry.ping("r1", "a1")
        yield a.registry.pong("a1", "r1")
        yield a.registry.stopService()  # a dies
        yield reaper.beat()
        self.assertEqual((self.stored("a1")["o"], self.stored("a1")["s"]), (0, "connected"))
        self.assertEqual(self.stored("a2")["o"], 0)
        self.assertFalse(self.tracked("a"))
        yield reaper.registry.route("a1", frame(offer(0)))
        kind, frames = yield reaper.resume("a1")
        self.assertEqual((kind, frames), ("resumed", [offer(0)]))
        self.redis.zadd(PREFIX + "grace", {"a2": 0})  # a2's period is over
        yield reaper.beat()
        self.assertIsNone(self.stored("a2"))
        self.assertEqual(self.stored("a1")["s"], "connected")
        self.assertEqual(reaper.delivered, [])

    @inlineCallbacks
    def test_silent_node_takes_back_its_peers_in_grace(self):
        """
        A live node whose peers were put in grace while it was silent takes
        them back at its next beat, and gets what was queued for them.
        """
        a = yield self.start("a", grace=15.0)
        reaper = yield self.start("reaper", node_timeout=0, grace=15.0)
        yield a.add("a1")
        yield reaper.beat()
        self.assertEqual(self.stored("a1")["o"], 0)
        yield reaper.registry.route("a1", frame(offer(0)))
        yield a.beat()
        self.assertNotIn("o", self.stored("a1"))
        self.assertEqual(self.redis.smembers(PREFIX + "node:a"), {"a1"})
        yield a.delivery()
        self.assertEqual(a.delivered, [("a1", offer(0))])

    @inlineCallbacks
    def test_nodes_share_one_resume_secret(self):
        """Every node gets the same resume secret through Redis (the first node's)."""
        a = yield self.start("a")
        c = yield self.start("c")
        self.assertEqual(len(a.registry.resume_secret), 64)
        self.assertEqual(a.registry.resume_secret, c.registry.resume_secret)

    @inlineCallbacks
    def test_stats_read_the_cluster_in_slices(self):
        """The stats parse the cluster's peers as they read them (peers_lazily), a few a turn: the v1 document."""
        import itertools

        from signaling.stats import Slicer, StatsCache
        from signaling.web import stats_document

        a = yield self.start("a")
        for n in range(100):
            yield a.add(f"a{n:03d}")
        yield a.registry.ping("a001", "a002")
        yield a.registry.pong("a002", "a001")
        peers = yield a.registry.peers()
        lazily = yield a.registry.peers_lazily()
        self.assertNotIsInstance(lazily, list)

        def seen(ps):
            return [(p.id, p.ip, p.connected_at, p.state, p.target, p.online, p.node) for p in ps]

        self.assertEqual(seen(lazily), seen(peers))
        ticks = itertools.count()  # the budget's timer: 2 readings a turn, so 2 steps a turn
        slicer = Slicer(reactor, budget=2, timer=lambda: next(ticks), min_steps=1)
        snapshot = yield StatsCache(a.registry, reactor, slicer=slicer).document()
        self.assertEqual(json.loads(snapshot.body.data()), stats_document(peers))
        self.assertEqual((snapshot.counts["users"], snapshot.counts["pairs"]), (100, 1))
        self.assertGreaterEqual(slicer.turns, 100 // 16 + 1)  # (parsing alone takes 100 / 16 steps)
        self.assertEqual(slicer.max_steps, 2)


class RegistryRelays(RedisNodes):
    """Relays across nodes: those called in one reactor turn run as one script, in the order they were called."""

    @inlineCallbacks
    def pair_up(self, **options):
        """Nodes a and c; a1 and a2 on a, paired with c1 and c2 on c."""
        a = yield self.start("a", **options)
        c = yield self.start("c", **options)
        for peer in ("a1", "a2"):
            yield a.add(peer)
        for peer in ("c1", "c2"):
            yield c.add(peer)
        for mine, theirs in (("c1", "a1"), ("c2", "a2")):
            yield c.registry.ping(mine, theirs)
            yield a.registry.pong(theirs, mine)
        return a, c

    def calls(self):
        """How many times Redis ran a script and a publish (as its own command), so far."""
        stats = self.redis.info("commandstats")
        return tuple(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "publish"))

    @inlineCallbacks
    def test_one_turns_relays_are_one_script_and_one_publish_per_node(self):
        """Six offers to two peers of another node, called in one turn: one EVALSHA, one PUBLISH; all in order."""
        a, c = yield self.pair_up()
        before = self.calls()
        sent = [c.registry.check_and_route(f"c{1 + n % 2}", f"a{1 + n % 2}", frame(offer(n))) for n in range(6)]
        results = yield gatherResults(sent)
        self.assertEqual(results, [True] * 6)
        self.assertEqual(self.calls(), (before[0] + 1, before[1] + 1))
        yield a.deliveries(6)
        self.assertEqual([(to, m["data"]["n"]) for to, m in a.delivered],
                         [("a1", 0), ("a2", 1), ("a1", 2), ("a2", 3), ("a1", 4), ("a2", 5)])

    @inlineCallbacks
    def test_each_relay_of_a_script_gets_its_own_answer(self):
        """In one script: a refused relay, a delivered one, one queued for a peer in grace, one past its queue."""
        from signaling.errors import QUEUE_FULL, REFUSALS

        a, c = yield self.pair_up(grace=15.0, queue_limit=1)
        yield a.lose("a2")
        sent = [
            c.registry.check_and_route("c1", "a2", frame(offer(0))),  # c1 is paired with a1
            c.registry.check_and_route("c1", "a1", frame(offer(1))),
            c.registry.check_and_route("c2", "a2", frame(offer(2))),  # a2 is in grace: queued
            c.registry.check_and_route("c2", "a2", frame(offer(3))),  # its queue holds 1
        ]
        results = yield DeferredList(sent, consumeErrors=True)
        self.assertFalse(results[0][0])
        kind, message = REFUSALS["not-paired"]
        self.assertIsInstance(results[0][1].value, kind)
        self.assertEqual(results[0][1].value.message, message)
        self.assertEqual([r[1] for r in results[1:]], [True, True, QUEUE_FULL])
        yield a.deliveries(1)
        self.assertEqual([(to, m["data"]["n"]) for to, m in a.delivered], [("a1", 1)])
        self.assertEqual([json.loads(f)["data"]["n"] for f in self.redis.lrange(PREFIX + "q:a2", 0, -1)], [2])

    @inlineCallbacks
    def test_a_relay_runs_before_the_operation_called_after_it(self):
        """A relay then a disconnect, in one turn: the relay is checked first (delivered), not refused."""
        a, c = yield self.pair_up()
        relayed = c.registry.check_and_route("c1", "a1", frame(offer(0)))
        ended = c.registry.disconnect("c1", "a1")
        refused = c.registry.check_and_route("c1", "a1", frame(offer(1)))
        self.assertIs((yield relayed), True)
        yield ended
        yield self.assertFailure(refused, SignalingError)  # (called after the disconnect: checked after it)
        self.assertEqual((self.stored("c1")["s"], self.stored("a1")["s"]), ("idle", "idle"))
        yield a.deliveries(1)
        self.assertEqual(a.delivered, [("a1", offer(0))])

    @inlineCallbacks
    def test_a_turn_with_more_relays_than_a_script_takes(self):
        """Past RELAY_BATCH relays in a turn, another script begins; everything still arrives, in order."""
        a, c = yield self.pair_up()
        count = 2 * c.registry.RELAY_BATCH + 3
        before = self.calls()
        sent = [c.registry.check_and_route("c1", "a1", frame(offer(n))) for n in range(count)]
        self.assertEqual((yield gatherResults(sent)), [True] * count)
        self.assertEqual(self.calls()[0], before[0] + 3)
        yield a.deliveries(count)
        self.assertEqual([m["data"]["n"] for _, m in a.delivered], list(range(count)))

    @inlineCallbacks
    def test_an_unreadable_batch_is_dropped_and_the_channel_goes_on(self):
        """A '*' message that is not what the script publishes is dropped (logged), and later frames still arrive."""
        a, c = yield self.pair_up()
        channel = PREFIX + "to:a"
        for bad in (b"*a1\n999\n{}", b"*a1\nx\n{}", b"*a1", b"*a1\n-1\n{}", b"*\xff\n2\n{}"):
            self.redis.publish(channel, bad)
        relayed = yield c.registry.check_and_route("c1", "a1", frame(offer(7)))
        self.assertIs(relayed, True)
        yield a.deliveries(1)
        self.assertEqual(a.delivered, [("a1", offer(7))])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    @inlineCallbacks
    def test_relays_held_when_redis_goes_are_each_answered_unavailable(self):
        """Relays held for the end of the turn when the connection drops each get Unavailable; later ones at once."""
        from signaling.errors import Unavailable

        a, c = yield self.pair_up()
        answers = []
        for n in range(3):
            c.registry.relay_across("c1", "a1", frame(offer(n)), lambda outcome, n: answers.append((n, outcome)), n)
        self.assertEqual(answers, [])  # held
        lost = Deferred()
        c.registry._link.on_lost = lambda: lost.callback(None)
        c.registry._link.connection.transport.abortConnection()
        yield lost
        for _ in range(2):  # (the turn that sends them)
            yield deferLater(reactor, 0, lambda: None)
        self.assertEqual([n for n, _ in answers], [0, 1, 2])
        self.assertTrue(all(isinstance(outcome, Unavailable) for _, outcome in answers))
        c.registry.relay_across("c1", "a1", frame(offer(3)), lambda outcome: answers.append((3, outcome)))
        self.assertIsInstance(answers[-1][1], Unavailable)  # (answered at once: Redis is unreachable)
        self.assertEqual(a.delivered, [])

    @inlineCallbacks
    def test_a_failing_answer_costs_the_other_relays_nothing(self):
        """If one relay's answer callback raises, the relays after it in the same script still get theirs."""
        a, c = yield self.pair_up()
        answers = []

        def broken(outcome):
            raise RuntimeError("broken caller")

        c.registry.relay_across("c1", "a1", frame(offer(0)), broken)
        done = Deferred()
        c.registry.relay_across("c2", "a2", frame(offer(1)), lambda o: (answers.append(o), done.callback(None)))
        yield done
        self.assertEqual(answers, [True])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        yield a.deliveries(2)
