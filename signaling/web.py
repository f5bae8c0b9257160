"""
The HTTP side, a Klein app on the same reactor as the WebSocket server:

- ``GET /api/stats``: who is connected, in the shape of the wire contract
  (built off the relay path by :mod:`signaling.stats`; ETags, gzip, pages
  and a summary form);
- ``GET /test.html``: the interactive test page (package data);
- ``GET /signaling.js``: the browser client module the page is built on;
- ``GET /``: redirects to the test page;
- ``/ws``: the WebSocket endpoint, for deployments that expose one port;
- ``GET /<key>/id``: a fresh id for a PeerJS client (``signaling.peerjs_protocol``).
"""

import base64

# werkzeug encodes the Host of every request with the "idna" codec, whose
# module Python imports lazily: import it now, while the installation can be
# read, since twistd may drop privileges (--uid) before the first request.
import encodings.idna  # noqa: F401
import hashlib
import hmac
import json
import re
from collections import deque
from importlib import resources
from typing import Callable, Dict, List, Optional
from urllib.parse import parse_qs
from uuid import uuid4

from autobahn.twisted.resource import WebSocketResource
from klein import Klein
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from signaling._compat import untie_request
from signaling.admission import Refused, authorize, client_address, host_of, origin_allowed, request_token
from signaling.httpguard import GuardedChannel
from signaling.limits import AddressBuckets, Pacer, address_key
from signaling.metrics import CONTENT_TYPE_LATEST
from signaling.registry import IClusterRegistry
from signaling.settings import Settings
from signaling.stats import GZIP_MIN, Body, StatsCache, iso_utc, parse_query, user_entry
from signaling.turn import NO_ICE_SERVERS

__all__ = ["SignalingWeb", "Root", "WebSocketTakeover", "iso_utc", "stats_document"]

#: /api/health's status for each state of a cluster registry
_HEALTH_STATUS = {"connected": "ok", "starting": "starting", "disconnected": "degraded"}


#: requests for ICE servers per second from one address, on average, and at once
ICE_SERVERS_RATE, ICE_SERVERS_BURST = 1.0, 10

#: answers of /api/stats, /metrics and /api/dashboard per second to one address, on
#: average, and at once (--stats-rate, --stats-burst); the requests past them wait
STATS_RATE, STATS_BURST = 10.0, 20


def _json(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")


def stats_document(peers, hide_ip: bool = False) -> dict:
    """
    The ``/api/stats`` document for a list of :class:`~signaling.registry.Peer`,
    built at once (what :class:`~signaling.stats.StatsCache` builds in slices).
    """
    users = [user_entry(p, hide_ip) for p in sorted(peers, key=lambda p: p.connected_at)]
    return {"connectedUsers": len(users), "users": users}


def accepts_gzip(header: bytes) -> bool:
    """Whether an ``Accept-Encoding`` header takes gzip (``gzip``/``x-gzip``, or ``*``, with q > 0)."""
    quality: Dict[bytes, float] = {}
    for item in header.split(b","):
        coding, _, params = item.partition(b";")
        q = 1.0
        for param in params.split(b";"):
            name, _, value = param.partition(b"=")
            if name.strip().lower() == b"q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
        quality[coding.strip().lower()] = q
    for coding in (b"gzip", b"x-gzip", b"*"):
        if coding in quality:
            return quality[coding] > 0
    return False


def not_modified(header: bytes, etag: bytes) -> bool:
    """
    Whether ``If-None-Match`` names ``etag`` (weakly compared, as RFC 9110
    says for it; the gzip form's tag counts as the same content).
    """
    if header.strip() == b"*":
        return True
    tags = {t.strip() for t in header.split(b",")}
    tags |= {t[2:] for t in tags if t.startswith(b"W/")}
    return etag in tags or etag[:-1] + b'-gz"' in tags


#: bytes of response bodies (all of them together) handed to connections per reactor turn
WRITE_PER_TURN = 64 * 1024


class WriteBudget:
    """
    At most ``per_turn`` bytes of response bodies handed to connections in
    one reactor turn, in all: the copies into the kernel's socket buffers
    (about 2 ms for a 1.6 MB stats document) are spread over turns, between
    which the relays are handled.  Bodies that find the budget spent wait
    for the next turn, first come first served.
    """

    def __init__(self, clock, per_turn: int = WRITE_PER_TURN, first: Callable[[], None] = lambda: None):
        self.clock = clock
        self.per_turn = per_turn
        self.first = first  # (the relays' write batch: see Slicer's)
        self.left = per_turn
        self.waiting: List["_Chunks"] = []
        self._call = None

    def take(self, size: int) -> bool:
        """Spend ``size`` bytes of this turn's budget; False (spending nothing) if it is spent."""
        if self.left <= 0:
            return False
        self.left -= size
        self._next_turn()
        return True

    def wait(self, producer: "_Chunks") -> None:
        """Resume ``producer`` in the next turn."""
        self.waiting.append(producer)
        self._next_turn()

    def _next_turn(self) -> None:
        if self._call is None:
            self._call = self.clock.callLater(0, self._turn)

    def _turn(self) -> None:
        self._call = None
        self.first()
        self.left = self.per_turn
        ready, self.waiting = deque(self.waiting), []
        while ready:  # a chunk each in turn, until the budget is spent (then they wait again, in order)
            producer = ready.popleft()
            if producer.budget_left():
                ready.append(producer)


@implementer(IPushProducer)
class _Chunks:
    """
    Writes a body's chunks as the connection takes them (a push producer
    the transport pauses when its buffer is full) and as the turn's
    :class:`WriteBudget` allows, then finishes the request.
    """

    def __init__(self, request, chunks, budget: WriteBudget):
        self.request = request
        self.chunks = iter(chunks)
        self.budget = budget
        self.pending: Optional[bytes] = None  # the chunk the budget held back
        self.paused = False
        self.waiting = False  # for the next turn's budget

    def start(self) -> None:
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.request.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        while not self.paused and not self.waiting and self.request is not None:
            if not self._one():
                return

    def _one(self) -> bool:
        """Write the next chunk if the turn's budget allows; return whether to go on."""
        chunk = self.pending if self.pending is not None else next(self.chunks, None)
        self.pending = None
        if chunk is None:
            request, self.request = self.request, None
            request.unregisterProducer()
            request.finish()
            return False
        if not self.budget.take(len(chunk)):
            self.pending, self.waiting = chunk, True
            self.budget.wait(self)
            return False
        self.request.write(chunk)  # (which may pause this producer)
        return True

    def budget_left(self) -> bool:
        """A new turn's budget: write one chunk; return whether there is more to write now."""
        self.waiting = False
        if self.paused or self.request is None:
            return False
        return self._one() and not self.paused and self.request is not None

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._write()

    def stopProducing(self) -> None:
        self.request = None  # the connection is gone


class BodyResource(Resource):
    """
    A :class:`~signaling.stats.Body` as a response: its length, type,
    encoding and ETag, and its chunks written as the client reads them
    (never the whole body into the connection's buffer at once).
    """

    isLeaf = True

    def __init__(self, body: Body, budget: WriteBudget):
        super().__init__()
        self.body = body
        self.budget = budget

    def render(self, request):
        body = self.body
        request.setHeader(b"Content-Type", body.content_type)
        request.setHeader(b"Content-Length", b"%d" % body.length)
        request.setHeader(b"ETag", body.etag)
        if body.encoding is not None:
            request.setHeader(b"Content-Encoding", body.encoding)
        if request.method == b"HEAD":
            return b""
        _Chunks(request, body.chunks, self.budget).start()
        return NOT_DONE_YET


def static_file(name: str) -> bytes:
    return resources.files("signaling").joinpath("static", name).read_bytes()


class WebSocketTakeover(WebSocketResource):
    """
    Autobahn's resource for a WebSocket on the HTTP port (``/ws``), with the
    HTTP request untied once the WebSocket has taken its connection over.
    The request is never finished, so it and its channel would keep
    referring to each other (and to the connection) in a reference cycle,
    left for the cycle collector; untied, they are freed when the upgrade
    is done.
    """

    def __init__(self, factory):
        super().__init__(factory)
        #: the other wire formats' paths (SignalingFactory.serve), served here too
        self.wire_formats = getattr(factory, "wire_formats", {})

    def render(self, request):
        channel = request.channel
        result = super().render(request)
        if result == NOT_DONE_YET:
            if isinstance(channel, GuardedChannel):  # counted as HTTP: the connection is a WebSocket's now
                channel.site.release(channel)
            untie_request(request)
        return result


#: headers on every HTTP response (a page sets its own Content-Security-Policy)
SECURITY_HEADERS = (
    (b"Server", b"signaling"),  # no versions to fingerprint
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Content-Security-Policy", b"default-src 'none'; frame-ancestors 'none'"),
)


def page_policy(html: bytes) -> bytes:
    """
    The Content-Security-Policy for an HTML page of ours: its own inline
    scripts and styles (by hash) and same-origin scripts; WebSockets to any
    server (the user may type another address); no frames around it.
    """
    hashes: Dict[str, List[bytes]] = {"script": [], "style": []}
    for kind, body in re.findall(rb"<(script|style)\b[^>]*>(.*?)</\1>", html, re.S):
        if body.strip():
            digest = base64.b64encode(hashlib.sha256(body).digest())
            hashes[kind.decode()].append(b"'sha256-" + digest + b"'")
    return b"; ".join([
        b"default-src 'none'",
        b" ".join([b"script-src 'self'", *hashes["script"]]),
        b" ".join([b"style-src", *hashes["style"]]) if hashes["style"] else b"style-src 'none'",
        b"img-src 'self' data:",
        b"connect-src 'self' ws: wss:",
        b"base-uri 'none'",
        b"form-action 'none'",
        b"frame-ancestors 'none'",
    ])


class Root(Resource):
    """
    The HTTP port: ``/ws`` (and the path of every other wire format the
    WebSocket factory serves, see ``SignalingFactory.serve``) goes straight
    to the WebSocket resource and everything else to the Klein app.  (Klein's and werkzeug's routing
    leave each request they handle in reference cycles; an upgraded
    WebSocket would tie its whole connection to them.)  Every response
    gets :data:`SECURITY_HEADERS`.
    """

    def __init__(self, app_resource, ws_resource):
        super().__init__()
        self.app_resource = app_resource
        self.ws_resource = ws_resource

    def _ws_paths(self):
        """The paths of the other wire formats the WebSocket factory serves (as bytes)."""
        return {path.encode("utf-8") for path in getattr(self.ws_resource, "wire_formats", ())}

    def getChildWithDefault(self, name, request):
        headers = request.responseHeaders
        for header, value in SECURITY_HEADERS:
            headers.setRawHeaders(header, [value])
        if not request.postpath and self.ws_resource is not None and (
            name == b"ws" or b"/" + name in self._ws_paths()
        ):  # the native WebSocket at /ws, another wire format's at its own path (/peerjs)
            return self.ws_resource
        request.postpath.insert(0, request.prepath.pop())  # the app sees the whole path
        return self.app_resource


class SignalingWeb:
    """
    The HTTP routes.

    :param registry: an :class:`~signaling.registry.IRegistry` provider.
    :param ws_resource: the resource to serve at ``/ws`` (an Autobahn
        ``WebSocketResource``), or ``None``.
    :param stats_token: if set, ``/api/stats`` requires
        ``Authorization: Bearer <stats_token>``.
    :param hide_ip: show ``null`` instead of client addresses in the stats.
    :param stats_origins: browser origins (exact, or ``*``/``?`` patterns)
        allowed to read ``/api/stats`` from their pages (CORS); none by default.
    :param ice_servers: what ``/api/ice-servers`` hands out
        (:class:`~signaling.turn.IceServers`).
    :param admission: the WebSocket side's :class:`~signaling.settings.Settings`:
        ``/api/ice-servers`` follows the same Origin and token rules, and
        counts clients by address the same way.
    :param clock: ``seconds`` and ``callLater`` (token expiry, rate limits).
    :param metrics: :class:`~signaling.metrics.ServerMetrics` for ``/metrics``
        and ``/api/dashboard`` (both behind the stats token, like the stats);
        without it they answer 404.
    :param peerjs: the :class:`~signaling.peerjs_protocol.PeerJSRealm` that
        answers ``GET /<key>/id``; without it, 404.
    :param stats: the :class:`~signaling.stats.StatsCache` the stats are
        served from (shared with ``metrics``); by default one of its own.
    :param stats_rate: answers of ``/api/stats``, ``/metrics`` and
        ``/api/dashboard`` per second to one client address, on average;
        the requests past it wait their turn (0: no pacing).
    :param stats_burst: how many of those one address gets at once.
    :param urgent: what must go out before the bodies' writes in a turn
        (the relays' ``WriteBatch.flush``; :class:`WriteBudget`).
    """

    app = Klein()
    # werkzeug would answer //path with a redirect built from the Host header
    app.url_map.merge_slashes = False

    def __init__(self, registry, ws_resource=None, stats_token=None, hide_ip=False, stats_origins=(),
                 ice_servers=NO_ICE_SERVERS, admission=None, clock=None, metrics=None, stats=None,
                 stats_rate=STATS_RATE, stats_burst=STATS_BURST, peerjs=None, urgent=lambda: None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.registry = registry
        if stats is None:  # (the metrics' own, unless it would show what hide_ip hides)
            shared = metrics.stats if metrics is not None else None
            stats = shared if shared is not None and shared.hide_ip == hide_ip else StatsCache(
                registry, clock, hide_ip=hide_ip)
        self.stats_cache = stats
        self.slicer = stats.slicer
        self.ice_servers = ice_servers
        self.admission = Settings() if admission is None else admission
        self.clock = clock
        self._ice_buckets = AddressBuckets(clock, ICE_SERVERS_RATE, ICE_SERVERS_BURST)
        self.stats_pace = Pacer(clock, stats_rate, stats_burst)
        self.write_budget = WriteBudget(clock, first=urgent)
        self.ws_resource = ws_resource
        self.stats_token = stats_token
        self.hide_ip = hide_ip
        self.stats_origins = tuple(stats_origins)
        self.test_page = static_file("test.html")
        self.test_page_policy = page_policy(self.test_page)
        self.client_module = static_file("signaling.js")
        self.dashboard_page = static_file("dashboard.html")
        self.dashboard_policy = page_policy(self.dashboard_page)
        self.metrics = metrics
        self.peerjs = peerjs

    def resource(self):
        """The resource to serve: the routes below, with ``/ws`` taken first."""
        return Root(self.app.resource(), self.ws_resource)

    def _cors(self, request) -> bool:
        """Allow the request's Origin to read the response if it is listed; return whether it is."""
        request.setHeader(b"Vary", b"Origin")
        origin = (request.getHeader(b"origin") or b"").decode("latin-1")
        if not origin or not self.stats_origins or not origin_allowed(origin, self.stats_origins):
            return False
        request.setHeader(b"Access-Control-Allow-Origin", origin.encode("latin-1"))
        request.setHeader(b"Access-Control-Expose-Headers", b"ETag")
        return True

    def _address_key(self, request) -> str:
        """What the client is counted by (its address, or the proxy's client), as limits count it."""
        settings = self.admission
        ip = client_address(
            host_of(request.getClientAddress()),
            (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1") or None,
            settings.trusted_proxies,
        )
        return address_key(ip, settings.ipv6_prefix) or ""  # ("": this machine, by a UNIX socket)

    def _paced(self, request, answer):
        """``answer(request)`` when the client's turn comes (--stats-rate): at once, or later."""
        wait = self.stats_pace.delay(self._address_key(request))
        if wait <= 0:
            return answer(request)
        return deferLater(self.clock, wait, answer, request)

    def _serve(self, request, body: Body):
        """
        ``body`` as the answer to a GET or HEAD: 304 if the client has it
        (``If-None-Match``), gzip-compressed if it takes that and the body is
        worth it (``Accept-Encoding``).  Returns what a route returns.
        """
        vary = request.responseHeaders.getRawHeaders(b"Vary")
        request.setHeader(b"Vary", vary[0] + b", Accept-Encoding" if vary else b"Accept-Encoding")
        gzip = body.length >= GZIP_MIN and accepts_gzip(request.getHeader(b"accept-encoding") or b"")
        if not_modified(request.getHeader(b"if-none-match") or b"", body.etag):
            request.setResponseCode(304)
            request.setHeader(b"ETag", body.etag[:-1] + b'-gz"' if gzip else body.etag)
            return b""
        if gzip:
            return body.gzipped(self.slicer).addCallback(BodyResource, self.write_budget)
        return BodyResource(body, self.write_budget)

    @app.route("/api/stats", methods=["OPTIONS"])
    def stats_preflight(self, request):
        """CORS preflight (a page sending the stats token): allowed only for the listed origins."""
        if self._cors(request):
            request.setHeader(b"Access-Control-Allow-Methods", b"GET, HEAD")
            request.setHeader(b"Access-Control-Allow-Headers", b"Authorization, If-None-Match")
            request.setHeader(b"Access-Control-Max-Age", b"600")
        request.setResponseCode(204)
        return b""

    def _refused_stats(self, request):
        """The 401 answer when the stats token is set and the request lacks it; else None."""
        if self.stats_token is None or self._authorized(request):
            return None
        request.setResponseCode(401)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="signaling stats"')
        return json.dumps({"error": "a valid bearer token is required"}).encode("utf-8")

    @app.route("/api/stats", methods=["GET", "HEAD"])
    def stats(self, request):
        """
        Who is connected (the v1 document), or with ``?summary`` the counts
        only, or with ``?limit=N&after=ID`` a page of users in id order:
        from a shared capture, never older than the request (``signaling.stats``).
        """
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        self._cors(request)
        return self._paced(request, self._stats)

    def _stats(self, request):
        refused = self._refused_stats(request)
        if refused is not None:
            return refused
        try:  # (request.args drops a parameter without "=": ?summary)
            form = parse_query(parse_qs(request.uri.partition(b"?")[2], keep_blank_values=True))
        except ValueError as e:
            request.setResponseCode(400)
            return _json({"error": str(e)})
        d = self.stats_cache.document()
        if form[0] == "summary":
            d.addCallback(lambda snapshot: snapshot.summary())
        elif form[0] == "page":
            d.addCallback(lambda snapshot: snapshot.page(self.slicer, form[1], form[2]))
        else:
            d.addCallback(lambda snapshot: snapshot.body)
        d.addCallback(lambda body: self._serve(request, body))
        d.addErrback(self._unavailable, request)
        return d

    def _unavailable(self, failure, request):
        request.setResponseCode(503)
        return json.dumps({"error": "stats unavailable: " + failure.getErrorMessage()}).encode("utf-8")

    def _authorized(self, request) -> bool:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("utf-8"), self.stats_token.encode("utf-8")
        )

    @app.route("/metrics", methods=["GET", "HEAD"])
    def prometheus(self, request):
        """Prometheus metrics (text exposition), behind the stats token like the stats."""
        request.setHeader(b"Cache-Control", b"no-store")
        if self.metrics is None:
            request.setResponseCode(404)
            return b""
        return self._paced(request, self._prometheus)

    def _prometheus(self, request):
        refused = self._refused_stats(request)
        if refused is not None:
            return refused
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.exposition_body().addCallback(lambda body: self._serve(request, body))

    @app.route("/api/dashboard", methods=["GET", "HEAD"])
    def dashboard_data(self, request):
        """What the dashboard polls: this process's counters and the users by state, as JSON."""
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        self._cors(request)
        if self.metrics is None:
            request.setResponseCode(404)
            return _json({"error": "no metrics"})
        return self._paced(request, self._dashboard_data)

    def _dashboard_data(self, request):
        refused = self._refused_stats(request)
        if refused is not None:
            return refused
        return self.metrics.dashboard_body().addCallback(lambda body: self._serve(request, body))

    @app.route("/api/ice-servers", methods=["GET", "HEAD"])
    def ice(self, request):
        """
        ICE servers for a client that wants them before or without a
        WebSocket (or fresh TURN credentials for a new call): the same list a
        welcome carries, for the token's fixed peer id or a random one,
        behind the WebSocket's Origin and token rules, and a rate limit per
        address.
        """
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Vary", b"Origin")
        settings = self.admission
        origin = (request.getHeader(b"origin") or b"").decode("latin-1")
        ip = client_address(
            host_of(request.getClientAddress()),
            (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1") or None,
            settings.trusted_proxies,
        )
        key = address_key(ip, settings.ipv6_prefix)
        if key is not None and not self._ice_buckets.take(key):  # (None: this machine, by a UNIX socket)
            request.setResponseCode(429)
            request.setHeader(b"Retry-After", b"1")
            return _json({"error": "too many requests for ICE servers from your address; try again"})
        query_token = (request.args.get(b"token") or [b""])[0].decode("latin-1") or None
        authorization = (request.getHeader(b"authorization") or b"").decode("latin-1") or None
        try:
            claims = authorize(settings, origin, request_token(query_token, authorization), self.clock.seconds())
        except Refused as e:
            request.setResponseCode(e.status)
            if e.status == 401:
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="signaling"')
            return _json({"error": e.reason})
        if origin and settings.allowed_origins:  # a listed page may read it from another origin
            request.setHeader(b"Access-Control-Allow-Origin", origin.encode("latin-1"))
        user = (claims or {}).get("sub") or str(uuid4())
        return _json({"iceServers": self.ice_servers.for_user(user), "ttl": self.ice_servers.ttl})

    @app.route("/api/health", methods=["GET", "HEAD"])
    def health(self, request):
        """
        200 and ``"status": "ok"`` when peers are admitted; else 503 and
        ``"starting"`` (a cluster node not registered yet) or ``"degraded"``
        (a cluster node that lost its shared state).
        """
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        if IClusterRegistry.providedBy(self.registry):
            doc = self.registry.health()
            status = _HEALTH_STATUS.get(doc.get("redis"), "degraded")
        else:
            doc, status = {"registry": "memory"}, "ok"
        if status != "ok":
            request.setResponseCode(503)
        return json.dumps({"status": status, **doc}).encode("utf-8")

    @staticmethod
    def _page(request, page: bytes, policy: bytes) -> bytes:
        """One of our HTML pages, with its own Content-Security-Policy."""
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Content-Security-Policy", policy)
        return page

    @app.route("/test.html", methods=["GET", "HEAD"])
    def test_html(self, request):
        return self._page(request, self.test_page, self.test_page_policy)

    @app.route("/dashboard", methods=["GET", "HEAD"])
    def dashboard(self, request):
        """The live dashboard: a static page; what it shows comes from /api/dashboard and /api/stats."""
        return self._page(request, self.dashboard_page, self.dashboard_policy)

    @app.route("/signaling.js", methods=["GET", "HEAD"])
    def signaling_js(self, request):
        request.setHeader(b"Content-Type", b"text/javascript; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        return self.client_module

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request):
        request.redirect(b"/test.html")
        return b""

    @app.route("/favicon.ico", methods=["GET", "HEAD"])
    def favicon(self, request):
        request.setResponseCode(204)  # none: keeps browsers' consoles quiet
        return b""

    @app.route("/<key>/id", methods=["GET", "HEAD"])
    def peerjs_id(self, request, key):
        """A fresh id for a PeerJS client (``new Peer()`` without one asks ``path + key + "/id"``)."""
        if self.peerjs is None:
            request.setResponseCode(404)
            return b""
        return self.peerjs.http_id(request, key)

    @app.route("/<key>/peers", methods=["GET", "HEAD"])
    def peerjs_peers(self, request, key):
        """PeerJS's discovery (``listAllPeers``): never allowed."""
        if self.peerjs is None:
            request.setResponseCode(404)
            return b""
        return self.peerjs.http_peers(request)

    @app.route("/ws", branch=False)
    def ws(self, request):
        if self.ws_resource is None:
            request.setResponseCode(404)
            return b"WebSocket is not served on this port\n"
        return self.ws_resource
