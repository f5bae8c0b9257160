"""
Tier 2: the fast frame path (small complete masked text frames taken without
Autobahn's frame machinery) behaves exactly like Autobahn's own path, for any
sequence of frames cut into any chunks.
"""
import json
import struct

import pytest
from fuzzing import frame
from hypothesis import given, settings
from hypothesis import strategies as st
from memory import Harness

from signaling.framing import text_frame, unmask

pytestmark = pytest.mark.memory


def outcome(frames, cuts, fast):
    """
    Feed the frames (cut at ``cuts``) to the server side of peer B, paired
    with A; return the bytes the server wrote back to B, what A received,
    and the state left behind.  B's own client is cut off first, so that the
    server's input is exactly these frames.
    """
    h = Harness(rate=0, max_message_size=65536)
    a, b = h.connect(), h.connect()
    h.pair(a, b)
    server = b.server
    h.pumps.remove(next(p for p in h.pumps if p.server is server))
    server.fast_path = fast
    data = b"".join(frames)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in zip(points, points[1:]):
        server.dataReceived(data[start:end])
        h.flush()
    to_b = b"".join(server.transport.stream)
    return to_b, json.dumps(a.take()), server.state, len(h.registry), len(h.factory.connections)


def text(obj):
    return json.dumps(obj).encode()


def msg(kind="offer", size=10):
    return {"type": kind, "to": "TARGET", "data": {"sdp": "x" * size}}


def build(specs, target):
    out = []
    for spec in specs:
        kind, arg = spec
        if kind == "text":
            out.append(frame(1, text(arg).replace(b"TARGET", target.encode())))
        elif kind == "raw":
            out.append(arg)
    return out


def same(frames, cuts=()):
    fast = outcome(frames, cuts, True)
    slow = outcome(frames, cuts, False)
    assert fast == slow
    return fast


def paired_frames(specs):
    """Frames addressed to the peer 'A' of outcome(): its id is peer-1 in a fresh Harness."""
    return build(specs, "peer-1")


CASES = {
    "one small": [("text", msg())],
    "many in one chunk": [("text", msg(size=n)) for n in (0, 1, 50, 100, 125)],
    "16-bit lengths": [("text", msg(size=200)), ("text", msg(size=60000))],
    "over the size limit": [("text", msg()), ("text", msg(size=70000)), ("text", msg())],
    "ping between": [("text", msg()), ("raw", frame(9, b"hi")), ("text", msg())],
    "fragmented": [("raw", frame(1, b'{"type":"offer",', fin=False)),
                   ("raw", frame(0, b'"to":"peer-1","data":{}}')), ("text", msg())],
    "binary": [("raw", frame(2, b"\x00\x01")), ("text", msg())],
    "bad utf-8": [("text", msg()), ("raw", frame(1, b'{"x":"\xff"}')), ("text", msg())],
    "unmasked": [("raw", frame(1, b"{}", mask=False))],
    "rsv bits": [("raw", frame(1, b"{}", rsv=2))],
    "non-minimal 16-bit length": [("raw", b"\x81\xfe\x00\x05" + b"\x00" * 4 + b"hello")],
    "64-bit length": [("raw", frame(1, text(msg(size=70000)))), ("text", msg())],
    "invalid json and errors": [("raw", frame(1, b"{nope")), ("text", {"type": "offer", "to": "nobody"}),
                                ("text", msg("pong"))],
    "close": [("text", msg()), ("raw", frame(8, struct.pack("!H", 1000))), ("text", msg())],
}


def test_cases_whole_and_byte_by_byte():
    """Every case gives the same result on both paths, whole and cut into single bytes."""
    for name, specs in CASES.items():
        frames = paired_frames(specs)
        total = sum(len(f) for f in frames)
        whole = same(frames)
        if total < 2000:
            bytewise = same(frames, cuts=range(total))
            if whole[2] == 3:  # still open: a stream must not care how it was cut
                assert bytewise == whole, name


def test_outcome_sees_errors_and_closes():
    """The comparison is not vacuous: refusals and close frames show in what the server wrote."""
    to_b, a_got, state, *_ = outcome(paired_frames([("raw", frame(1, b"{nope")), ("raw", frame(0, b"x"))]), (), True)
    assert b"invalid-json" in to_b and b"\x88" in to_b and a_got == "[]"
    assert state != 3  # not open any more (3 is Autobahn's STATE_OPEN)


def test_fast_path_relays(monkeypatch):
    """Small frames take the fast path (Autobahn's parser sees none of them) and are relayed unchanged."""
    from autobahn.twisted.websocket import WebSocketServerProtocol

    seen = []
    original = WebSocketServerProtocol.dataReceived

    def spy(self, data):
        seen.append(data)
        return original(self, data)

    monkeypatch.setattr(WebSocketServerProtocol, "dataReceived", spy)
    h = Harness(rate=0)
    a, b = h.connect(), h.connect()
    h.pair(a, b)
    seen.clear()
    frames = paired_frames([("text", msg(size=5)), ("text", msg("answer", 300))])
    b.server.dataReceived(b"".join(frames))
    h.flush()
    assert seen == []
    assert a.take() == [
        {"type": "offer", "from": b.peer_id, "data": {"sdp": "xxxxx"}},
        {"type": "answer", "from": b.peer_id, "data": {"sdp": "x" * 300}},
    ]


KEY = st.binary(min_size=4, max_size=4)
SPEC = st.one_of(
    st.builds(lambda k, n, key: ("raw", frame(1, text(msg(k, n)).replace(b"TARGET", b"peer-1"), key=key)),
              st.sampled_from(["offer", "answer", "ping", "pong"]), st.integers(0, 400), KEY),
    st.builds(lambda p, key: ("raw", frame(9, p, key=key)), st.binary(max_size=20), KEY),
    st.builds(lambda p, key: ("raw", frame(1, p, key=key)), st.binary(max_size=40), KEY),
    st.builds(lambda p, key: ("raw", frame(2, p, key=key)), st.binary(max_size=10), KEY),
    st.builds(lambda p, f, key: ("raw", frame(1, p, fin=f, key=key)), st.binary(max_size=10), st.booleans(), KEY),
    st.builds(lambda p, key: ("raw", frame(0, p, key=key)), st.binary(max_size=10), KEY),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(SPEC, min_size=1, max_size=8), st.lists(st.integers(0, 5000), max_size=6))
def test_any_frames_any_chunks(specs, cuts):
    """Random frame sequences, cut at random points, give the same result on both paths."""
    same(paired_frames(specs), cuts)


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmask(payload, mask):
    """Unmasking is XOR with the repeating 4-byte mask (and its own inverse)."""
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert unmask(payload, mask) == expected
    assert unmask(expected, mask) == payload


@given(st.binary(max_size=70000))
def test_server_frame_header(payload):
    """Server frames carry FIN+text and the minimal length encoding."""
    out = text_frame(payload)
    assert out[0] == 0x81
    if len(payload) < 126:
        assert out[1] == len(payload) and out[2:] == payload
    elif len(payload) < 65536:
        assert out[1] == 126 and struct.unpack("!H", out[2:4])[0] == len(payload) and out[4:] == payload
    else:
        assert out[1] == 127 and struct.unpack("!Q", out[2:10])[0] == len(payload) and out[10:] == payload


def test_frames_of_one_reactor_iteration_reach_a_peer_in_one_write():
    """
    Relays sent while the reactor handles one iteration's reads are held,
    then written to each peer together, in order, with one write, when the
    iteration is done (the reactor's next turn, a callLater(0)).
    """
    h = Harness(rate=0)
    a, b = h.connect(), h.connect()
    h.pair(a, b)
    to_a = a.server.transport
    writes = len(to_a.stream)
    frames = paired_frames([("text", msg(size=n)) for n in range(5)])
    b.server.dataReceived(b"".join(frames[:3]))  # two reads in one iteration
    b.server.dataReceived(b"".join(frames[3:]))
    assert len(to_a.stream) == writes  # held
    h.clock.advance(0)  # the iteration ends
    assert len(to_a.stream) == writes + 1 and to_a.stream[-1].count(b"\x81") == 5
    h.flush()
    assert [m["data"]["sdp"] for m in a.take()] == ["x" * n for n in range(5)]


def test_frames_from_other_nodes_reach_a_peer_in_one_write_a_turn():
    """
    What a cluster node's channel delivers to a peer of this process
    (deliver_local) is held like a relay of its own: the frames of one
    reactor turn go out in one write, in order, when the turn is done.
    """
    h = Harness(rate=0)
    a = h.connect()
    to_a = a.server.transport
    writes = len(to_a.stream)
    for n in range(4):
        assert h.factory.deliver_local(a.peer_id, text({"type": "offer", "from": "elsewhere", "data": {"n": n}}))
    assert not h.factory.deliver_local("nobody-here", b"{}")
    assert len(to_a.stream) == writes  # held
    h.clock.advance(0)  # the turn ends
    assert len(to_a.stream) == writes + 1 and to_a.stream[-1].count(b"\x81") == 4
    h.flush()
    assert [m["data"]["n"] for m in a.take()] == [0, 1, 2, 3]


def test_held_frames_go_before_a_close_frame():
    """A flooder's rate-limit errors reach it before the 1008 close frame, on both paths."""
    def flooded(fast):
        h = Harness(rate=1, burst=2, flood_strikes=3)
        a, b = h.connect(), h.connect()
        h.pair(a, b)
        server = b.server
        h.pumps.remove(next(p for p in h.pumps if p.server is server))
        server.fast_path = fast
        server.dataReceived(b"".join(paired_frames([("text", msg())] * 8)))
        return b"".join(server.transport.stream)

    fast, slow = flooded(True), flooded(False)
    assert fast == slow
    assert fast.count(b"rate-limited") == 2
    close = fast.index(b"\x88")
    assert close > fast.rindex(b"rate-limited") and b"message rate limit exceeded" in fast[close:]


def test_a_failing_write_costs_other_peers_nothing():
    """If writing one peer's held frames fails, the others still get theirs; the failure is logged."""
    from twisted.logger import capturedLogs

    h = Harness(rate=0)
    a, b, c, d = h.connect(), h.connect(), h.connect(), h.connect()
    h.pair(a, b)
    h.pair(c, d)

    def broken(data):
        raise RuntimeError("broken transport")

    b.server.transport.write = broken
    a.server.dataReceived(frame(1, text({"type": "offer", "to": b.peer_id})))  # held for b
    c.server.dataReceived(frame(1, text({"type": "offer", "to": d.peer_id})))  # held for d
    with capturedLogs() as events:
        h.flush()
    assert d.take() == [{"type": "offer", "from": c.peer_id, "data": {}}]
    assert any(e.get("log_failure") and "broken transport" in str(e["log_failure"].value) for e in events)
