"""
Tier 2: a model of the cluster's relay path, interleaved by Hypothesis.

Two nodes (two real ``SignalingFactory`` instances with in-memory clients)
share a stand-in for Redis: the authoritative state is the pure
:class:`~signaling.registry.Registry` (the Lua scripts are proven equal to it
by ``test_properties.py``), and, as with Redis, the operations one node
sends run one at a time in the order it sent them, and their answers come
back in that order, while the two nodes' operations, the answers and the
frames published to a node interleave however Hypothesis likes.

Checked: every offer a peer receives was sent while a pairing of its
sender and receiver existed, or one existed at some moment between its
sending and its delivery (which is the order Redis gives: a relay is
checked when its script runs); no offer is delivered twice; and the offers
of one sender to one receiver arrive in the order they were sent.  Same-node
pairs relay without Redis once linked (the fast path under test), so the
check covers the links: they must never outlive the pairing.
"""

import itertools
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory import Harness
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface import implementer

from signaling.errors import SignalingError
from signaling.registry import CONNECTED, IClusterRegistry, Registry

pytestmark = pytest.mark.memory


class World:
    """The authoritative state, a logical clock, and the history of every pairing."""

    def __init__(self, clock):
        self.registry = Registry(clock)
        self.step = 0
        self.paired_since = {}  # frozenset({a, b}) -> step the current pairing began
        self.history = []  # (frozenset, began, ended)

    def tick(self):
        self.step += 1

    def observe(self):
        """Record which pairings exist now (after an operation ran)."""
        now = set()
        for peer in self.registry.peers():
            if peer.state == CONNECTED and peer.target is not None:
                now.add(frozenset((peer.id, peer.target)))
        for pair in list(self.paired_since):
            if pair not in now:
                self.history.append((pair, self.paired_since.pop(pair), self.step))
        for pair in now:
            self.paired_since.setdefault(pair, self.step)

    def was_paired(self, a, b, since, until):
        pair = frozenset((a, b))
        if pair in self.paired_since and self.paired_since[pair] <= until:
            return True
        return any(p == pair and began <= until and ended >= since for p, began, ended in self.history)


@implementer(IClusterRegistry)
class Node:
    """One node's view of the stand-in Redis: its operations queue, its answers queue, its channel."""

    ready = True
    resume_secret = None

    def __init__(self, name, world):
        self.node = name
        self.world = world
        self.pending = deque()  # (name, args, Deferred): sent, not yet run
        self.answers = deque()  # (Deferred, result or exception): run, answer not yet read
        self.channel = deque()  # (to, frame) published to this node
        self.local = None
        self.other = None

    def attach(self, local):
        self.local = local

    def health(self):
        return {"registry": "model", "redis": "connected", "node": self.node, "since": 0}

    def _send(self, name, *args):
        d = Deferred()
        self.pending.append((name, args, d))
        return d

    # IRegistry, IClusterRegistry: every operation goes through the queue
    def add(self, peer_id, ip, conn=""):
        return self._send("add", peer_id, ip)

    def remove(self, peer_id, conn=""):
        return self._send("remove", peer_id)

    def ping(self, sender, to):
        return self._send("ping", sender, to)

    def pong(self, sender, to):
        return self._send("pong", sender, to)

    def check_paired(self, sender, to):
        return self._send("check_paired", sender, to)

    def disconnect(self, sender, to):
        return self._send("disconnect", sender, to)

    def route(self, to, frame):
        return self._send("route", to, frame)

    def relay_across(self, sender, to, frame, answer, *args):
        self._send("check_and_route", sender, to, frame).addCallbacks(
            lambda outcome: answer(outcome, *args), lambda failure: answer(failure.value, *args)
        )

    def peers(self):
        return self.world.registry.peers()

    def summary(self):
        return self.world.registry.summary()

    # what Redis does
    def run_next(self):
        name, args, d = self.pending.popleft()
        world = self.world
        world.tick()
        try:
            if name == "add":
                result = world.registry.add(*args)
                world.registry.get(args[0]).node = self.node
            elif name in ("route", "check_and_route"):
                if name == "check_and_route":
                    world.registry.check_paired(args[0], args[1])
                to, frame = args[-2], args[-1]
                target = world.registry.get(to)
                result = target is not None
                if result:
                    (self if target.node == self.node else self.other).channel.append((to, frame))
            else:
                result = getattr(world.registry, name)(*args)
        except SignalingError as e:
            result = e
        world.observe()
        self.answers.append((d, result))

    def answer_next(self):
        d, result = self.answers.popleft()
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)

    def publish_next(self):
        to, frame = self.channel.popleft()
        self.local.deliver_local(to, frame)


class Cluster:
    def __init__(self, peers_per_node):
        self.world = World(Clock())
        self.nodes = [Node("n1", self.world), Node("n2", self.world)]
        self.nodes[0].other, self.nodes[1].other = self.nodes[1], self.nodes[0]
        ids = itertools.count(1)
        self.factories = []
        for node in self.nodes:
            h = Harness(rate=10_000, burst=10_000, resume_grace=0)
            h.factory.registry = node
            h.factory.new_id = lambda node=node: f"{node.node}-{next(ids)}"
            node.attach(h.factory)
            self.factories.append(h)
        self.clients = []  # the first peers_per_node on n1, the rest on n2
        for h in self.factories:
            for _ in range(peers_per_node):
                self.clients.append(h.connect(handshake=False))
        self.settle()
        self.ids = [c.server.peer_id for c in self.clients]
        for c in self.clients:
            assert [m["type"] for m in c.take()] == ["welcome"]
        self.pinged_by = {}  # client index -> id of the last peer that pinged it
        self.partner = {}  # client index -> id of the peer it last ponged or was ponged by
        self.sent = {}  # seq -> (sender, to, step sent)
        self.seq = itertools.count()
        self.offers = 0  # offers received (checked)

    def flush(self):
        for h in self.factories:
            h.flush()

    def settle(self):
        """Let everything in flight finish."""
        self.flush()
        while any(n.pending or n.answers or n.channel for n in self.nodes):
            for node in self.nodes:
                while node.pending:
                    node.run_next()
                while node.answers:
                    node.answer_next()
                while node.channel:
                    node.publish_next()
            self.flush()

    def act(self, action):
        kind, i, j = action
        nodes = self.nodes
        self.world.tick()  # (each action is a moment of its own: "sent after the pairing ended" is visible)
        if kind in ("run", "answer", "publish"):  # up to 1 + 2j of them, on node i % 2
            node = nodes[i % 2]
            queue, step = {
                "run": (node.pending, node.run_next),
                "answer": (node.answers, node.answer_next),
                "publish": (node.channel, node.publish_next),
            }[kind]
            for _ in range(1 + 2 * j):
                if queue:
                    step()
                    self.flush()
        elif kind == "settle":
            self.settle()
        elif kind == "close":
            client = self.clients[i % len(self.clients)]
            if client.server.peer_id is not None:
                client.sendClose(1000)
        elif kind == "forget":
            self.factories[i % 2].factory.forget_links()
        else:
            # mostly what a client would do: pong whoever pinged it last, offer
            # to whoever it paired with last; else anyone (j)
            me = i % len(self.clients)
            a, b = self.clients[me], self.ids[(me + 1 + j) % len(self.ids)]  # (never itself)
            if j < 3:
                guess = (self.pinged_by if kind == "pong" else self.partner).get(me)
                b = guess if guess is not None else b
            if a.server.peer_id in (None, b):
                return
            if kind == "pong":
                self.partner[me] = b
            message = {"type": kind, "to": b}
            if kind == "offer":
                seq = next(self.seq)
                message["data"] = {"seq": seq}
                self.sent[seq] = (a.server.peer_id, b, self.world.step)
            a.send_json(message)
        self.flush()

    def check(self, received):
        """Every offer received so far was relayed within a pairing, once, in order per sender."""
        last = {}
        for client in self.clients:
            me = client.server.peer_id
            for m in client.received:
                index = self.clients.index(client)
                if m.get("type") == "ping":
                    self.pinged_by[index] = m["from"]
                elif m.get("type") == "pong":
                    self.partner[index] = m["from"]
                if m.get("type") != "offer":
                    continue
                self.offers += 1
                seq = m["data"]["seq"]
                sender, to, sent_at = self.sent[seq]
                assert (m["from"], me) == (sender, to)
                assert seq not in received, f"offer {seq} delivered twice"
                received[seq] = True
                assert self.world.was_paired(sender, to, sent_at, self.world.step), (
                    f"offer {seq} {sender} -> {to} (sent at {sent_at}, delivered by {self.world.step}) "
                    f"outside any pairing: {self.world.history} {self.world.paired_since}"
                )
                key = (sender, to)
                assert last.get(key, -1) < seq, f"offers {sender} -> {to} out of order"
                last[key] = seq
            client.received = []


ACTIONS = st.tuples(
    # (Redis must keep up with the clients: many steps of it, and now and then
    # everything in flight runs to the end)
    st.sampled_from(["run"] * 5 + ["answer"] * 5 + ["publish"] * 3 + ["settle"] * 2
                    + ["ping", "ping", "pong", "pong", "offer", "offer", "offer", "disconnect", "forget", "close"]),
    st.integers(0, 3),
    st.integers(0, 3),
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(ACTIONS, min_size=10, max_size=150))
def test_relays_across_two_nodes_stay_within_pairings(paired, actions):
    cluster = Cluster(peers_per_node=2)
    received = {}
    if paired:  # start from two same-node pairs, linked (the fast path), and let the actions undo them
        for x, y in ((0, 1), (2, 3)):
            for kind, by, to in (("ping", x, y), ("pong", y, x), ("offer", x, y)):
                cluster.act((kind, by, (to - by - 1) % 4))
                cluster.settle()
        assert all(c.server._partner is not None for c in cluster.clients)
        cluster.check(received)
    for action in actions:
        cluster.act(action)
        cluster.check(received)
    cluster.settle()
    cluster.check(received)


def test_the_model_sees_a_same_node_pair_relay_without_redis():
    """The fast path under test is taken: once linked, a same-node offer needs no operation."""
    cluster = Cluster(peers_per_node=2)
    a, b = cluster.clients[0], cluster.clients[1]  # both on n1
    a.send_json({"type": "ping", "to": b.server.peer_id})
    cluster.settle()
    b.send_json({"type": "pong", "to": a.server.peer_id})
    cluster.settle()
    a.take(), b.take()
    a.send_json({"type": "offer", "to": b.server.peer_id, "data": {"seq": 0}})
    cluster.flush()
    assert not cluster.nodes[0].pending
    assert b.take() == [{"type": "offer", "from": a.server.peer_id, "data": {"seq": 0}}]
    # after a disconnect from the other side, the next offer is checked (and refused) by "Redis"
    b.send_json({"type": "disconnect", "to": a.server.peer_id})
    cluster.flush()
    a.send_json({"type": "offer", "to": b.server.peer_id, "data": {"seq": 1}})
    cluster.settle()
    assert b.take() == []
    assert [(m["type"], m.get("code")) for m in a.take()] == [("disconnect", None), ("error", "invalid-state")]
    # a link never outlives a node's loss of Redis
    a.send_json({"type": "ping", "to": b.server.peer_id})
    cluster.settle()
    b.send_json({"type": "pong", "to": a.server.peer_id})
    cluster.settle()
    a.take(), b.take()
    assert a.server._partner is b.server
    cluster.factories[0].factory.forget_links()
    assert a.server._partner is None and b.server._partner is None


def test_a_check_answered_after_a_disconnect_was_sent_does_not_link():
    """
    A relay checked through Redis links the pair when the answer says paired,
    unless a link of either was dropped after the question was sent: Redis
    may have ended the pairing since (here: a disconnect sent after the check).
    """
    cluster = Cluster(peers_per_node=2)
    a, b = cluster.clients[0], cluster.clients[1]
    for kind, by, to in (("ping", 0, 1), ("pong", 1, 0)):
        cluster.act((kind, by, (to - by - 1) % 4))
        cluster.settle()
    cluster.factories[0].factory.forget_links()
    n1 = cluster.nodes[0]
    a.send_json({"type": "offer", "to": b.server.peer_id, "data": {"seq": 0}})
    cluster.sent[0] = (a.server.peer_id, b.server.peer_id, cluster.world.step)
    b.send_json({"type": "disconnect", "to": a.server.peer_id})
    cluster.flush()
    assert [name for name, _, _ in n1.pending] == ["check_paired", "disconnect"]
    n1.run_next()
    n1.run_next()  # the pairing has ended in Redis
    n1.answer_next()  # "paired", from before the disconnect
    cluster.flush()
    assert a.server._partner is None
    a.send_json({"type": "offer", "to": b.server.peer_id, "data": {"seq": 1}})
    cluster.sent[1] = (a.server.peer_id, b.server.peer_id, cluster.world.step)
    cluster.settle()
    assert [m["data"]["seq"] for m in b.received if m["type"] == "offer"] == [0]  # (1 was refused)
    cluster.check({})


def test_a_relay_checked_after_its_sender_closed_still_names_the_sender():
    """
    (Found by the model.)  An offer whose check is still with Redis when its
    sender's socket closes is relayed, once the check passes, from that
    sender, not from nobody; then the partner is told it left.
    """
    cluster = Cluster(peers_per_node=2)
    a, b = cluster.clients[0], cluster.clients[1]
    for kind, by, to in (("ping", 0, 1), ("pong", 1, 0)):
        cluster.act((kind, by, (to - by - 1) % 4))
        cluster.settle()
    cluster.factories[0].factory.forget_links()
    sender, to = a.server.peer_id, b.server.peer_id
    cluster.sent[0] = (sender, to, cluster.world.step)
    b.take()
    a.send_json({"type": "offer", "to": to, "data": {"seq": 0}})
    cluster.flush()
    a.sendClose(1000)
    cluster.settle()
    assert [(m["type"], m["from"]) for m in b.received] == [("offer", sender), ("disconnect", sender)]
    cluster.check({})
