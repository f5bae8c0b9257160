"""
Tiers 1 and 2: ICE servers and TURN credentials (signaling.turn), the
options that configure them, the welcome that carries them and
/api/ice-servers, pure and in memory.
"""

import base64
import hashlib
import hmac
import json

import pytest
from memory import Harness
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python import usage

from signaling.registry import Registry
from signaling.settings import Settings
from signaling.tap import SignalingOptions
from signaling.tokens import make_token
from signaling.turn import IceServers, check_uri, credential, read_secrets
from signaling.web import ICE_SERVERS_BURST, SignalingWeb

pytestmark = pytest.mark.pure

SECRET = b"turn-shared-secret-0123"


def recompute(username):
    return base64.b64encode(hmac.new(SECRET, username.encode(), hashlib.sha1).digest()).decode()


def test_coturn_vector():
    """The credential is coturn's: its documented example gives its documented password."""
    assert credential(b"north", "12334939:mbzrxpgjys") == "Iq7YXkRon8YXJfdN1Ke9EZOw1UE="


def test_ice_servers_shape():
    """STUN URIs in one entry, TURN URIs in another with "<expiry>:<user>" and its HMAC, as RTCIceServer wants."""
    clock = Clock()
    clock.advance(1_700_000_000)
    ice = IceServers(clock, ["stun:stun.example:3478"], ["turn:t.example:3478?transport=udp", "turns:t.example:5349"],
                     [SECRET, b"older-secret-still-accepted"], ttl=600)
    stun, turn = ice.for_user("peer-1")
    assert stun == {"urls": ["stun:stun.example:3478"]}
    assert turn["urls"] == ["turn:t.example:3478?transport=udp", "turns:t.example:5349"]
    assert turn["username"] == "1700000600:peer-1"  # the expiry, not the time of issue
    assert turn["credential"] == recompute(turn["username"])  # the first secret signs
    assert IceServers(None).for_user("x") == []
    assert IceServers(clock, stun=["stun:s.example"]).for_user("x") == [{"urls": ["stun:s.example"]}]
    with pytest.raises(ValueError):
        IceServers(clock, turn=["turn:t.example"])  # TURN without a secret


@pytest.mark.parametrize(
    "uri, kinds, ok",
    [
        ("stun:stun.example.com", ("stun", "stuns"), True),
        ("stun:192.0.2.1:3478", ("stun", "stuns"), True),
        ("stun:[2001:db8::1]:3478", ("stun", "stuns"), True),
        ("turn:turn.example.com:3478?transport=udp", ("turn", "turns"), True),
        ("turns:turn.example.com:5349?transport=tcp", ("turn", "turns"), True),
        ("turn:turn.example.com", ("stun", "stuns"), False),  # a TURN URI for --stun
        ("http://turn.example.com", ("turn", "turns"), False),
        ("turn:turn.example.com:99999", ("turn", "turns"), False),
        ("stun:stun.example.com?transport=udp", ("stun", "stuns"), False),
        ("turn:turn.example.com?transport=sctp", ("turn", "turns"), False),
        ("turn:", ("turn", "turns"), False),
        ("turn:user@host", ("turn", "turns"), False),
    ],
)
def test_uris_checked(uri, kinds, ok):
    """STUN and TURN URIs are checked against RFC 7064/7065 forms."""
    if ok:
        assert check_uri(uri, kinds) == uri
    else:
        with pytest.raises(ValueError):
            check_uri(uri, kinds)


def test_secret_files(tmp_path):
    """The secret file: one secret per line (the first signs); refused if others can read it, or if empty."""
    path = tmp_path / "turn-secret"
    path.write_bytes(b"  new-secret  \n\nold-secret\n")
    path.chmod(0o600)
    assert read_secrets(str(path)) == [b"new-secret", b"old-secret"]
    path.chmod(0o644)
    with pytest.raises(ValueError, match="can be read or written by anyone"):
        read_secrets(str(path))
    path.chmod(0o600)
    path.write_bytes(b"\n \n")
    with pytest.raises(ValueError, match="holds no secret"):
        read_secrets(str(path))


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "turn-secret"
    path.write_bytes(SECRET + b"\n")
    path.chmod(0o600)
    return str(path)


def parse(*argv):
    options = SignalingOptions()
    options.parseOptions(list(argv))
    return options


def test_turn_options(secret_file):
    """--stun, --turn (repeatable), --turn-secret-file and --turn-ttl configure what clients get."""
    o = parse("--stun=stun:s.example:3478", "--turn=turn:t.example:3478", "--turn=turns:t.example:5349",
              f"--turn-secret-file={secret_file}", "--turn-ttl=3600")
    assert (o["stun"], o["turn"], o.turn_secrets, o["turn-ttl"]) == (
        ["stun:s.example:3478"], ["turn:t.example:3478", "turns:t.example:5349"], [SECRET], 3600)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--stun=turn:t.example"], "--stun: not a stun: or stuns: URI"),
        (["--turn=stun:s.example", "--turn-secret-file=X"], "--turn: not a turn: or turns: URI"),
        (["--turn=turn:t.example"], "--turn needs --turn-secret-file"),
        (["--turn-secret-file=X"], "--turn-secret-file is for --turn URIs"),
        (["--turn=turn:t.example", "--turn-secret-file=/nonexistent"], "--turn-secret-file: "),
        (["--turn-ttl=30"], "--turn-ttl must be 60 to 604800 seconds"),
        (["--turn-ttl=soon"], "--turn-ttl must be a whole number"),
    ],
)
def test_bad_turn_options(argv, needle, secret_file):
    """Bad ICE options fail at start with one line naming the option."""
    argv = [a.replace("=X", "=" + secret_file) for a in argv]
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert needle in str(e.value)


def test_world_readable_secret_is_refused_at_start(tmp_path):
    """A TURN secret anyone on the machine can read is refused at start, naming the file."""
    path = tmp_path / "s"
    path.write_bytes(SECRET)
    path.chmod(0o644)
    with pytest.raises(usage.UsageError, match="--turn-secret-file: .* can be read or written by anyone"):
        parse("--turn=turn:t.example", f"--turn-secret-file={path}")


@pytest.mark.memory
def test_welcome_carries_ice_servers():
    """Every welcome carries the ICE servers, TURN credentials made for that peer's id."""
    h = Harness()
    clock = h.clock
    h.factory.ice_servers = IceServers(clock, ["stun:s.example"], ["turn:t.example"], [SECRET], ttl=600)
    a = h.connect(handshake=False)
    [welcome] = a.take()
    stun, turn = welcome["iceServers"]
    assert stun == {"urls": ["stun:s.example"]}
    assert turn["username"] == f"{int(clock.seconds()) + 600}:{welcome['id']}"
    assert turn["credential"] == recompute(turn["username"])


def ice_web(**settings):
    clock = Clock()
    clock.advance(1_700_000_000)
    ice = IceServers(clock, ["stun:s.example"], ["turn:t.example"], [SECRET], ttl=600)
    web = SignalingWeb(Registry(clock), ice_servers=ice, admission=Settings(**settings), clock=clock)
    return StubTreq(web.resource()), clock


def get(treq, path, **kwargs):
    from test_web import get as get_

    response, body = get_(treq, "http://localhost" + path, **kwargs)
    return response, json.loads(body)


@pytest.mark.memory
def test_ice_servers_endpoint():
    """/api/ice-servers returns the same list a welcome carries, for a fresh id, with its TTL; never cached."""
    treq, clock = ice_web()
    response, doc = get(treq, "/api/ice-servers")
    assert response.code == 200
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]
    assert doc["ttl"] == 600
    stun, turn = doc["iceServers"]
    expiry, _, user = turn["username"].partition(":")
    assert int(expiry) == 1_700_000_600 and len(user) == 36  # a fresh uuid4
    assert turn["credential"] == recompute(turn["username"])
    _, again = get(treq, "/api/ice-servers")
    assert again["iceServers"][1]["username"] != turn["username"]


@pytest.mark.memory
def test_ice_servers_follow_the_websocket_rules():
    """Origins and tokens are checked as for the WebSocket (403, 401); a token's fixed id is the TURN user."""
    secret = b"token-secret-0123456789"
    treq, clock = ice_web(allowed_origins=("https://app.example",), token_secret=secret)
    now = clock.seconds()
    response, doc = get(treq, "/api/ice-servers", headers={"Origin": "https://evil.example"})
    assert (response.code, doc) == (403, {"error": "origin not allowed"})
    response, doc = get(treq, "/api/ice-servers", headers={"Origin": "https://app.example"})
    assert (response.code, doc) == (401, {"error": "access token required"})
    response, doc = get(treq, "/api/ice-servers?token=" + make_token(secret, -5, now=now))
    assert (response.code, doc["error"]) == (401, "token expired")
    token = make_token(secret, 60, peer_id="alice", now=now)
    response, doc = get(treq, "/api/ice-servers", headers={"Origin": "https://app.example",
                                                           "Authorization": "Bearer " + token})
    assert response.code == 200
    assert doc["iceServers"][1]["username"] == "1700000600:alice"
    assert response.headers.getRawHeaders("access-control-allow-origin") == ["https://app.example"]


@pytest.mark.memory
def test_ice_servers_rate_limited_per_address():
    """Past a burst, one address gets 429 until its bucket refills; other addresses are not affected."""
    treq, clock = ice_web(trusted_proxies=(__import__("ipaddress").ip_network("127.0.0.1/32"),))
    for _ in range(ICE_SERVERS_BURST):
        assert get(treq, "/api/ice-servers", headers={"X-Forwarded-For": "203.0.113.7"})[0].code == 200
    response, doc = get(treq, "/api/ice-servers", headers={"X-Forwarded-For": "203.0.113.7"})
    assert response.code == 429 and "too many requests" in doc["error"]
    assert get(treq, "/api/ice-servers", headers={"X-Forwarded-For": "203.0.113.8"})[0].code == 200
    clock.advance(2)
    assert get(treq, "/api/ice-servers", headers={"X-Forwarded-For": "203.0.113.7"})[0].code == 200
