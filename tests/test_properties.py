"""
Tiers 1 and 2: properties of the registry under random sequences of
operations (Hypothesis), and the in-memory registry and the Redis one's
rules driven side by side by the same sequences, answering alike.
"""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule, run_state_machine_as_test
from redis_server import redis_rules
from twisted.internet.task import Clock

from signaling.errors import PeerIdTaken, SignalingError
from signaling.registry import CONNECTED, CONNECTING, IDLE, Registry

pytestmark = pytest.mark.pure  # (the differential test also: redis)


class RegistryMachine(RuleBasedStateMachine):
    """Connects, pings, pongs, relays, disconnects and drops, in any order."""

    peers = Bundle("peers")

    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.registry = Registry(self.clock)
        self.counter = 0
        self.gone = set()

    @rule(target=peers)
    def connect(self):
        self.counter += 1
        peer_id = f"p{self.counter}"
        self.clock.advance(1)
        self.registry.add(peer_id, "127.0.0.1")
        return peer_id

    def _apply(self, operation, a, b):
        before = {p.id: (p.state, p.target) for p in self.registry.peers()}
        try:
            transitions = getattr(self.registry, operation)(a, b)
        except SignalingError as e:
            assert e.code in ("peer-not-found", "peer-busy", "invalid-state")
            after = {p.id: (p.state, p.target) for p in self.registry.peers()}
            assert after == before, "a refused operation changed state"
            return None
        for t in transitions:
            assert before[t.peer][0] == t.old
            assert self.registry.get(t.peer).state == t.new
        return transitions

    @rule(a=peers, b=peers)
    def ping(self, a, b):
        self._apply("ping", a, b)

    @rule(a=peers, b=peers)
    def pong(self, a, b):
        self._apply("pong", a, b)

    @rule(a=peers, b=peers)
    def relay(self, a, b):
        result = self._apply("check_paired", a, b)
        if result is not None:
            assert self.registry.get(a).target == b and self.registry.get(b).target == a

    @rule(a=peers, b=peers)
    def disconnect(self, a, b):
        self._apply("disconnect", a, b)

    @rule(a=consumes(peers))
    def drop(self, a):
        if a in self.gone:
            return
        watchers = {p.id for p in self.registry.peers() if p.target == a}
        transitions = self.registry.remove(a)
        self.gone.add(a)
        assert {t.peer for t in transitions} == watchers
        assert all(t.new == IDLE for t in transitions)

    @rule(a=peers, name=st.sampled_from(["ping", "pong", "check_paired", "disconnect"]))
    def to_unknown(self, a, name):
        try:
            getattr(self.registry, name)(a, "nobody")
        except SignalingError as e:
            assert e.code == "peer-not-found"
        else:
            raise AssertionError("an unknown target was accepted")

    @invariant()
    def consistent(self):
        peers = {p.id: p for p in self.registry.peers()}
        assert not (set(peers) & self.gone)
        for p in peers.values():
            if p.state == IDLE:
                assert p.target is None
            else:
                assert p.target in peers, f"dangling target {p}"
                assert p.target != p.id
            if p.state == CONNECTED:
                partner = peers[p.target]
                assert partner.state == CONNECTED and partner.target == p.id, "asymmetric pair"
        # the reverse index is exactly the set of targets
        expected = {}
        for p in peers.values():
            if p.target is not None:
                expected.setdefault(p.target, set()).add(p.id)
        assert self.registry._pointing == expected
        summary = self.registry.summary()
        assert summary["users"] == len(peers)
        assert summary[CONNECTED] == 2 * summary["pairs"]
        assert summary[IDLE] + summary[CONNECTING] + summary[CONNECTED] == len(peers)


RegistryMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
test_registry_properties = RegistryMachine.TestCase


# -- differential: both registries, the same operations, the same answers ------------------


def answer(registry, operation, *args):
    """What an operation answers: ("ok", result) or ("refused", exception class, message)."""
    try:
        result = getattr(registry, operation)(*args)
    except SignalingError as e:
        return ("refused", type(e), e.message)
    except PeerIdTaken:
        return ("taken",)
    if operation == "add":  # a Peer
        return ("ok", (result.id, result.ip, result.connected_at, result.state, result.target))
    return ("ok", result)


def snapshot(registry):
    return sorted((p.id, p.state, p.target, p.ip, p.connected_at) for p in registry.peers())


NAMES = st.sampled_from(["p0", "p1", "p2", "p3", "nobody"])


class BothRegistries(RuleBasedStateMachine):
    """
    Every step is applied to the in-memory registry and to the Redis one's
    rules, and must get the same answer from both (the same transitions in
    the same order, or the same refusal in the same words), leaving the same
    peers.  Besides random operations, some steps pick what the state makes
    interesting (the ponger a waiting peer waits for), so that deep states
    are reached often.
    """

    server = None  # the redis-server, set by the test

    def __init__(self):
        super().__init__()
        self.clock = Clock()
        self.memory = Registry(self.clock)
        self.rules = redis_rules(self.server, self.clock)
        self.rules.client.flushdb()
        self.names = ["p0", "p1", "p2", "p3", "nobody"]
        for peer in self.names[:3]:
            self.step("add", peer, "10.0.0.1")

    def step(self, operation, *args):
        self.clock.advance(1)
        expected = answer(self.memory, operation, *args)
        assert answer(self.rules, operation, *args) == expected, (operation, args)
        assert snapshot(self.rules) == snapshot(self.memory), (operation, args)

    def teardown(self):
        self.rules.client.close()

    @rule(a=NAMES, b=NAMES)
    def ping(self, a, b):
        self.step("ping", a, b)

    @rule(a=NAMES, b=NAMES)
    def pong(self, a, b):
        self.step("pong", a, b)

    @rule(a=NAMES, b=NAMES)
    def relay(self, a, b):
        self.step("check_paired", a, b)

    @rule(a=NAMES, b=NAMES)
    def disconnect(self, a, b):
        self.step("disconnect", a, b)

    @rule(relays=st.lists(st.tuples(NAMES, NAMES), min_size=1, max_size=6))
    def relays_of_one_turn(self, relays):
        """check_and_route_many (a cluster node's relays of one turn): each answered as check_paired would be."""
        self.clock.advance(1)
        expected = [answer(self.memory, "check_paired", a, b) for a, b in relays]
        outcomes = self.rules.check_and_route_many([(a, b, b'{"type":"offer"}') for a, b in relays])
        got = [
            ("refused", type(o), o.message) if isinstance(o, SignalingError) else ("ok", [])
            for o in outcomes
        ]
        assert got == expected, relays
        assert all(isinstance(o, SignalingError) or o is False for o in outcomes)  # (no node listens here)
        assert snapshot(self.rules) == snapshot(self.memory), relays

    @rule(data=st.data())
    def pong_a_waiting_peer(self, data):
        waiting = [p for p in self.memory.peers() if p.state == CONNECTING]
        if waiting:
            p = data.draw(st.sampled_from(waiting))
            self.step("pong", p.target, p.id)

    @rule(data=st.data(), b=NAMES)
    def a_waited_for_peer_pings_another(self, data, b):
        waited_for = sorted({p.target for p in self.memory.peers() if p.state == CONNECTING})
        if waited_for:
            self.step("ping", data.draw(st.sampled_from(waited_for)), b)

    @rule(data=st.data())
    def disconnect_a_partner(self, data):
        pointing = [p for p in self.memory.peers() if p.target is not None]
        if pointing:
            p = data.draw(st.sampled_from(pointing))
            self.step("disconnect", *data.draw(st.permutations([p.id, p.target])))

    @rule(a=NAMES)
    def leave(self, a):
        self.step("remove", a)

    @rule(a=NAMES)
    def arrive(self, a):
        self.step("add", a, "10.0.0.2")


@pytest.mark.redis
def test_both_registries_answer_alike(redis_server):
    """The in-memory registry and the Redis one's rules answer every random sequence alike (BothRegistries)."""
    BothRegistries.server = redis_server
    try:
        run_state_machine_as_test(
            BothRegistries, settings=settings(max_examples=300, stateful_step_count=30, deadline=None)
        )
    finally:
        BothRegistries.server = None
