"""Tier 2: admission control (origins, tokens, connection limits, proxies) in memory."""

import ipaddress

import pytest
from memory import Harness
from twisted.logger import capturedLogs

from signaling.admission import client_address, origin_allowed
from signaling.tokens import TokenError, main, make_token, verify_token

pytestmark = pytest.mark.memory

SECRET = b"0123456789abcdef-test-secret"


def refusal(h, **kwargs):
    """
    Connect expecting a refused handshake; return the HTTP status the client
    got (the same as the server logged, when the refusal was within the log
    budget).
    """
    with capturedLogs() as events:
        client = h.connect(handshake=False, **kwargs)
    assert client.received == []
    assert client.closed_with is not None
    status = int(client.http_status_line.split()[1])
    logged = [e["status"] for e in events if "status" in e and "refused" in e.get("log_format", "")]
    assert logged in ([], [status]), events
    return status


# -- origins ------------------------------------------------------------------------


def test_origin_allowed_rules():
    """Exact and wildcard origins match case-insensitively; no Origin header is not a browser and passes."""
    allowed = ("https://app.example.com", "https://*.example.org")
    assert origin_allowed("https://APP.example.com", allowed)
    assert origin_allowed("https://a.example.org", allowed)
    assert not origin_allowed("https://evil.example.com", allowed)
    assert not origin_allowed("http://app.example.com", allowed)
    assert not origin_allowed("null", allowed)
    assert origin_allowed(None, allowed)
    assert origin_allowed("https://anything", ())


def test_origin_allow_list_at_handshake():
    """With an allow-list, a listed Origin is welcomed and another is refused with 403."""
    h = Harness(allowed_origins=("https://app.example.com",))
    h.connect(origin="https://app.example.com")
    assert refusal(h, origin="https://evil.example.com") == 403
    assert len(h.registry) == 1 and h.factory.admitted == 1


# -- tokens ---------------------------------------------------------------------------


def test_token_round_trip():
    """A token made with the secret verifies, carrying its expiry and fixed peer id."""
    token = make_token(SECRET, ttl=60, peer_id="alice", now=1000)
    assert verify_token(SECRET, token, now=1059) == {"exp": 1060, "sub": "alice"}
    assert "sub" not in verify_token(SECRET, make_token(SECRET, 60, now=1000), now=1000)


@pytest.mark.parametrize(
    "mangle, reason",
    [
        (lambda t: t[:-2] + ("AA" if t[-2:] != "AA" else "BB"), "bad token signature"),
        (lambda t: "x" + t, "bad token signature"),
        (lambda t: t.replace(".", ""), "malformed token"),
        (lambda t: "", "missing or oversized token"),
        (lambda t: "a" * 3000, "missing or oversized token"),
        (lambda t: t + "é", "malformed token"),
        (lambda t: "\u0663" + t, "malformed token"),
        (lambda t: t.replace(".", "\x00."), "malformed token"),
        (lambda t: t + ".x", "malformed token"),
        (lambda t: t.replace(".", " ."), "malformed token"),
    ],
)
def test_token_tampering_refused(mangle, reason):
    """Tampered, truncated or oversized tokens are refused with a reason."""
    token = make_token(SECRET, ttl=60, now=1000)
    with pytest.raises(TokenError) as e:
        verify_token(SECRET, mangle(token), now=1000)
    assert str(e.value) == reason


def test_token_expiry_and_wrong_secret():
    """Expired tokens and tokens made with another secret are refused."""
    token = make_token(SECRET, ttl=60, now=1000)
    with pytest.raises(TokenError, match="expired"):
        verify_token(SECRET, token, now=1060)
    with pytest.raises(TokenError, match="signature"):
        verify_token(b"another-secret-of-16+", token, now=1000)


def test_token_of_any_kind_of_junk_is_a_token_error():
    """Whatever the text, verifying raises TokenError (HTTP 401), never another error (HTTP 500)."""
    import string

    from hypothesis import given, settings
    from hypothesis import strategies as st

    alphabet = st.sampled_from(string.printable + "é漢\u202e\x00\ud800.")

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet, max_size=80) | st.text(max_size=80))
    def check(text):
        try:
            verify_token(SECRET, text, now=1000)
        except TokenError:
            pass

    check()


def test_token_maximum_lifetime():
    """A token valid for longer than the server's maximum lifetime is refused; within it, accepted."""
    token = make_token(SECRET, ttl=7 * 86400, now=1000)
    with pytest.raises(TokenError, match="longer than the server allows"):
        verify_token(SECRET, token, now=1000, max_lifetime=86400)
    assert verify_token(SECRET, token, now=1000 + 6 * 86400, max_lifetime=86400)["exp"] == 1000 + 7 * 86400
    h = Harness(token_secret=SECRET, token_max_lifetime=3600)
    now = h.clock.seconds()
    assert refusal(h, url="ws://127.0.0.1:8080/?token=" + make_token(SECRET, 3601, now=now)) == 401
    h.connect(url="ws://127.0.0.1:8080/?token=" + make_token(SECRET, 3600, now=now))


def test_token_peer_id_validated():
    """Peer ids in tokens are limited to a safe alphabet and length."""
    with pytest.raises(ValueError):
        make_token(SECRET, 60, peer_id="has space")
    with pytest.raises(ValueError):
        make_token(SECRET, 60, peer_id="x" * 129)


def test_token_command(tmp_path, capsys):
    """``python -m signaling.tokens`` prints a token that verifies with the secret file's contents."""
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(SECRET + b"\n")
    assert main(["--secret-file", str(secret_file), "--ttl", "120", "--peer-id", "bob"]) == 0
    token = capsys.readouterr().out.strip()
    import time

    assert verify_token(SECRET, token, now=time.time())["sub"] == "bob"
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    assert main(["--secret-file", str(short)]) == 2
    assert "at least 16 bytes" in capsys.readouterr().err
    for ttl in ("-5", "0", "nan", "inf"):  # an expired token, or no valid one at all
        with pytest.raises(SystemExit) as e:
            main(["--secret-file", str(secret_file), "--ttl", ttl])
        assert e.value.code == 2 and "--ttl must be a positive number of seconds" in capsys.readouterr().err
    assert main(["--secret-file", str(secret_file), "--ttl", "604800"]) == 0
    assert "servers refuse tokens valid for longer" in capsys.readouterr().err


def test_token_required_at_handshake():
    """With a secret set, no token, a bad one or an expired one is refused with 401; a good one is welcomed."""
    h = Harness(token_secret=SECRET)
    now = h.clock.seconds()
    good = make_token(SECRET, ttl=60, now=now)
    assert refusal(h) == 401
    assert refusal(h, url="ws://127.0.0.1:8080/?token=nonsense") == 401
    assert refusal(h, url="ws://127.0.0.1:8080/?token=" + make_token(SECRET, -1, now=now)) == 401
    h.connect(url="ws://127.0.0.1:8080/?token=" + good)
    h.connect(headers={"Authorization": "Bearer " + good})
    assert len(h.registry) == 2


def test_token_fixes_the_peer_id():
    """
    A token with a peer id gives that id.  A newer connection with that id
    takes it over: the older one (say, on a network that died unnoticed) is
    closed with 4409 at once and its partner told peer_left; the newer one
    is welcomed with the id, idle.
    """
    h = Harness(token_secret=SECRET)
    token = make_token(SECRET, ttl=60, peer_id="alice", now=h.clock.seconds())
    url = "ws://127.0.0.1:8080/?token=" + token
    alice = h.connect(url=url)
    assert alice.peer_id == "alice"
    assert "alice" in h.registry
    bob = h.connect(url="ws://127.0.0.1:8080/?token=" + make_token(SECRET, ttl=60, now=h.clock.seconds()))
    h.pair(bob, alice)
    again = h.connect(url=url)  # checks the welcome with id alice
    assert alice.closed_with is not None and alice.closed_with[1] == 4409
    assert bob.take() == [{"type": "disconnect", "from": "alice", "data": {"reason": "peer_left"}}]
    assert h.registry.get("alice").state == "idle" and h.factory.connections["alice"] is again.server
    assert h.factory.admitted == 2 and h.factory.reserved == set()
    h.pair(bob, again)
    again.sendClose(1000)
    h.flush()
    assert "alice" not in h.registry
    assert h.connect(url=url).peer_id == "alice"


def test_fixed_id_while_its_handshake_is_under_way():
    """A second handshake for a fixed id whose first connection is not open yet is refused with 409."""
    from test_protocol import PendingRegistry

    from signaling.registry import Registry

    h = Harness(token_secret=SECRET)
    pending = PendingRegistry(Registry(h.clock))
    h.factory.registry = pending
    url = "ws://127.0.0.1:8080/?token=" + make_token(SECRET, ttl=60, peer_id="carol", now=h.clock.seconds())
    first = h.connect(url=url, handshake=False)
    assert first.received == []  # open, not yet welcomed: the registry has not answered
    assert refusal(h, url=url) == 409
    pending.release()
    h.flush()
    [welcome] = first.take()
    assert (welcome["type"], welcome["id"], welcome["resumed"]) == ("welcome", "carol", False)
    assert h.factory.reserved == set()


# -- connection limits ----------------------------------------------------------------


def test_per_address_and_total_limits():
    """Past the per-address limit a handshake gets 429, past the total 503; closing frees a slot."""
    h = Harness(max_connections=3, max_connections_per_ip=2)
    a1 = h.connect(host="127.0.0.1")
    h.connect(host="127.0.0.1")
    assert refusal(h, host="127.0.0.1") == 429
    h.connect(host="127.0.0.2")
    assert refusal(h, host="127.0.0.3") == 503
    assert h.factory.admitted == 3
    assert h.factory.per_ip == {"127.0.0.1": 2, "127.0.0.2": 1}
    a1.sendClose(1000)
    h.flush()
    assert h.factory.per_ip == {"127.0.0.1": 1, "127.0.0.2": 1}
    h.connect(host="127.0.0.3")
    assert h.factory.admitted == 3


def test_refused_handshakes_leave_no_state():
    """Refused handshakes leave nothing behind in the registry or the counters."""
    h = Harness(max_connections=1, allowed_origins=("https://ok.example",))
    for _ in range(20):
        refusal(h, origin="https://bad.example")
    keep = h.connect(origin="https://ok.example")
    for _ in range(20):
        refusal(h, origin="https://ok.example")
    assert h.factory.admitted == 1 and len(h.registry) == 1
    keep.sendClose(1000)
    h.flush()
    assert h.factory.admitted == 0 and h.factory.per_ip == {} and len(h.registry) == 0


# -- proxies --------------------------------------------------------------------------

PROXIES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    "peer, header, expected",
    [
        ("127.0.0.1", "203.0.113.9", "203.0.113.9"),
        ("127.0.0.1", "198.51.100.1, 203.0.113.9", "203.0.113.9"),
        ("127.0.0.1", "203.0.113.9, 10.1.2.3", "203.0.113.9"),
        ("127.0.0.1", "10.1.2.3", "10.1.2.3"),
        ("127.0.0.1", "not-an-ip", "127.0.0.1"),
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", "2001:db8::1", "2001:db8::1"),
        ("192.0.2.50", "203.0.113.9", "192.0.2.50"),
    ],
)
def test_client_address(peer, header, expected):
    """X-Forwarded-For counts only from trusted proxies, and only its nearest untrusted hop."""
    assert client_address(peer, header, PROXIES) == expected


def test_forwarded_address_in_registry_and_limits():
    """Behind a trusted proxy the forwarded address is the peer's ip and what per-address limits count."""
    h = Harness(trusted_proxies=PROXIES, max_connections_per_ip=1)
    a = h.connect(headers={"X-Forwarded-For": "203.0.113.9"})
    assert h.registry.get(a.peer_id).ip == "203.0.113.9"
    h.connect(headers={"X-Forwarded-For": "203.0.113.10"})
    assert refusal(h, headers={"X-Forwarded-For": "203.0.113.9"}) == 429
    spoof = h.connect(host="127.0.0.9", headers={"X-Forwarded-For": "203.0.113.77"})
    assert h.registry.get(spoof.peer_id).ip == "127.0.0.9"
