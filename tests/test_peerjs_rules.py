"""Tier 1: PeerJS's rules (signaling.peerjs), pure: ids, client messages, server frames, the queue and EXPIRE."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from signaling import peerjs
from signaling.errors import SignalingError

pytestmark = pytest.mark.pure


@pytest.mark.parametrize("text", [
    "a", "A1", "abc-def", "a_b", "a b", "x-y_z w9", "0", "123e4567-e89b-42d3-a456-426614174000", "a" * 128,
])
def test_valid_ids(text):
    """Ids as the PeerJS client accepts them: letters and digits, single -, _ or spaces inside."""
    assert peerjs.valid_id(text)


@pytest.mark.parametrize("text", [
    "", " a", "a ", "-a", "a-", "a--b", "a  b", "a_-b", "a/b", "a.b", "ä", "a\nb", "a\x00", "a" * 129, None, 5, ["a"],
])
def test_invalid_ids(text):
    """Anything else is refused: other characters, separators at the ends or doubled, too long, not a string."""
    assert not peerjs.valid_id(text)


@given(st.text(max_size=200))
def test_valid_ids_are_what_the_client_accepts(text):
    """The rule is the client's own (validateId: /^[A-Za-z0-9]+(?:[ _-][A-Za-z0-9]+)*$/), bounded in length."""
    import re

    client = re.fullmatch(r"[A-Za-z0-9]+(?:[ _-][A-Za-z0-9]+)*", text, re.ASCII) is not None
    assert peerjs.valid_id(text) == (client and len(text) <= peerjs.MAX_ID)


def test_tokens_and_their_digests():
    """A token is any short non-empty string; what is kept of it is a digest, equal only for the same token."""
    assert peerjs.valid_token("k3j2h4g5") and peerjs.valid_token("x" * 256)
    assert not peerjs.valid_token("") and not peerjs.valid_token("x" * 257) and not peerjs.valid_token(None)
    assert peerjs.token_digest("abc") == peerjs.token_digest("abc") != peerjs.token_digest("abd")
    assert peerjs.token_digest("\udc80") != peerjs.token_digest("")  # (a lone surrogate from a URL: no crash)


def test_parse_each_client_message():
    """HEARTBEAT, and OFFER/ANSWER/CANDIDATE/LEAVE with dst and payload (which may be any JSON, or absent)."""
    assert peerjs.parse(b'{"type":"HEARTBEAT"}') == ("HEARTBEAT", None, None)
    payload = {"sdp": {"type": "offer", "sdp": "v=0\r\n"}, "connectionId": "dc_1", "n": [1, 2.5, None, "漢"]}
    for kind in ("OFFER", "ANSWER", "CANDIDATE", "LEAVE"):
        frame = json.dumps({"type": kind, "dst": "b", "payload": payload, "extra": 1}).encode()
        assert peerjs.parse(frame) == (kind, "b", payload)
    assert peerjs.parse(b'{"type":"OFFER","dst":"b"}') == ("OFFER", "b", None)
    assert peerjs.parse(b'{"type":"LEAVE"}') == ("LEAVE", None, None)  # a client leaving: nothing to relay


@pytest.mark.parametrize("frame, code, ref", [
    (b"nonsense", "invalid-json", None),
    (b"", "invalid-json", None),
    (b'{"type":"OFFER","dst":"b","payload":NaN}', "invalid-json", None),
    (b'{"type":"OFFER","dst":"b","payload":1e999}', "invalid-json", None),
    (b"[" * 100000 + b"]" * 100000, "invalid-json", None),
    (b"[1]", "invalid-message", None),
    (b'"OFFER"', "invalid-message", None),
    (b"{}", "invalid-message", None),
    (b'{"type":7}', "invalid-message", None),
    (b'{"type":"OFFER"}', "invalid-message", "OFFER"),
    (b'{"type":"OFFER","dst":""}', "invalid-message", "OFFER"),
    (b'{"type":"CANDIDATE","dst":["b"]}', "invalid-message", "CANDIDATE"),
    (b'{"type":"LEAVE","dst":5}', "invalid-message", "LEAVE"),
    (b'{"type":"offer","dst":"b"}', "unknown-type", "offer"),
    (b'{"type":"EXPIRE","dst":"b"}', "unknown-type", "EXPIRE"),
    (b'{"type":"OPEN"}', "unknown-type", "OPEN"),
])
def test_parse_errors_are_named(frame, code, ref):
    """Malformed input raises a named error (its code and the offending type), never anything else."""
    with pytest.raises(SignalingError) as e:
        peerjs.parse(frame)
    assert (e.value.code, e.value.ref) == (code, ref)
    assert e.value.message


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_parse_takes_any_input(data):
    """Any bytes give a message or a named error."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # (the WebSocket layer refuses invalid UTF-8 before this)
    try:
        message = peerjs.parse(text.encode("utf-8"))
    except SignalingError:
        return
    assert message.type in peerjs.CLIENT_TYPES


def test_server_frames():
    """The frames PeerJS clients read, as PeerJS server 1.0 words them."""
    assert json.loads(peerjs.OPEN) == {"type": "OPEN"}
    assert json.loads(peerjs.ID_TAKEN) == {"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}}
    assert json.loads(peerjs.INVALID_KEY) == {"type": "INVALID-KEY", "payload": {"msg": "Invalid key provided"}}
    assert json.loads(peerjs.error("why")) == {"type": "ERROR", "payload": {"msg": "why"}}
    assert json.loads(peerjs.expire("b", "a")) == {"type": "EXPIRE", "src": "b", "dst": "a"}
    assert json.loads(peerjs.relay("OFFER", "a", "b", {"x": "ü"})) == {
        "type": "OFFER", "src": "a", "dst": "b", "payload": {"x": "ü"}}
    assert json.loads(peerjs.relay("LEAVE", "a", "b", None)) == {"type": "LEAVE", "src": "a", "dst": "b"}


# -- the queue ----------------------------------------------------------------------------


class Expiries:
    def __init__(self):
        self.calls = []

    def __call__(self, to, senders):
        self.calls.append((to, senders))


def pending(**bounds):
    clock = Clock()
    expired = Expiries()
    return peerjs.Pending(clock, 5.0, expired, **bounds), clock, expired


def drain(p, to):
    out = []
    while (held := p.first(to)) is not None:
        assert p.delivered(to, held)
        out.append((held.sender, held.frame))
    return out


def test_messages_wait_and_come_out_in_order():
    """Held messages come out first in, first out, per destination; then nothing is left (no timer either)."""
    p, clock, expired = pending()
    for n in range(3):
        assert p.hold("a", "x", "CANDIDATE", b"%d" % n) is None
    assert p.hold("b", "y", "OFFER", b"y") is None
    assert "x" in p and "y" in p and len(p) == 4 and p.destinations() == ["x", "y"]
    assert drain(p, "x") == [("a", b"0"), ("a", b"1"), ("a", b"2")]
    assert "x" not in p and len(p) == 1
    assert drain(p, "y") == [("b", b"y")]
    assert (len(p), p.bytes, clock.getDelayedCalls()) == (0, 0, [])
    clock.advance(60)
    assert expired.calls == []


def test_a_queue_expires_after_the_timeout_with_one_call_naming_each_sender_once():
    """After the timeout from its first message, a queue is dropped; each sender is named once, in order."""
    p, clock, expired = pending()
    p.hold("a", "x", "OFFER", b"1")
    clock.advance(4)
    p.hold("b", "x", "OFFER", b"2")
    p.hold("a", "x", "CANDIDATE", b"3")  # (joins the queue, and expires with it)
    clock.advance(0.99)
    assert expired.calls == []
    clock.advance(0.01)
    assert expired.calls == [("x", ["a", "b"])]
    assert "x" not in p and len(p) == 0 and p.bytes == 0 and p.first("x") is None
    assert p.hold("a", "x", "OFFER", b"4") is None  # a new queue, with its own timer
    clock.advance(5)
    assert expired.calls[-1] == ("x", ["a"])


def test_delivered_after_expiry_is_refused():
    """A message taken out before its queue expired, answered late, is not counted twice."""
    p, clock, _ = pending()
    p.hold("a", "x", "OFFER", b"1")
    held = p.first("x")
    clock.advance(5)
    assert not p.delivered("x", held)
    p.hold("a", "x", "OFFER", b"2")
    assert not p.delivered("x", held)  # (not the first of the new queue)
    assert len(p) == 1


@pytest.mark.parametrize("bounds, fill, refused", [
    ({"per_destination": 2}, [("a", "x"), ("b", "x")], ("c", "x", "destination")),
    ({"per_sender": 2}, [("a", "x"), ("a", "y")], ("a", "z", "sender")),
    ({"total": 2}, [("a", "x"), ("b", "y")], ("c", "z", "total")),
    ({"destinations": 2}, [("a", "x"), ("a", "y")], ("b", "z", "total")),
    ({"sender_bytes": 25}, [("a", "x"), ("a", "y")], ("a", "z", "sender")),
    ({"total_bytes": 25}, [("a", "x"), ("b", "y")], ("c", "z", "total")),
])
def test_bounds(bounds, fill, refused):
    """Per destination, per sender (messages, bytes), in total (messages, bytes, destinations): past one, refused."""
    p, clock, expired = pending(**bounds)
    for sender, to in fill:
        assert p.hold(sender, to, "OFFER", b"x" * 10) is None
    sender, to, why = refused
    assert p.hold(sender, to, "OFFER", b"x" * 10) == why
    assert len(p) == len(fill)
    clock.advance(5)  # everything expires: the bounds are free again
    assert p.hold(sender, to, "OFFER", b"x" * 10) is None


def test_destinations_bound_leaves_existing_queues_open():
    """At the bound of destinations, messages for a destination that already waits are still held."""
    p, _, _ = pending(destinations=1)
    assert p.hold("a", "x", "OFFER", b"1") is None
    assert p.hold("a", "y", "OFFER", b"2") == "total"
    assert p.hold("b", "x", "OFFER", b"3") is None


@given(st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("xyz"), st.booleans(), st.integers(0, 3)),
                max_size=60))
def test_counts_always_match_what_is_held(steps):
    """Whatever is held, delivered and expired, the counts are the sum of what waits (nothing leaks)."""
    p, clock, expired = pending(per_destination=5, per_sender=7, total=12)
    for sender, to, deliver, wait in steps:
        p.hold(sender, to, "OFFER", sender.encode() * 3)
        if deliver and p.first(to) is not None:
            assert p.delivered(to, p.first(to))
        clock.advance(wait)
        queued = [h for t in p.destinations() for h in p._queues[t].items]
        assert len(p) == len(queued) and p.bytes == sum(len(h.frame) for h in queued)
        by_sender = {}
        for h in queued:
            by_sender[h.sender] = by_sender.get(h.sender, 0) + 1
        assert {s: c[0] for s, c in p._by_sender.items()} == by_sender
    clock.advance(5)
    assert len(p) == 0 and p.bytes == 0 and p._by_sender == {} and clock.getDelayedCalls() == []
