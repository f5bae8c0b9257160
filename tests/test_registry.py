"""
Tiers 1 and 2: one behaviour suite for the pairing rules, run against both
registries: the in-memory one (pure, a fake clock) and the Redis one's rules
(its Lua scripts and their replies, :class:`~signaling.redis_registry.RedisRules`)
on a real redis-server, through a blocking client.
"""

import pytest
from redis_server import RULES_PREFIX, redis_rules
from twisted.internet.task import Clock

from signaling.errors import InvalidState, PeerBusy, PeerIdTaken, PeerNotFound
from signaling.registry import CONNECTED, CONNECTING, IDLE, IRegistry, Registry, Transition

pytestmark = pytest.mark.pure  # (the Redis ones also: redis)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def empty(request):
    """An empty registry of each kind, on a fake clock at 2025-09-09T13:00:00Z."""
    clock = Clock()
    clock.advance(1_757_422_800)
    if request.param == "memory":
        r = Registry(clock)
    else:
        server = request.getfixturevalue("redis_server")
        r = redis_rules(server, clock)
        r.client.flushdb()
        request.addfinalizer(r.client.close)
    r.clock = clock
    return r


@pytest.fixture
def reg(empty):
    """Users a, b, c and d, one second apart."""
    for name in "abcd":
        empty.add(name, "127.0.0.1")
        empty.clock.advance(1)
    return empty


def get(reg, peer):
    return {p.id: p for p in reg.peers()}.get(peer)


def state(reg, peer):
    p = get(reg, peer)
    return (p.state, p.target)


def pair(reg, a, b):
    reg.ping(a, b)
    reg.pong(b, a)


def test_provides_interface(reg):
    """Both registries provide IRegistry."""
    assert IRegistry.providedBy(reg)


def test_add_records_address_and_clock_time(reg):
    """A new user is idle, with the injected clock's time and its address."""
    p = get(reg, "a")
    assert (p.state, p.target, p.ip) == (IDLE, None, "127.0.0.1")
    assert p.connected_at == 1_757_422_800
    assert get(reg, "b").connected_at == 1_757_422_801
    assert len(reg.peers()) == 4


def test_duplicate_id_refused(reg):
    """Adding an id that is already registered raises PeerIdTaken."""
    with pytest.raises(PeerIdTaken):
        reg.add("a", "127.0.0.1")


def test_ping_makes_sender_connecting(reg):
    """A ping from an idle user to an idle user makes the sender connecting."""
    assert reg.ping("a", "b") == [Transition("a", IDLE, CONNECTING, "b")]
    assert state(reg, "a") == (CONNECTING, "b")
    assert state(reg, "b") == (IDLE, None)


def test_newer_ping_replaces_older(reg):
    """A second ping to someone else retargets the connecting sender."""
    reg.ping("a", "b")
    assert reg.ping("a", "c") == [Transition("a", CONNECTING, CONNECTING, "c")]
    assert state(reg, "a") == (CONNECTING, "c")
    # b no longer has a watcher: removing it tells nobody
    assert reg.remove("b") == []


def test_repeated_ping_changes_nothing(reg):
    """Pinging the same peer again while connecting is allowed and changes nothing."""
    reg.ping("a", "b")
    assert reg.ping("a", "b") == []
    assert state(reg, "a") == (CONNECTING, "b")


def test_pong_pairs_both(reg):
    """A pong to the user waiting for it connects both, each pointing at the other."""
    reg.ping("a", "b")
    assert reg.pong("b", "a") == [
        Transition("a", CONNECTING, CONNECTED, "b"),
        Transition("b", IDLE, CONNECTED, "a"),
    ]
    assert state(reg, "a") == (CONNECTED, "b")
    assert state(reg, "b") == (CONNECTED, "a")
    assert reg.summary() == {
        "users": 4, IDLE: 2, CONNECTING: 0, CONNECTED: 2, "pairs": 1, "offline": 0
    }


def test_crossed_pings_then_pong(reg):
    """When both pinged each other, either pong pairs them."""
    reg.ping("a", "b")
    reg.ping("b", "a")
    reg.pong("a", "b")
    assert state(reg, "a") == (CONNECTED, "b")
    assert state(reg, "b") == (CONNECTED, "a")


def test_pong_retargets_a_connecting_ponger(reg):
    """A user connecting to c may accept a ping from a instead."""
    reg.ping("b", "c")
    reg.ping("a", "b")
    reg.pong("b", "a")
    assert state(reg, "b") == (CONNECTED, "a")
    assert reg.remove("c") == []


def test_liveness_ping_pong_between_partners(reg):
    """Partners may ping and pong each other without changing state."""
    pair(reg, "a", "b")
    assert reg.ping("a", "b") == []
    assert reg.pong("b", "a") == []
    assert reg.ping("b", "a") == []
    assert reg.pong("a", "b") == []
    assert state(reg, "a") == (CONNECTED, "b")


def test_ping_while_connected_elsewhere_is_invalid(reg):
    """A connected user cannot ping a third user."""
    pair(reg, "a", "b")
    with pytest.raises(InvalidState):
        reg.ping("a", "c")
    assert state(reg, "a") == (CONNECTED, "b")


def test_ping_to_connected_peer_is_busy(reg):
    """Pinging a user connected to someone else answers peer-busy."""
    pair(reg, "a", "b")
    with pytest.raises(PeerBusy) as e:
        reg.ping("c", "a")
    assert e.value.code == "peer-busy"
    assert state(reg, "c") == (IDLE, None)


def test_ping_to_connecting_peer_is_allowed(reg):
    """A user that is only connecting can still be pinged by others."""
    reg.ping("a", "b")
    reg.ping("c", "a")
    assert state(reg, "c") == (CONNECTING, "a")


@pytest.mark.parametrize("op", ["ping", "pong", "check_paired", "disconnect"])
def test_unknown_or_self_target(reg, op):
    """Every operation refuses an unknown id and the sender's own id with peer-not-found."""
    for to in ("zzz", "a"):
        with pytest.raises(PeerNotFound) as e:
            getattr(reg, op)("a", to)
        assert e.value.code == "peer-not-found"


def test_pong_without_ping_is_invalid(reg):
    """A pong to a user who is not waiting for one is invalid-state."""
    with pytest.raises(InvalidState):
        reg.pong("b", "a")
    reg.ping("a", "c")
    with pytest.raises(InvalidState):
        reg.pong("b", "a")


def test_ping_busy_then_pong_refused(reg):
    """After a peer-busy ping, a pong from the busy user is invalid-state."""
    pair(reg, "b", "c")
    with pytest.raises(PeerBusy):
        reg.ping("a", "b")
    with pytest.raises(InvalidState):
        reg.pong("b", "a")


def test_waiting_pinger_cannot_be_ponged_by_a_connected_user(reg):
    """If the pinged user pairs with someone else first, its pong to the old pinger is refused."""
    reg.ping("a", "b")
    reg.ping("c", "b")
    reg.pong("b", "c")
    with pytest.raises(InvalidState):
        reg.pong("b", "a")
    assert state(reg, "a") == (CONNECTING, "b")


def test_check_paired(reg):
    """offer/answer/ice-candidate need the two users connected to each other."""
    with pytest.raises(InvalidState):
        reg.check_paired("a", "b")
    reg.ping("a", "b")
    with pytest.raises(InvalidState):
        reg.check_paired("a", "b")
    reg.pong("b", "a")
    assert reg.check_paired("a", "b") == []
    assert reg.check_paired("b", "a") == []
    with pytest.raises(InvalidState):
        reg.check_paired("a", "c")


def test_disconnect_connected_pair(reg):
    """disconnect between partners returns both to idle."""
    pair(reg, "a", "b")
    assert reg.disconnect("b", "a") == [
        Transition("b", CONNECTED, IDLE, None),
        Transition("a", CONNECTED, IDLE, None),
    ]
    assert state(reg, "a") == state(reg, "b") == (IDLE, None)


def test_disconnect_while_connecting(reg):
    """disconnect cancels a pending ping; the pinged user is untouched."""
    reg.ping("a", "b")
    reg.ping("c", "b")
    assert reg.disconnect("a", "b") == [Transition("a", CONNECTING, IDLE, None)]
    assert state(reg, "b") == (IDLE, None)
    assert state(reg, "c") == (CONNECTING, "b")


def test_disconnect_crossed_pings_resets_both(reg):
    """disconnect resets the target too if it pointed back at the sender."""
    reg.ping("a", "b")
    reg.ping("b", "a")
    reg.disconnect("a", "b")
    assert state(reg, "b") == (IDLE, None)


def test_disconnect_without_target_is_invalid(reg):
    """disconnect to a user one is not pointing at is invalid-state."""
    with pytest.raises(InvalidState):
        reg.disconnect("a", "b")
    reg.ping("b", "a")
    with pytest.raises(InvalidState):
        reg.disconnect("a", "b")


def test_remove_resets_every_watcher(reg):
    """When a user leaves, its partner and everyone connecting to it go idle."""
    reg.ping("c", "a")
    reg.ping("d", "b")
    pair(reg, "a", "b")
    transitions = reg.remove("a")
    assert sorted(transitions) == [
        Transition("b", CONNECTED, IDLE, None),
        Transition("c", CONNECTING, IDLE, None),
    ]
    assert get(reg, "a") is None
    assert state(reg, "b") == (IDLE, None)
    assert state(reg, "d") == (CONNECTING, "b")
    assert reg.remove("a") == []


def test_remove_of_a_pinger_tells_nobody(reg):
    """A connecting user that leaves is removed without notifying its target."""
    reg.ping("a", "b")
    assert reg.remove("a") == []
    assert state(reg, "b") == (IDLE, None)
    assert reg.remove("b") == []


def test_peers_and_summary_empty_after_everyone_leaves(reg):
    """The registry holds nothing once every user has left."""
    pair(reg, "a", "b")
    reg.ping("c", "d")
    for name in "abcd":
        reg.remove(name)
    assert reg.peers() == []
    assert reg.summary() == {"users": 0, "idle": 0, "connecting": 0, "connected": 0, "pairs": 0, "offline": 0}
    if isinstance(reg, Registry):
        assert reg._pointing == {}
    else:  # nothing left behind in Redis but the node's liveness entry
        assert reg.client.keys(RULES_PREFIX + "*") == [RULES_PREFIX + "nodes"]
