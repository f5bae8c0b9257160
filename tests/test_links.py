"""
Tier 2: links without a cluster.  Once the in-memory registry has said two
peers of this process are paired, their offers, answers and candidates are
relayed connection to connection without asking it again (``_link`` in
``signaling/protocol.py``).  A link must never outlive the pairing: random
sequences of pings, pongs, offers, disconnects, closes, lost sockets and
resumes (Hypothesis) check every offer against the registry's own answer at
the moment it was sent.
"""

from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory import Harness

from signaling.registry import CONNECTED

pytestmark = pytest.mark.memory

PEERS = 4
ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["pair", "ping", "pong", "offer", "offer", "offer", "disconnect"]),
                  st.integers(0, PEERS - 1), st.integers(0, PEERS - 1)),
        st.tuples(st.sampled_from(["close", "cut", "resume", "reconnect"]), st.integers(0, PEERS - 1), st.just(0)),
    ),
    max_size=40,
)


class World:
    """PEERS slots, each holding a client (or nothing: closed, or cut and not resumed yet)."""

    def __init__(self):
        self.h = Harness(resume_grace=30.0)
        self.clients = [self.h.connect() for _ in range(PEERS)]
        self.ids = [c.peer_id for c in self.clients]
        self.tokens = [self.h.factory.resume_token(i) for i in self.ids]
        self.sent = 0

    def paired(self, a: int, b: int) -> bool:
        """What the registry answers now: ``a`` may relay to ``b``."""
        pa, pb = self.h.registry.get(self.ids[a]), self.h.registry.get(self.ids[b])
        return pa is not None and pb is not None and a != b and pa.state == CONNECTED and pa.target == self.ids[b]

    def act(self, kind, a, b):
        h, clients = self.h, self.clients
        if kind == "pair":  # (a ping and its pong: random ones rarely meet)
            self.act("ping", a, b)
            self.act("pong", b, a)
        elif kind in ("ping", "pong", "disconnect"):
            if clients[a] is not None:
                h.send(clients[a], {"type": kind, "to": self.ids[b]})
        elif kind == "offer":
            self.offer(a, b)
        elif kind == "close" and clients[a] is not None:
            clients[a].sendClose()
            h.flush()
            clients[a] = None
            self.ids[a] = None  # (its session ended: the slot stays empty)
        elif kind == "cut" and clients[a] is not None:
            clients[a].transport.abortConnection()
            h.flush()
            clients[a] = None
        elif kind == "resume" and clients[a] is None and self.ids[a] is not None:
            client = h.connect(handshake=False, url=f"ws://127.0.0.1:8080/?resume={quote(self.tokens[a])}")
            welcome = client.take()
            assert welcome[0]["type"] == "welcome"
            if welcome[0]["id"] == self.ids[a]:
                client.received = [m for m in welcome[1:] if m["type"] != "offer"]  # (queued offers: checked below)
                clients[a] = client
            else:
                client.sendClose()
                h.flush()
        elif kind == "reconnect" and self.ids[a] is None:
            clients[a] = h.connect()
            self.ids[a] = clients[a].peer_id
            self.tokens[a] = h.factory.resume_token(self.ids[a])
        for c in clients:  # (what the actions told the peers is not what this test checks)
            if c is not None:
                c.received = [m for m in c.received if m["type"] == "offer"]

    def offer(self, a, b):
        sender, receiver = self.clients[a], self.clients[b]
        if sender is None or self.ids[b] is None:
            return
        self.sent += 1
        expected = self.paired(a, b)
        self.h.send(sender, {"type": "offer", "to": self.ids[b], "data": {"n": self.sent}})
        got = sender.take()
        if expected:
            assert not [m for m in got if m.get("type") == "error"], (a, b, got)
            if receiver is not None:
                assert receiver.take() == [{"type": "offer", "from": self.ids[a], "data": {"n": self.sent}}]
        else:
            assert [m.get("code") for m in got] in (["not-paired"], ["peer-not-found"], ["invalid-state"]), got
            if receiver is not None:
                assert receiver.take() == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ACTIONS)
def test_a_link_never_outlives_its_pairing(actions):
    """Every offer is relayed exactly when the registry says its sender is paired with its target, and once."""
    world = World()
    for action in actions:
        world.act(*action)


def test_linked_relays_do_not_ask_the_registry():
    """The fast path under test is taken: once paired, offers never reach the registry's check."""
    h = Harness()
    a, b = h.connect(), h.connect()
    h.pair(a, b)
    calls = []
    check = h.registry.check_paired
    h.registry.check_paired = lambda *args: calls.append(args) or check(*args)
    for n in range(3):
        h.send(a, {"type": "offer", "to": b.peer_id, "data": {"n": n}})
        h.send(b, {"type": "answer", "to": a.peer_id, "data": {"n": n}})
    assert [m["data"]["n"] for m in b.take()] == [0, 1, 2]
    assert [m["data"]["n"] for m in a.take()] == [0, 1, 2]
    assert calls == []
    # a disconnect drops the link: the next offer is checked, and refused
    h.send(a, {"type": "disconnect", "to": b.peer_id})
    b.take()
    h.send(a, {"type": "offer", "to": b.peer_id, "data": {}})
    assert calls == [(a.peer_id, b.peer_id)]
    assert [m["code"] for m in a.take()] == ["invalid-state"]
    assert b.take() == []
