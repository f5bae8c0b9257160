"""
Tier 4: the real PeerJS client (npm ``peerjs`` 1.5, unchanged: its
dist/peerjs.min.js, on a page the test serves from another origin) in
Chromium pages, against the installed server: data both ways (JSON and
binary serialization), a video call with fake devices, ID-TAKEN and
INVALID-KEY, messages held for an id that connects late and EXPIRE for one
that never does, peer.reconnect() after the socket is cut, access tokens
as the PeerJS key; and the same across two nodes of a Redis cluster.
"""

import os
import time

import pytest
from live import ServerProcess
from peerjs_page import CuttableForwarder, PageServer, need

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--disable-dev-shm-usage",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
]
WAIT_MS = 30000


@pytest.fixture(scope="module")
def pages():
    """The page server (peerjs fetched with npm if needed) and one Chromium for the whole module."""
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        need(CHROMIUM, "apt-get install chromium")
    site = PageServer()
    pw = sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    try:
        yield Pages(site, browser)
    finally:
        browser.close()
        pw.stop()
        site.stop()


class Pages:
    def __init__(self, site, browser):
        self.site = site
        self.browser = browser

    def open(self, port, peer_id=None, key="peerjs", wait_open=True):
        """
        A new page in its own browser context (its own origin storage, as
        another user's) whose PeerJS client uses the server at ``port``
        (``new Peer(id?, {host, port, path: "/", key})``).
        """
        context = self.browser.new_context()
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.goto(self.site.url)
        options = {"host": "127.0.0.1", "port": port, "path": "/", "key": key, "config": {"iceServers": []}}
        page.evaluate("([id, options]) => start(id, options)", [peer_id, options])
        if wait_open:
            page.wait_for_function("() => events.some((e) => e[0] === 'open')", timeout=WAIT_MS)
            page.peer_id = page.evaluate("() => peer.id")
        return page


def wait(page, expression, arg=None):
    page.wait_for_function(expression, arg=arg, timeout=WAIT_MS)


def wait_event(page, *event):
    wait(page, "(e) => has(...e)", list(event))


def errors_of(page):
    return [tuple(e[1:]) for e in page.evaluate("() => events") if e[0] == "error"]


def data_of(page, serialization):
    return [d[2] for d in page.evaluate("() => data") if d[1] == serialization]


def exchange(a, b, serialization):
    """A connects to B with ``serialization``; data goes both ways (an object, and bytes for binary)."""
    a.evaluate("([o, s]) => connect(o, s)", [b.peer_id, serialization])
    wait_event(a, "conn-open", b.peer_id, serialization)
    wait_event(b, "conn-open", a.peer_id, serialization)
    hello = {"hello": "from A ✓", "n": [1, 2.5, None], "nested": {"ok": True}}
    a.evaluate("([o, s, v]) => sendTo(o, s, v)", [b.peer_id, serialization, hello])
    b.evaluate("([o, s, v]) => sendTo(o, s, v)", [a.peer_id, serialization, {"hi": "from B"}])
    wait(b, "(s) => data.some((d) => d[1] === s)", serialization)
    wait(a, "(s) => data.some((d) => d[1] === s)", serialization)
    assert data_of(b, serialization) == [hello]
    assert data_of(a, serialization) == [{"hi": "from B"}]
    if serialization == "binary":
        blob = list(range(256)) * 4
        a.evaluate("([o, s, v]) => sendTo(o, s, v, true)", [b.peer_id, serialization, blob])
        wait(b, "(s) => data.filter((d) => d[1] === s).length === 2", serialization)
        assert data_of(b, serialization)[1] == {"bytes": blob}


def call(a, b):
    """A calls B with its (fake) camera; both decode the other's video frames."""
    a.evaluate("(o) => callPeer(o)", b.peer_id)
    wait_event(b, "call", a.peer_id)
    for page, other in ((a, b), (b, a)):
        wait_event(page, "stream", other.peer_id)
        wait(page, "() => framesDecoded > 10")


def close(*pages):
    for page in pages:
        page.context.close()


def test_data_both_ways_and_a_video_call(pages, server):
    """Two pages: peer.connect() with JSON and with binary serialization, data both ways; peer.call() with video."""
    a = pages.open(server.ports["http"])
    b = pages.open(server.ports["http"], "bob-" + str(os.getpid()))
    assert len(a.peer_id) == 36  # (from GET /peerjs/id: the server's own uuid4)
    exchange(a, b, "json")
    exchange(b, a, "binary")
    call(a, b)
    users = server.users()
    assert {f"peerjs/{a.peer_id}", f"peerjs/{b.peer_id}"} <= set(users)
    server.wait_for_line(rf"relay OFFER peerjs/{a.peer_id} -> peerjs/{b.peer_id}")
    server.wait_for_line(rf"relay CANDIDATE peerjs/{b.peer_id} -> peerjs/{a.peer_id}")
    assert a.errors == b.errors == [] and errors_of(a) == errors_of(b) == []
    close(a, b)


def test_id_taken_and_invalid_key(pages, server):
    """A second client with a taken id gets unavailable-id; a wrong key gets invalid-key; the holder is untouched."""
    a = pages.open(server.ports["http"], "taken-" + str(os.getpid()))
    b = pages.open(server.ports["http"], a.peer_id, wait_open=False)
    wait_event(b, "error", "unavailable-id")
    c = pages.open(server.ports["http"], key="not-the-key", wait_open=False)
    wait_event(c, "error", "invalid-key")
    assert not a.evaluate("() => peer.disconnected") and errors_of(a) == []
    d = pages.open(server.ports["http"])
    exchange(d, a, "json")  # the holder still works
    close(a, b, c, d)


def test_an_id_that_connects_late_gets_what_waited_and_one_that_never_does_gets_expire(pages, server):
    """Messages for an id not connected wait (5 s): 2 s late it connects and gets them; never, the sender is told."""
    a = pages.open(server.ports["http"])
    late, never = f"late-{os.getpid()}-{time.monotonic_ns()}", f"never-{os.getpid()}-{time.monotonic_ns()}"
    since = len(server.lines)
    a.evaluate("(o) => connect(o, 'json')", late)
    server.wait_for_line(rf"OFFER from peerjs/{a.peer_id} held for peerjs/{late}", since=since)
    started = time.monotonic()
    b = pages.open(server.ports["http"], wait_open=False)
    b.evaluate("([id, port]) => setTimeout(() => start(id, {host: '127.0.0.1', port, path: '/', key: 'peerjs', "
               "config: {iceServers: []}}), 2000)", [late, server.ports["http"]])
    wait_event(b, "open", late)
    assert time.monotonic() - started >= 2.0
    wait_event(a, "conn-open", late, "json")
    wait_event(b, "conn-open", a.peer_id, "json")
    a.evaluate("([o]) => sendTo(o, 'json', 'after the wait')", [late])
    wait(b, "() => data.length === 1")

    a.evaluate("(o) => connect(o, 'json')", never)
    wait_event(a, "error", "peer-unavailable", f"Could not connect to peer {never}")
    server.wait_for_line(rf"peerjs/{never} did not connect within 5.0s: EXPIRE to peerjs/{a.peer_id}", since=since)
    assert errors_of(a) == [("peer-unavailable", f"Could not connect to peer {never}")]
    assert not a.evaluate("() => peer.disconnected")  # (not fatal: the peer goes on)
    close(a, b)


def test_reconnect_after_the_socket_is_cut(pages, server):
    """
    The page's socket is cut (reset, no close frame): PeerJS reports it and
    peer.reconnect() gets the same id back (the session from its grace
    period), with an offer sent to it meanwhile; data flows after.
    """
    forwarder = CuttableForwarder(server.ports["http"])
    try:
        a = pages.open(forwarder.port, f"cut-{os.getpid()}")
        b = pages.open(server.ports["http"])
        exchange(a, b, "json")
        since = len(server.lines)
        forwarder.cut()
        wait_event(a, "error", "network")
        wait_event(a, "disconnected", a.peer_id)
        server.wait_for_line(rf"peer peerjs/{a.peer_id} \(127.0.0.1\) lost its connection", since=since)
        b.evaluate("(o) => connect(o, 'binary')", a.peer_id)  # while A is away: kept for it
        server.wait_for_line(rf"relay OFFER peerjs/{b.peer_id} -> peerjs/{a.peer_id}", since=since)
        a.evaluate("() => peer.reconnect()")
        wait(a, "() => events.filter((e) => e[0] === 'open').length === 2")
        assert a.evaluate("() => peer.id") == a.peer_id and a.evaluate("() => peer.open")
        server.wait_for_line(rf"peer peerjs/{a.peer_id} resumed from 127.0.0.1", since=since)
        wait_event(a, "conn-open", b.peer_id, "binary")
        wait_event(b, "conn-open", a.peer_id, "binary")
        b.evaluate("([o]) => sendTo(o, 'binary', {after: 'the cut'})", [a.peer_id])
        wait(a, "() => data.some((d) => d[1] === 'binary')")
        assert data_of(a, "binary") == [{"after": "the cut"}]
        assert [e[0] for e in errors_of(a)] == ["network"] and errors_of(b) == []
        close(a, b)
    finally:
        forwarder.stop()


def test_access_token_as_the_peerjs_key(pages, tmp_path):
    """With --token-secret-file the access token is the key: GET /<token>/id and the WebSocket accept it."""
    from signaling.tokens import make_token

    secret = tmp_path / "secret"
    secret.write_bytes(b"a secret of at least 16 bytes")
    server = ServerProcess(f"--token-secret-file={secret}").start()
    try:
        token = make_token(secret.read_bytes(), 600)
        a = pages.open(server.ports["http"], key=token)
        b = pages.open(server.ports["http"], key=make_token(secret.read_bytes(), 600, peer_id="bob"))
        assert b.peer_id == "bob"  # (the id its token fixes, from GET /<token>/id)
        exchange(a, b, "json")
        c = pages.open(server.ports["http"], key="peerjs", wait_open=False)
        wait_event(c, "error", "server-error")  # (GET /peerjs/id: 401, "Could not get an ID from the server")
        close(a, b, c)
    finally:
        server.stop()


@pytest.mark.cluster
def test_two_pages_on_two_nodes(pages):
    """
    Page A on node 1, page B on node 2 of a Redis cluster: data and a call
    across nodes; messages for an id that connects late to the other node
    wait for it there; reconnect() after a cut on node 1.
    """
    from redis_server import RedisServer

    redis = RedisServer().start()
    nodes = []
    forwarder = None
    try:
        for name in ("n1", "n2"):
            nodes.append(ServerProcess(f"--redis={redis.url}", f"--node-id={name}", "--node-timeout=2").start())
        for node in nodes:
            node.wait_for_line(r"redis: connected")
        n1, n2 = nodes
        forwarder = CuttableForwarder(n1.ports["http"])
        a = pages.open(forwarder.port, f"a-{os.getpid()}")
        b = pages.open(n2.ports["http"])
        users = n1.users()
        assert (users[f"peerjs/{a.peer_id}"]["node"], users[f"peerjs/{b.peer_id}"]["node"]) == ("n1", "n2")
        exchange(a, b, "json")
        call(b, a)

        late = f"late-{os.getpid()}-{time.monotonic_ns()}"
        since = len(n1.lines)
        a.evaluate("(o) => connect(o, 'binary')", late)
        n1.wait_for_line(rf"OFFER from peerjs/{a.peer_id} held for peerjs/{late}", since=since)
        c = pages.open(n2.ports["http"], wait_open=False)
        c.evaluate("([id, port]) => setTimeout(() => start(id, {host: '127.0.0.1', port, path: '/', key: 'peerjs', "
                   "config: {iceServers: []}}), 2000)", [late, n2.ports["http"]])
        wait_event(c, "open", late)
        wait_event(a, "conn-open", late, "binary")
        wait_event(c, "conn-open", a.peer_id, "binary")

        forwarder.cut()
        wait_event(a, "disconnected", a.peer_id)
        n1.wait_for_line(rf"peer peerjs/{a.peer_id} \(127.0.0.1\) lost its connection", since=since)
        a.evaluate("() => peer.reconnect()")
        wait(a, "() => events.filter((e) => e[0] === 'open').length === 2")
        n1.wait_for_line(rf"peer peerjs/{a.peer_id} resumed from 127.0.0.1", since=since)
        exchange(b, a, "binary")  # signaling across the nodes after the reconnect
        assert [e[0] for e in errors_of(a)] == ["network"] and errors_of(b) == errors_of(c) == []
        close(a, b, c)
    finally:
        if forwarder is not None:
            forwarder.stop()
        for node in nodes:
            node.stop()
        redis.cleanup()
