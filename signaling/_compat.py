"""
Every use of a non-public name of Autobahn, and of Twisted's HTTP channel
and request, in one place (socket-level ones: ``signaling._tcp``).

Each function says what it relies on and why it is worth it.
``tests/test_compat.py`` checks every assumption against the installed
libraries and fails loudly if one stops holding, instead of letting a limit
or an optimisation quietly stop working on an upgrade.

Methods of Autobahn's protocol that ``signaling.protocol`` overrides, and
that Autobahn calls from its own frame loop (also checked there):
``_connectionMade`` (from ``connectionMade``), ``processData`` (each step of
its frame parser), ``onFrameBegin`` (each frame header), ``failHandshake``
(every refused handshake), ``sendData`` (every write).
"""

from types import FunctionType
from typing import Any

from autobahn.websocket.protocol import WebSocketProtocol

STATE_OPEN = WebSocketProtocol.STATE_OPEN
STATE_CONNECTING = WebSocketProtocol.STATE_CONNECTING

# -- Autobahn: connections --------------------------------------------------------------


def connection_made_quietly(proto, base) -> None:
    """
    Run Autobahn's ``base._connectionMade(proto)`` without its debug
    pretty-print of every option, which it formats for each connection
    whether debug logging is on or not: a third of the time of a burst of
    connects.  The options are copied from the factory here, and Autobahn's
    copying loop (and the pformat after it) runs over nothing.

    Relies on ``CONFIG_ATTRS`` (the option names Autobahn copies) and
    ``_connectionMade``.  If they change: connects are slower, nothing else.

    Also applies ``tcpNoDelay`` (TCP_NODELAY, on by default), which
    Autobahn's Twisted ``connectionMade`` tries to set from the connection
    *before* ``_connectionMade`` has copied the option there: the
    AttributeError is swallowed by its bare ``except``, so that otherwise
    the socket keeps Nagle's algorithm, and a small frame written while an
    earlier one is unacknowledged waits for the acknowledgement.
    """
    factory = proto.factory
    if getattr(type(proto), "_options_of", None) is not factory:  # (see with_options)
        for name in base.CONFIG_ATTRS:
            if not hasattr(proto, name):
                setattr(proto, name, getattr(factory, name))
    try:
        proto.transport.setTcpNoDelay(proto.tcpNoDelay)
    except (AttributeError, OSError):  # (not a TCP transport: a UNIX socket, a test's)
        pass
    proto.CONFIG_ATTRS = ()
    try:
        base._connectionMade(proto)
    finally:
        del proto.CONFIG_ATTRS


def with_options(cls, factory, base):
    """
    A subclass of ``cls`` with ``factory``'s protocol options (the
    ``CONFIG_ATTRS`` that ``base._connectionMade`` copies to every new
    connection) as class attributes: a connection of it needs none of its
    own (Autobahn finds them all there; :func:`connection_made_quietly`
    copies nothing).  Make it anew whenever the factory's options change.
    Relies on ``CONFIG_ATTRS``, as connection_made_quietly does.
    """
    attrs = {}
    for name in base.CONFIG_ATTRS:
        value = getattr(factory, name)
        # (a function as a class attribute would be bound to each connection:
        # perMessageCompressionAccept is called with the offers alone)
        attrs[name] = staticmethod(value) if isinstance(value, FunctionType) else value
    attrs.update(__module__=cls.__module__, __qualname__=cls.__qualname__, __doc__=cls.__doc__,
                 _options_of=factory)
    return type(cls.__name__, (cls,), attrs)


def use_timer(factory, timer) -> None:
    """
    Make Autobahn schedule its handshake, ping and close timeouts with
    ``timer`` (``call_later``; :class:`signaling.timers.SlotTimer`), on our
    clock: its default, txaio's batched timer, runs on the global reactor
    and runs a whole bucket's calls (up to 1,000) in one reactor turn.
    Relies on the factory's ``_batched_timer``.
    """
    factory._batched_timer = timer


def spread_first_ping(proto, fraction: float) -> None:
    """
    Move the first keepalive ping, which Autobahn schedules
    ``autoPingInterval`` after the handshake, to ``fraction`` (0 to 1) of
    the way through the second half of that interval.  Peers that connect
    together (a burst, a restart's reconnections) are then not pinged
    together, interval after interval: each later ping is scheduled an
    interval after the previous pong, so the spread stays.  Relies on
    ``autoPingPendingCall``, ``autoPingInterval``, ``_sendAutoPing`` and
    the factory's ``_batched_timer`` (:func:`use_timer`).
    """
    call = proto.autoPingPendingCall
    if call is None or not proto.autoPingInterval:
        return
    call.cancel()
    delay = proto.autoPingInterval * (0.5 + 0.5 * fraction)
    proto.autoPingPendingCall = proto.factory._batched_timer.call_later(delay, proto._sendAutoPing)


#: Autobahn protocol attributes used only while the opening handshake is
#: processed (checked against Autobahn's server code): dropped once open, to
#: keep idle connections small.
HANDSHAKE_ONLY = (
    "http_request_data", "http_response_data", "http_headers", "http_status_line", "_wskey",
    "http_request_params", "http_request_uri", "http_request_path", "http_request_host",
    "websocket_protocols", "websocket_extensions", "flashSocketPolicy", "perMessageCompressionAccept",
    "allowedOriginsPatterns", "allowedOrigins", "versions",
)


def drop_handshake_state(proto) -> None:
    """
    Drop what only the handshake needed, and re-pack the attribute table
    (6.3 KiB an idle connection instead of about 9).  Also: Autobahn queues
    outgoing data (``send_queue``) only for ``sendMessage(sync=True)`` or a
    chopsize, which this server never uses: an empty tuple instead of an
    empty deque per connection (it would fail loudly, not share).
    """
    attrs = proto.__dict__
    for name in HANDSHAKE_ONLY:
        attrs.pop(name, None)
    if not attrs.get("send_queue"):
        attrs["send_queue"] = ()
    proto.__dict__ = dict(attrs)


def closed_by_peer(proto) -> bool:
    """
    Whether the peer itself started the close with a close frame (it chose
    to go), rather than the connection being lost or this server closing it.
    Relies on ``remoteCloseCode`` (the code of a close frame received) and
    ``closedByMe`` (this side started the closing handshake).
    """
    return proto.remoteCloseCode is not None and not proto.closedByMe


def failed_by_us(proto) -> bool:
    """Whether this side failed the connection for a protocol error (``failedByMe``)."""
    return bool(proto.failedByMe)


def closed_by_us(proto) -> bool:
    """Whether this side started the closing handshake (``closedByMe``)."""
    return bool(proto.closedByMe)


def local_close_code(proto):
    """The code of the close frame this side sent, or None (``localCloseCode``)."""
    return proto.localCloseCode


def forget_closed_deferred(proto) -> None:
    """
    Autobahn resolves ``is_closed`` with the protocol itself: a reference
    cycle that would leave every closed connection (some 20 objects) to
    Python's cyclic garbage collector instead of freeing it at once.
    """
    proto.is_closed = None


# -- Autobahn: the frame parser -----------------------------------------------------------


def between_frames(proto) -> bool:
    """
    Whether Autobahn's frame parser is between messages with nothing
    buffered, so that the next bytes may be taken by the fast path.
    Relies on ``data`` (its receive buffer), ``current_frame``,
    ``inside_message`` and ``_perMessageCompress``.
    """
    return (
        not proto.data
        and proto.current_frame is None
        and not proto.inside_message
        and proto._perMessageCompress is None
    )


def between_frames_with_data(proto) -> bool:
    """Between two frames (not in one's payload), with bytes buffered for the next."""
    return proto.current_frame is None and bool(proto.data)


def buffered(proto) -> bytes:
    """What Autobahn holds unparsed (its receive buffer, ``data``)."""
    return proto.data


def take_buffered(proto) -> bytes:
    """Take what Autobahn holds unparsed, leaving its buffer empty."""
    data, proto.data = proto.data, b""
    return data


def frame_header(proto):
    """``(opcode, payload length)`` of the frame Autobahn is reading (``current_frame``)."""
    frame = proto.current_frame
    return frame.opcode, frame.length


def traffic_seen(proto) -> None:
    """
    What Autobahn does for every frame it reads when ``autoPingRestartOnAnyTraffic``
    is on (cancel the pending keepalive timeout), for frames the fast path
    reads instead.  Relies on ``autoPingTimeoutCall`` and
    ``_cancelAutoPingTimeoutCall``.
    """
    if proto.autoPingTimeoutCall and proto.autoPingRestartOnAnyTraffic:
        proto._cancelAutoPingTimeoutCall()


def sending_idle(proto) -> bool:
    """Whether Autobahn is not in the middle of sending a message (``send_state``)."""
    return proto.send_state == WebSocketProtocol.SEND_STATE_GROUND


# -- Twisted web ---------------------------------------------------------------------------


def head_size_so_far(channel) -> int:
    """
    Bytes of the current request head an ``HTTPChannel`` has taken so far
    (``_receivedHeaderSize``, which it compares with ``totalHeadersSize``
    itself, answering 400): to answer 431 instead, before it does.
    """
    return channel._receivedHeaderSize


def declared_body(channel):
    """
    The body length the request whose headers just arrived declares: 0 for
    none, an int, or None for chunked (``HTTPChannel.length``, set from the
    headers before ``allHeadersReceived``).
    """
    return channel.length


def untie_request(request) -> None:
    """
    A request whose connection a WebSocket has taken over is never
    finished: remove it from its HTTP/1.x channel's queue (``requests``) and
    drop its finish notifications, so that it, its channel and the
    connection are freed by reference counting instead of waiting in a
    cycle for the collector.
    """
    requests = getattr(request.channel, "requests", None)  # (an HTTP/1.x channel's queue)
    if requests is not None and request in requests:
        requests.remove(request)
    request.notifications = []


# -- Twisted's logging ----------------------------------------------------------------------


def log_observers(publisher) -> list:
    """
    What ``publisher`` (the global one) sends events to directly: the
    observers ``twistd`` and ``twist`` began logging to
    (``LogPublisher._observers``).  Relies on that list; if it goes, log
    lines are written and formatted as Twisted does, nothing else changes.
    """
    return list(getattr(publisher, "_observers", ()))


def observer_file(observer):
    """The file a ``FileLogObserver`` writes to (``_outFile``), or None."""
    return getattr(observer, "_outFile", None)


def set_observer_file(observer, out) -> None:
    observer._outFile = out


def default_text_format(observer) -> bool:
    """
    Whether a ``FileLogObserver`` formats as ``textFileLogObserver(f)``
    makes it (twistd's and twist's text log): ``formatEventAsClassicLogText``
    with RFC 3339 timestamps.  Relies on that function's inner ``formatEvent``
    (its name, and ``timeFormat`` the one variable it closes over).
    """
    from twisted.logger import _file
    from twisted.logger._format import timeFormatRFC3339

    fn: Any = getattr(observer, "formatEvent", None)
    code = getattr(fn, "__code__", None)
    return (
        code is not None
        and getattr(fn, "__module__", None) == _file.__name__
        and fn.__qualname__ == "textFileLogObserver.<locals>.formatEvent"
        and code.co_freevars == ("timeFormat",)
        and fn.__closure__[0].cell_contents == timeFormatRFC3339
    )
