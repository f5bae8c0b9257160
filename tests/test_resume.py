"""
Tier 1: resume after a dropped socket (docs/protocol.rst, "Resume"), in
memory with a fake clock: the grace period, the queue, expiry, and which
closes and tokens start or end a session.
"""

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from memory import Harness
from twisted.logger import capturedLogs, formatEvent

from signaling.tokens import make_resume_token, verify_resume_token

pytestmark = pytest.mark.memory

GRACE = 15.0


def left(peer_id):
    return {"type": "disconnect", "from": peer_id, "data": {"reason": "peer_left"}}


def offer(sender, n):
    return {"type": "offer", "from": sender, "data": {"n": n}}


def cut(h, client):
    """The client's socket is lost: no close frame from either side."""
    client.transport.abortConnection()
    h.flush()


def reconnect(h, token, **kwargs):
    """Connect with ``?resume=token``; return the client and its welcome."""
    client = h.connect(handshake=False, url=f"ws://127.0.0.1:8080/?resume={quote(token)}", **kwargs)
    welcome = client.take()
    assert len(welcome) >= 1 and welcome[0]["type"] == "welcome", welcome
    client.received = welcome[1:]  # what followed the welcome
    return client, welcome[0]


def user(h, peer_id):
    return h.registry.get(peer_id)


def paired_harness(**settings):
    h = Harness(**settings)
    a, b = h.connect(), h.connect()
    h.pair(a, b)
    return h, a, b


def token_of(h, client):
    return h.factory.resume_token(client.peer_id)


def test_lost_socket_keeps_id_state_and_partner_for_the_grace_period():
    """A socket lost without a close frame: the peer stays, offline, paired; its partner hears nothing."""
    h, a, b = paired_harness()
    A = a.peer_id
    with capturedLogs() as events:
        cut(h, a)
    assert any(f"peer {A} (127.0.0.1) lost its connection" in formatEvent(e) and "in grace for 15.0s" in formatEvent(e)
               for e in events)
    peer = user(h, A)
    assert (peer.online, peer.state, peer.target) == (False, "connected", b.peer_id)
    assert A not in h.factory.connections
    h.clock.advance(GRACE - 0.01)
    h.flush()
    assert b.take() == []
    assert user(h, A) is not None


def test_relays_are_queued_and_follow_the_welcome_in_order():
    """What is sent to a peer in grace waits; ?resume= gives the same id, resumed, then the queue in order."""
    h, a, b = paired_harness()
    A, B = a.peer_id, b.peer_id
    token = token_of(h, a)
    cut(h, a)
    for n in range(3):
        h.send(b, {"type": "offer", "to": A, "data": {"n": n}})
    h.send(b, {"type": "ice-candidate", "to": A, "data": {"c": 1}})
    assert b.take() == []  # no error: queued
    h.clock.advance(GRACE / 2)
    with capturedLogs() as events:
        again, welcome = reconnect(h, token)
    assert (welcome["id"], welcome["resumed"]) == (A, True)
    assert welcome["resume"] == token  # the same session, the same token
    assert again.take() == [offer(B, 0), offer(B, 1), offer(B, 2),
                            {"type": "ice-candidate", "from": B, "data": {"c": 1}}]
    assert any(f"peer {A} resumed from 127.0.0.1 (4 queued messages)" in formatEvent(e) for e in events)
    peer = user(h, A)
    assert (peer.online, peer.state, peer.target) == (True, "connected", B)
    # the pair goes on as before, both ways, and the grace timer is gone
    h.send(again, {"type": "answer", "to": B, "data": {"sdp": "x"}})
    assert b.take() == [{"type": "answer", "from": A, "data": {"sdp": "x"}}]
    h.send(b, {"type": "offer", "to": A, "data": {"n": 9}})
    assert again.take() == [offer(B, 9)]
    h.clock.advance(GRACE)
    h.flush()
    assert b.take() == [] and user(h, A).online


def test_queue_full():
    """Past --resume-queue messages, the sender gets queue-full and the message is not kept."""
    h, a, b = paired_harness(resume_queue=2)
    A = a.peer_id
    token = token_of(h, a)
    cut(h, a)
    for n in range(3):
        h.send(b, {"type": "offer", "to": A, "data": {"n": n}})
    errors = b.take()
    assert [(e["type"], e["code"], e["ref"]) for e in errors] == [("error", "queue-full", "offer")]
    assert "reconnecting" in errors[0]["message"]
    again, _ = reconnect(h, token)
    assert again.take() == [offer(b.peer_id, 0), offer(b.peer_id, 1)]


def test_expiry_removes_the_peer_and_tells_the_partner():
    """When the grace period ends without a resume, the peer is removed as in v1: its partner gets peer_left."""
    h, a, b = paired_harness()
    A = a.peer_id
    cut(h, a)
    h.send(b, {"type": "offer", "to": A, "data": {}})
    with capturedLogs() as events:
        h.clock.advance(GRACE)
        h.flush()
    assert b.take() == [left(A)]
    assert user(h, A) is None and user(h, b.peer_id).state == "idle"
    assert any(f"peer {A} (127.0.0.1) did not resume within 15.0s: removed (1 queued messages dropped)"
               in formatEvent(e) for e in events)
    h.send(b, {"type": "offer", "to": A, "data": {}})
    assert [e["code"] for e in b.take()] == ["peer-not-found"]


def test_a_token_after_expiry_gets_the_same_id_idle():
    """A valid token whose session is gone gets the same id back (it is free), resumed false, idle."""
    h, a, b = paired_harness()
    A = a.peer_id
    token = token_of(h, a)
    cut(h, a)
    h.clock.advance(GRACE)
    h.flush()
    b.take()
    again, welcome = reconnect(h, token)
    assert (welcome["id"], welcome["resumed"]) == (A, False)
    assert again.take() == []
    assert (user(h, A).state, user(h, A).online) == ("idle", True)
    h.pair(b, again)  # and it pairs again as anyone would


@pytest.mark.parametrize("code", [1000, 1001])
def test_a_close_from_the_peer_ends_the_session_at_once(code):
    """A close frame from the client itself (1000 or 1001) ends the session at once, as in v1."""
    h, a, b = paired_harness()
    A = a.peer_id
    a.sendCloseFrame(code=code, isReply=False)  # (Autobahn's sendClose() refuses 1001 from a client)
    h.flush()
    assert b.take() == [left(A)]
    assert user(h, A) is None


def test_a_peer_failed_for_a_protocol_error_gets_no_grace():
    """A connection this server failed (here: a message above the size limit, 1009) ends its session at once."""
    h, a, b = paired_harness(max_message_size=1024)
    A = a.peer_id
    h.send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "x" * 2000}})
    assert a.remoteCloseCode == 1009
    assert b.take() == [left(A)]
    assert user(h, A) is None


@pytest.mark.parametrize("token", [
    "forged",
    "eyJyaWQiOiJwZWVyLTEifQ.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "",
])
def test_an_invalid_token_gets_a_fresh_id(token):
    """A token this server did not sign (or garbage) is ignored: a fresh id, resumed false; the session stays."""
    h, a, b = paired_harness()
    A = a.peer_id
    cut(h, a)
    other, welcome = reconnect(h, token)
    assert welcome["id"] not in (A, b.peer_id) and welcome["resumed"] is False
    assert (user(h, A).online, user(h, A).state) == (False, "connected")


def test_a_token_signed_with_another_secret_gets_a_fresh_id():
    """A token for the right id, signed by another server's secret (say, a restart without a secret file)."""
    h, a, b = paired_harness()
    A = a.peer_id
    cut(h, a)
    other, welcome = reconnect(h, make_resume_token(b"another server's secret!", A))
    assert welcome["id"] != A and welcome["resumed"] is False


def test_resume_while_the_old_socket_is_still_open_moves_the_session():
    """
    A peer whose old socket is not found dead yet (a network change)
    resumes on a new one: the old one is closed with 4409 without ending the
    session; the partner hears nothing; relays go to the new socket.
    """
    h, a, b = paired_harness()
    A, B = a.peer_id, b.peer_id
    again, welcome = reconnect(h, token_of(h, a))
    assert (welcome["id"], welcome["resumed"]) == (A, True)
    assert a.closed_with[1] == 4409
    assert b.take() == []
    assert (user(h, A).state, user(h, A).online) == ("connected", True)
    h.send(b, {"type": "offer", "to": A, "data": {"n": 1}})
    assert again.take() == [offer(B, 1)]
    again.sendClose(1000)
    h.flush()
    assert b.take() == [left(A)]


def test_lost_again_after_resuming_gets_a_new_grace_period():
    """The grace period starts again at each loss; the first one's timer does not end the second."""
    h, a, b = paired_harness()
    A = a.peer_id
    token = token_of(h, a)
    cut(h, a)
    h.clock.advance(10)
    again, _ = reconnect(h, token)
    cut(h, again)
    h.clock.advance(10)  # 20 s after the first loss, 10 after the second
    h.flush()
    assert b.take() == [] and user(h, A) is not None
    h.clock.advance(5)
    h.flush()
    assert b.take() == [left(A)]


def test_no_grace_with_resume_grace_0():
    """--resume-grace=0: a lost socket ends the session at once, as in v1 (the welcome still has a token)."""
    h, a, b = paired_harness(resume_grace=0)
    A = a.peer_id
    cut(h, a)
    assert b.take() == [left(A)]


def test_stats_show_peers_in_grace_offline():
    """/api/stats lists a peer in grace with "online": false."""
    from signaling.web import stats_document

    h, a, b = paired_harness()
    A = a.peer_id
    cut(h, a)
    online = {u["id"]: u["online"] for u in stats_document(h.registry.peers())["users"]}
    assert online == {A: False, b.peer_id: True}


def test_queue_is_bounded_in_bytes_too():
    """A peer in grace holds at most --max-outbound-buffer bytes of queued messages: past that, queue-full."""
    h, a, b = paired_harness(max_outbound=3000)
    A = a.peer_id
    token = token_of(h, a)
    cut(h, a)
    for n in range(3):
        h.send(b, {"type": "offer", "to": A, "data": {"sdp": "x" * 1200, "n": n}})
    assert [(e["code"], e["ref"]) for e in b.take()] == [("queue-full", "offer")]
    again, _ = reconnect(h, token)
    assert [m["data"]["n"] for m in again.take()] == [0, 1]


def test_sessions_in_grace_are_capped_per_address():
    """
    No address holds more peers in grace than --max-connections-per-ip (a
    client dropping connections on purpose cannot pile up sessions): past
    it, a lost socket ends its session at once.  The count frees up as grace
    periods end.
    """
    h = Harness(max_connections_per_ip=2)
    watcher = h.connect()
    first = [h.connect(host="10.0.0.7") for _ in range(2)]
    other = h.connect(host="10.0.0.8")
    for p in first + [other]:
        cut(h, p)
    third = h.connect(host="10.0.0.7")  # (its connections are closed: it may connect again)
    h.pair(watcher, third)
    T = third.peer_id
    with capturedLogs() as events:
        cut(h, third)
    assert user(h, T) is None and watcher.take() == [left(T)]
    assert any("no grace period, too many peers in grace (from its address)" in formatEvent(e) for e in events)
    assert len([p for p in h.registry.peers() if not p.online]) == 3  # the first two, and 10.0.0.8's
    h.clock.advance(GRACE)
    h.flush()
    again = h.connect(host="10.0.0.7")
    A = again.peer_id
    cut(h, again)
    assert user(h, A) is not None and not user(h, A).online


def test_a_fixed_id_back_without_its_resume_token_takes_its_grace_period_over():
    """
    A peer whose access token fixes its id, lost while paired, connects again
    with that token but no resume token: as with an open older connection, the
    newer one takes the id over (its partner is told peer_left) and is welcomed
    with the id, idle; nothing of the old session is left.
    """
    from memory import Harness

    from signaling.tokens import make_token

    secret = b"k" * 32
    h = Harness(token_secret=secret, resume_grace=30)
    token = make_token(secret, ttl=600, peer_id="alice", now=h.clock.seconds())
    alice = h.connect(url="ws://127.0.0.1:8080/?token=" + token)
    bob = h.connect(url="ws://127.0.0.1:8080/?token=" + make_token(secret, ttl=600, now=h.clock.seconds()))
    h.pair(bob, alice)
    alice.transport.loseConnection()  # lost without a close frame: in grace
    h.flush()
    assert "alice" in h.factory._local_sessions and not h.registry.get("alice").online
    again = h.connect(url="ws://127.0.0.1:8080/?token=" + token)  # (checks the welcome: id alice)
    assert bob.take() == [{"type": "disconnect", "from": "alice", "data": {"reason": "peer_left"}}]
    assert "alice" not in h.factory._local_sessions
    peer = h.registry.get("alice")
    assert (peer.state, peer.online) == ("idle", True) and h.factory.connections["alice"] is again.server
    h.pair(bob, again)
    h.send(bob, {"type": "offer", "to": "alice", "data": {"n": 1}})
    assert again.take() == [{"type": "offer", "from": bob.peer_id, "data": {"n": 1}}]
    h.clock.advance(60)  # the old grace period's timer is gone: nothing expires
    h.flush()
    assert h.registry.get("alice").state == "connected" and bob.take() == []


@pytest.mark.pure
@given(st.text(alphabet="abcdefABC0123456789-._~:@+=", min_size=1, max_size=40), st.binary(min_size=16, max_size=100))
def test_resume_tokens_are_signed_json_as_documented(peer_id, secret):
    """A resume token is base64url JSON {"rid": id}, a dot, and the HMAC-SHA256 of that text with the secret."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")

    payload = b64(json.dumps({"rid": peer_id}, separators=(",", ":")).encode("utf-8"))
    expected = payload + "." + b64(hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest())
    assert make_resume_token(secret, peer_id) == expected
    assert verify_resume_token(secret, expected) == peer_id
    assert verify_resume_token(secret + b"!", expected) is None
