"""Tier 1: properties of the registry under random sequences of operations (Hypothesis)."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from twisted.internet.task import Clock

from signaling.registry import CONNECTED, CONNECTING, IDLE, Registry, SignalingError


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
