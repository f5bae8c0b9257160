"""
The HTTP port's defences below the routes (``docs/security.rst`` lists
each limit):

- connections at once, in total and per client address (an IPv6 client by
  its /64), refused at accept time with a canned 503/429 and closed, without
  reading anything;
- a deadline for each request head (request line and headers) that trickled
  bytes do not extend (408), which is also the idle time of a kept-alive
  connection;
- the size of a request head (414 for the request line, 431 for headers);
- no request bodies: no route takes one, so a declared body is refused
  with 413 as soon as the headers are in, before any of it is read;
- pipelining without reading: more than :data:`MAX_PIPELINED` requests
  answered from one read, or more than :data:`MAX_UNSENT` response bytes
  waiting unsent, and the connection is closed.

Every refusal costs O(1) memory and time and is logged within a budget of
lines per interval (:class:`~signaling.limits.LogBudget`).
"""

from collections import Counter
from typing import Any, Optional

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Site

from signaling._compat import declared_body, head_size_so_far
from signaling._tcp import unsent_bytes
from signaling.admission import host_of, is_trusted_proxy
from signaling.limits import ConnectionCounts, LogBudget, address_key
from signaling.safetext import safe

#: requests answered from one read of a connection (pipelined behind each other)
MAX_PIPELINED = 16
#: response bytes that may wait unsent on one connection between requests
MAX_UNSENT = 256 * 1024
#: the largest request body accepted (none: no route takes a body)
MAX_BODY = 0

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def canned(status: int, text: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 response with a short text body."""
    body = (text + "\n").encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "X-Content-Type-Options: nosniff\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def access_line(timestamp, request) -> str:
    """
    Twisted's combined access-log line, with every field the client chose
    (method, URI, protocol, referrer, user agent) through :func:`safe`: cut
    to 100 characters, control and formatting characters escaped.
    """
    address = request.getClientAddress()
    ip = getattr(address, "host", "-")

    def field(value):
        return safe(value or b"-").replace('"', '\\"')

    return '"{}" - - {} "{} {} {}" {} {} "{}" "{}"'.format(
        safe(ip), timestamp, field(request.method), field(request.uri), field(request.clientproto),
        request.code, request.sentLength or "-", field(request.getHeader(b"referer")),
        field(request.getHeader(b"user-agent")),
    )


class Refusal(Protocol):
    """Answer a connection that is over a cap with a canned response, read nothing, close."""

    def __init__(self, response: bytes):
        self.response = response

    def connectionMade(self):
        self.transport.write(self.response)
        self.transport.loseConnection()


class GuardedChannel(HTTPChannel):
    """An HTTP/1.1 channel with a head deadline, size caps, no bodies and bounded pipelining."""

    site: "GuardedSite"  # set by the site that built it
    transport: Any  # a connected TCP or TLS transport

    _key: Optional[str] = None  # the per-address key it is counted under
    _counted = False
    _refused = False
    _deadline = None
    _depth = 0  # nesting of dataReceived (Twisted replays pipelined data from inside it)
    _answered = 0  # requests answered since the outermost dataReceived began
    _head_lines = 0  # lines of the current request head so far

    def connectionMade(self):
        super().connectionMade()
        self._arm()

    # -- the head deadline ------------------------------------------------------

    def _arm(self) -> None:
        timeout = self.site.head_timeout
        if timeout > 0 and self._deadline is None:
            self._deadline = self.site.clock.callLater(timeout, self._head_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _head_late(self) -> None:
        self._deadline = None
        self._refuse(408, "the request head did not arrive in time")

    # -- reading ----------------------------------------------------------------

    def dataReceived(self, data):
        if self._refused:
            return
        if not self._depth:
            self._answered = 0
        self._depth += 1
        try:
            super().dataReceived(data)
        finally:
            self._depth -= 1

    def lineReceived(self, line):
        if self._refused:
            return
        if head_size_so_far(self) + len(line) > self.totalHeadersSize:
            self._too_long()
            return
        self._head_lines += 1
        super().lineReceived(line)

    def lineLengthExceeded(self, line):
        self._too_long()

    def _too_long(self) -> None:
        if self._head_lines == 0:
            self._refuse(414, "the request line is too long")
        else:
            self._refuse(431, "the request headers are too large")

    def allHeadersReceived(self):
        self._disarm()
        self._head_lines = 0
        body = declared_body(self)
        if body is None or body > MAX_BODY:  # chunked, or a declared body
            self._refuse(413, "request bodies are not accepted")
            return
        super().allHeadersReceived()

    def allContentReceived(self):
        if not self._refused:
            super().allContentReceived()

    def rawDataReceived(self, data):
        if not self._refused:
            super().rawDataReceived(data)

    # -- answering ------------------------------------------------------------------

    def requestDone(self, request):
        self._answered += 1
        if self.persistent and (self._answered > MAX_PIPELINED or unsent_bytes(self.transport) > MAX_UNSENT):
            self.site.note("pipelining without reading", self.transport.getPeer(), None)
            self.persistent = False
            self._refused = True
            super().requestDone(request)
            self.transport.abortConnection()
            return
        if self.persistent:
            self._arm()  # for the next request's head (and the idle time until it starts)
        super().requestDone(request)

    def _refuse(self, status: int, text: str) -> None:
        """Answer ``status`` and close, reading nothing more."""
        self._refused = True
        self._disarm()
        self.site.note(f"{status} ({text})", self.transport.getPeer(), status)
        self.transport.write(canned(status, text))
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self._disarm()
        self.site.release(self)
        super().connectionLost(reason)


class GuardedSite(Site):
    """
    A Site whose connections are counted, in total and per client address,
    and served by :class:`GuardedChannel`.

    :param max_connections: HTTP connections at once (503 past it).
    :param max_per_address: HTTP connections at once from one address key (429).
    :param max_head: bytes of a request line plus headers.
    :param head_timeout: seconds to receive a request head; 0 disables.
    :param trusted_proxies: networks whose connections are not counted per
        address (every client behind the proxy shares its address).
    :param ipv6_prefix: the prefix length IPv6 clients are counted by.
    """

    protocol = GuardedChannel  # type: ignore[assignment]  # (HTTP/1.1 only: no HTTP/2 negotiation)
    _log = Logger()

    def __init__(self, resource, clock, max_connections=1024, max_per_address=64, max_head=16384,
                 head_timeout=10.0, trusted_proxies=(), ipv6_prefix=64, **kwargs):
        kwargs.setdefault("logFormatter", access_line)
        super().__init__(resource, reactor=clock, **kwargs)
        self.clock = clock
        self._access = LogBudget(clock, self._access_held, lines=100)
        self.counts = ConnectionCounts(max_connections, max_per_address)
        self.refusals: Counter = Counter()  # HTTP status -> connections or requests refused so (metrics)
        self.max_head = max_head
        self.head_timeout = head_timeout
        self.trusted_proxies = trusted_proxies
        self.ipv6_prefix = ipv6_prefix
        self._budget = LogBudget(clock, self._held)

    def buildProtocol(self, addr):
        peer = host_of(addr)
        key = None if is_trusted_proxy(peer, self.trusted_proxies) else address_key(peer, self.ipv6_prefix)
        refused = self.counts.add(key)
        if refused == "total":
            self.note("503 (too many HTTP connections)", addr, 503)
            return Refusal(canned(503, "too many connections; try again later"))
        if refused is not None:
            self.note("429 (too many HTTP connections from one address)", addr, 429)
            return Refusal(canned(429, "too many connections from your address"))
        channel = super().buildProtocol(addr)
        channel._key = key
        channel._counted = True
        channel.totalHeadersSize = channel.MAX_LENGTH = self.max_head
        return channel

    def release(self, channel: GuardedChannel) -> None:
        """Stop counting a channel: it closed, or a WebSocket took its connection over."""
        if channel._counted:
            channel._counted = False
            self.counts.remove(channel._key)

    def log(self, request):
        """The access log: a line per request, within a budget (100 per 10 s, then a count)."""
        if self._access.allow("requests"):
            super().log(request)

    def _access_held(self, summary: str) -> None:
        self._log.info("HTTP: access log lines not written in the last {interval}s: {summary}",
                       interval=self._access.interval, summary=summary)

    def note(self, what: str, address, status: Optional[int]) -> None:
        """Count a refusal with HTTP ``status`` (if one was sent); log it within the budget of lines."""
        if status is not None:
            self.refusals[status] += 1
        if self._budget.allow(what.split(" ", 1)[0]):
            self._log.info("HTTP: refused {ip}: {what}", ip=host_of(address), what=what)

    def _held(self, summary: str) -> None:
        self._log.warn(
            "HTTP: refusals not logged in the last {interval}s: {summary}",
            interval=self._budget.interval, summary=summary,
        )
