"""Tier 2: the Klein routes through treq's StubTreq (no sockets)."""

import json
import re

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from signaling.registry import Registry
from signaling.web import SignalingWeb, iso_utc

pytestmark = pytest.mark.memory


class Marker(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"websocket resource"


@pytest.fixture
def setup():
    clock = Clock()
    clock.advance(1_757_422_800.5)  # 2025-09-09T13:00:00.500Z
    registry = Registry(clock)
    web = SignalingWeb(registry, Marker())
    return registry, clock, StubTreq(web.resource())


def get(treq, url, **kwargs):
    results = []

    async def go():
        response = await treq.get(url, **kwargs)
        body = await response.content()
        results.append((response, body))

    ensureDeferred(go())
    treq.flush()
    assert results, "request did not complete"
    return results[0]


def test_iso_utc_format():
    """Times are formatted as UTC with milliseconds and a Z."""
    assert iso_utc(1_757_422_800) == "2025-09-09T13:00:00.000Z"
    assert iso_utc(1_757_422_800.0789) == "2025-09-09T13:00:00.078Z"


def test_stats_empty(setup):
    """With nobody connected, stats say so, as JSON."""
    _, _, treq = setup
    response, body = get(treq, "http://localhost/api/stats")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(body) == {"connectedUsers": 0, "users": []}


def test_stats_shape(setup):
    """
    Each user appears with exactly id, state, targetUser, connectedAt and ip
    (the v1 shape), online (false during a grace period) and its wire
    protocol, oldest first.
    """
    registry, clock, treq = setup
    registry.add("u1", "127.0.0.1")
    clock.advance(1.25)
    registry.add("u2", "::1")
    clock.advance(1)
    registry.add("u3", "127.0.0.2")
    registry.ping("u3", "u2")
    registry.ping("u1", "u2")
    registry.pong("u2", "u1")
    registry.get("u3").online = False  # (as LocalSessions marks a peer in grace)
    response, body = get(treq, "http://localhost/api/stats")
    doc = json.loads(body)
    assert doc == {
        "connectedUsers": 3,
        "users": [
            {"id": "u1", "state": "connected", "targetUser": "u2",
             "connectedAt": "2025-09-09T13:00:00.500Z", "ip": "127.0.0.1", "online": True, "protocol": "native"},
            {"id": "u2", "state": "connected", "targetUser": "u1",
             "connectedAt": "2025-09-09T13:00:01.750Z", "ip": "::1", "online": True, "protocol": "native"},
            {"id": "u3", "state": "connecting", "targetUser": "u2",
             "connectedAt": "2025-09-09T13:00:02.750Z", "ip": "127.0.0.2", "online": False, "protocol": "native"},
        ],
    }
    for user in doc["users"]:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", user["connectedAt"])


def test_test_page(setup):
    """/test.html is the interactive page, as UTF-8 HTML, with a button per message type."""
    _, _, treq = setup
    response, body = get(treq, "http://localhost/test.html")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    page = body.decode("utf-8")
    assert "<title>" in page and "WebSocket" in page
    for kind in ["ping", "pong", "offer", "answer", "ice-candidate", "disconnect"]:
        assert f'"{kind}"' in page
    assert 'id="log"' in page and 'id="myId"' in page and 'id="peer"' in page


def test_client_module(setup):
    """/signaling.js is the browser client module, served as JavaScript."""
    _, _, treq = setup
    response, body = get(treq, "http://localhost/signaling.js")
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/javascript; charset=utf-8"]
    assert b"export class SignalingClient" in body and b"async call(peerId)" in body


def test_test_page_uses_the_client_module(setup):
    """The test page imports the client module and has the call and chat controls."""
    _, _, treq = setup
    _, body = get(treq, "http://localhost/test.html")
    page = body.decode("utf-8")
    assert 'from "./signaling.js"' in page
    for control in ("call", "hangup", "chatInput", "chatSend", "pcState", "iceState", "copyId"):
        assert f'id="{control}"' in page


def test_favicon_is_empty(setup):
    """/favicon.ico answers 204, so browsers log no error."""
    _, _, treq = setup
    response, body = get(treq, "http://localhost/favicon.ico")
    assert (response.code, body) == (204, b"")


def test_root_redirects_to_test_page(setup):
    """GET / redirects to /test.html."""
    _, _, treq = setup
    response, _ = get(treq, "http://localhost/", allow_redirects=False)
    assert response.code == 302
    assert response.headers.getRawHeaders("location") == ["/test.html"]


def test_ws_route_serves_the_websocket_resource(setup):
    """/ws is handed to the WebSocket resource."""
    _, _, treq = setup
    response, body = get(treq, "http://localhost/ws")
    assert body == b"websocket resource"


def test_only_ws_itself_goes_to_the_websocket_resource(setup):
    """/ws is taken before the app's routes; /ws/... and /wsx are not /ws."""
    _, _, treq = setup
    for path in ("/ws/", "/ws/x", "/wsx"):
        response, body = get(treq, "http://localhost" + path)
        assert response.code == 404 and body != b"websocket resource", path


def test_ws_route_without_resource_is_404():
    """Without a WebSocket resource, /ws answers 404."""
    treq = StubTreq(SignalingWeb(Registry(Clock())).resource())
    response, _ = get(treq, "http://localhost/ws")
    assert response.code == 404


def test_unknown_path_is_404(setup):
    """Unknown paths are 404."""
    _, _, treq = setup
    response, _ = get(treq, "http://localhost/nope")
    assert response.code == 404


def test_stats_token_required():
    """With a stats token, /api/stats answers 401 without it or with a wrong one, 200 with it."""
    registry = Registry(Clock())
    registry.add("u1", "127.0.0.1")
    treq = StubTreq(SignalingWeb(registry, stats_token="s3cret-token").resource())
    response, body = get(treq, "http://localhost/api/stats")
    assert response.code == 401
    assert response.headers.getRawHeaders("www-authenticate") == ['Bearer realm="signaling stats"']
    assert json.loads(body) == {"error": "a valid bearer token is required"}
    response, _ = get(treq, "http://localhost/api/stats", headers={"Authorization": "Bearer wrong"})
    assert response.code == 401
    response, body = get(
        treq, "http://localhost/api/stats", headers={"Authorization": "Bearer s3cret-token"}
    )
    assert response.code == 200 and json.loads(body)["connectedUsers"] == 1


def test_stats_hide_ip():
    """With hide_ip the ip of every user is null; the rest of the shape is unchanged."""
    registry = Registry(Clock())
    registry.add("u1", "127.0.0.1")
    treq = StubTreq(SignalingWeb(registry, hide_ip=True).resource())
    _, body = get(treq, "http://localhost/api/stats")
    [user] = json.loads(body)["users"]
    assert user["ip"] is None and user["id"] == "u1" and set(user) == {
        "id", "state", "targetUser", "connectedAt", "ip", "online", "protocol"
    }


def test_health_in_memory_mode(setup):
    """With the in-memory registry the server is always ready: 200, status ok."""
    _, _, treq = setup
    response, body = get(treq, "http://x/api/health")
    assert response.code == 200
    assert json.loads(body) == {"status": "ok", "registry": "memory"}


@pytest.mark.parametrize(
    "state, code, status",
    [("starting", 503, "starting"), ("connected", 200, "ok"), ("disconnected", 503, "degraded")],
)
def test_health_of_a_cluster_node(state, code, status):
    """A cluster node reports starting (not yet registered), ok, or degraded (shared state lost), 503 unless ok."""
    from zope.interface import implementer

    from signaling.registry import IClusterRegistry

    @implementer(IClusterRegistry)
    class Node:
        def health(self):
            return {"registry": "redis", "redis": state, "node": "n1", "since": 12.5}

    response, body = get(StubTreq(SignalingWeb(Node()).resource()), "http://x/api/health")
    assert response.code == code
    assert json.loads(body) == {"status": status, "registry": "redis", "redis": state, "node": "n1", "since": 12.5}


@pytest.mark.parametrize(
    "path", ["/api/stats", "/api/health", "/test.html", "/signaling.js", "/nope", "/", "/favicon.ico"]
)
def test_security_headers_on_every_response(setup, path):
    """Every response says nosniff, no framing, no referrer, a CSP, and a Server header without versions."""
    _, _, treq = setup
    response, _ = get(treq, "http://localhost" + path, allow_redirects=False)
    headers = response.headers
    assert headers.getRawHeaders("server") == ["signaling"]
    assert headers.getRawHeaders("x-content-type-options") == ["nosniff"]
    assert headers.getRawHeaders("x-frame-options") == ["DENY"]
    assert headers.getRawHeaders("referrer-policy") == ["no-referrer"]
    [policy] = headers.getRawHeaders("content-security-policy")
    assert "frame-ancestors 'none'" in policy
    if path != "/test.html":
        assert policy.startswith("default-src 'none'")


def test_test_page_policy_allows_exactly_its_own_scripts(setup):
    """The test page's CSP names its inline script and style by hash; nothing else inline runs."""
    import base64
    import hashlib

    _, _, treq = setup
    response, body = get(treq, "http://localhost/test.html")
    [policy] = response.headers.getRawHeaders("content-security-policy")
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    script = re.search(rb"<script type=\"module\">(.*?)</script>", body, re.S).group(1)
    style = re.search(rb"<style>(.*?)</style>", body, re.S).group(1)

    def digest(text):
        return "'sha256-" + base64.b64encode(hashlib.sha256(text).digest()).decode() + "'"

    assert directives["script-src"] == "'self' " + digest(script)
    assert directives["style-src"] == digest(style)
    assert directives["connect-src"] == "'self' ws: wss:"
    assert "'unsafe-inline'" not in policy and "'unsafe-eval'" not in policy


def test_stats_cors_only_for_listed_origins():
    """/api/stats sends no CORS headers by default; with stats_origins, only to a listed Origin (echoed, Vary)."""
    registry = Registry(Clock())
    closed = StubTreq(SignalingWeb(registry).resource())
    response, _ = get(closed, "http://localhost/api/stats", headers={"Origin": "https://evil.example"})
    assert response.code == 200 and not response.headers.hasHeader("access-control-allow-origin")
    listed = StubTreq(SignalingWeb(registry, stats_origins=("https://dash.example", "https://*.ops.example")).resource())
    for origin in ("https://dash.example", "https://a.ops.example"):
        response, _ = get(listed, "http://localhost/api/stats", headers={"Origin": origin})
        assert response.headers.getRawHeaders("access-control-allow-origin") == [origin]
        assert response.headers.getRawHeaders("vary") == ["Origin, Accept-Encoding"]
    response, _ = get(listed, "http://localhost/api/stats", headers={"Origin": "https://evil.example"})
    assert not response.headers.hasHeader("access-control-allow-origin")


def test_stats_preflight():
    """A listed page may send the stats token: the preflight allows GET with Authorization; others get nothing."""
    treq = StubTreq(SignalingWeb(Registry(Clock()), stats_origins=("https://dash.example",)).resource())
    results = []

    async def go(origin):
        response = await treq.request("OPTIONS", "http://localhost/api/stats", headers={"Origin": origin})
        results.append(response)

    for origin in ("https://dash.example", "https://evil.example"):
        ensureDeferred(go(origin))
        treq.flush()
    allowed, refused = results
    assert allowed.code == 204
    assert allowed.headers.getRawHeaders("access-control-allow-headers") == ["Authorization, If-None-Match"]
    assert allowed.headers.getRawHeaders("access-control-allow-origin") == ["https://dash.example"]
    assert refused.code == 204 and not refused.headers.hasHeader("access-control-allow-origin")


def test_doubled_slashes_are_not_redirected_by_host(setup):
    """Doubled slashes are not answered with a redirect built from the Host header (or X-Forwarded-Host)."""
    _, _, treq = setup
    for path in ("/api//stats", "//api/stats", "/api/stats//", "//"):
        response, _ = get(treq, "http://localhost" + path, allow_redirects=False,
                          headers={"Host": "evil.example", "X-Forwarded-Host": "evil.example"})
        assert response.code in (200, 302, 404), (path, response.code)
        assert response.headers.getRawHeaders("location", ["/test.html"]) == ["/test.html"]  # relative, if any
