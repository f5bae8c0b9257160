"""
A lean Redis connection for the registry's scripts.

Every registry operation of a cluster node is one Lua script; a relay to a
peer on another node is one.  txredisapi's command path (a pool handler
running each command through ``inlineCallbacks``, a SHA-1 of the script's
3 KB source for every call, a Deferred queue for the replies, a timer per
command) cost a cross-node relay more than the relay itself.  Here:

- the scripts are loaded once per connection (``SCRIPT LOAD``) and run by
  their SHA-1 (``EVALSHA``);
- a command is written as it is issued; replies are matched to commands in
  order (Redis answers in order on a connection), parsed by hiredis (a
  small reader of this module's where hiredis is missing: PyPy);
- one connection for every script of the node: Redis runs them in the
  order this node issued them, whoever waits for what;
- one timer per connection, for the oldest command waiting: an answer
  later than ``timeout`` drops the connection (every command waiting on it
  fails; :class:`RedisLink` connects again, with backoff).

The subscriptions (this node's channel, the y-webrtc topics' channels) have
a connection of the same kind: :class:`SubscriberLink`, messages handed on
as bytes.  (The registry used txredisapi before; these two are all it needs
of a Redis client.)
"""

import hashlib
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

_HiredisReader: Any = None
_HiredisReplyError: Any = None
try:  # a compiled reply parser on CPython (a dependency there)
    from hiredis import Reader as _HiredisReader
    from hiredis import ReplyError as _HiredisReplyError
except ImportError:  # pragma: no cover - exercised on PyPy
    pass


class ReplyError(Exception):
    """Redis answered a command with an error (``-ERR ...``, ``-NOSCRIPT ...``, a script's error)."""


class ConnectionLost(Exception):
    """The connection closed (or was dropped for an answer too late) before the command was answered."""


def command(*args) -> bytes:
    """One command in RESP: an array of bulk strings (``str`` as UTF-8, numbers as text)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = (arg if isinstance(arg, str) else str(arg)).encode("utf-8")
        out.append(b"$%d\r\n" % len(arg))
        out.append(arg)
        out.append(b"\r\n")
    return b"".join(out)


class PythonReader:
    """
    RESP 2 replies from a byte stream, as ``hiredis.Reader`` gives them:
    :meth:`gets` answers the next whole reply, or False if none is complete
    yet; bulk strings as bytes, integers as int, errors as
    :class:`ReplyError` (returned, not raised), nil as None.
    """

    def __init__(self):
        self._buffer = b""
        self._pos = 0

    def feed(self, data: bytes) -> None:
        self._buffer = self._buffer[self._pos:] + data
        self._pos = 0

    def gets(self):
        reply, pos = self._parse(self._pos)
        if pos < 0:
            return False
        self._pos = pos
        return reply

    def _parse(self, pos: int) -> Tuple[Any, int]:
        buf = self._buffer
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None, -1
        kind, line = buf[pos:pos + 1], buf[pos + 1:end]
        pos = end + 2
        if kind == b"+":
            return line, pos
        if kind == b"-":
            return ReplyError(line.decode("utf-8", "replace")), pos
        if kind == b":":
            return int(line), pos
        if kind == b"$":
            size = int(line)
            if size < 0:
                return None, pos
            if len(buf) < pos + size + 2:
                return None, -1
            return buf[pos:pos + size], pos + size + 2
        if kind == b"*":
            count = int(line)
            if count < 0:
                return None, pos
            items = []
            for _ in range(count):
                item, pos = self._parse(pos)
                if pos < 0:
                    return None, -1
                items.append(item)
            return items, pos
        raise ValueError(f"not a RESP reply: {kind!r}")


def _reader():
    return _HiredisReader() if _HiredisReader is not None else PythonReader()


def _is_error(reply) -> bool:
    return isinstance(reply, ReplyError) or (_HiredisReplyError is not None and isinstance(reply, _HiredisReplyError))


class _Replies(Protocol):
    """
    What both kinds of connection share: commands written as RESP, replies
    read with :func:`_reader` and handed to :meth:`_reply` one by one, the
    Deferreds of the commands waiting for theirs (in order), failed with
    :class:`ConnectionLost` when the connection goes.
    """

    transport: Any
    _log = Logger()

    def connectionMade(self):
        self._reader = _reader()
        self._waiting: Deque[defer.Deferred] = deque()
        self._lost = False

    def _send(self, *args) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if self._lost:
            d.errback(ConnectionLost("the connection to Redis is closed"))
            return d
        self._waiting.append(d)
        self.transport.write(command(*args))
        return d

    def dataReceived(self, data):
        reader = self._reader
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except Exception as e:  # (a protocol error: nothing after it can be trusted)
                self._log.warn("redis: unreadable reply: {e}", e=e)
                self.transport.abortConnection()
                return
            if reply is False:
                return
            self._reply(reply)

    def _reply(self, reply) -> None:
        raise NotImplementedError

    def _answer(self, reply) -> None:
        """``reply`` answers the oldest command waiting."""
        d = self._waiting.popleft()
        if _is_error(reply):
            d.errback(ReplyError(str(reply)))
        else:
            d.callback(reply)

    def connectionLost(self, reason):
        self._lost = True
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(ConnectionLost(f"the connection to Redis was lost: {reason.getErrorMessage()}"))
        self.factory.connection_lost(self)


class RedisConnection(_Replies):
    """
    One connection: :meth:`execute` writes a command and answers a Deferred
    of its reply (failing with :class:`ReplyError` or :class:`ConnectionLost`).
    Before it is :attr:`ready`, it authenticates, selects the database and
    loads the scripts (``factory.setup``).
    """

    ready = False

    def connectionMade(self):
        super().connectionMade()
        self._sent: Deque[float] = deque()  # when each command waiting was written
        self._watchdog = None
        setup = [self.execute(*args) for args in self.factory.setup_commands()]
        defer.gatherResults(setup, consumeErrors=True).addCallbacks(self._set_up, self._setup_failed)

    def _set_up(self, replies):
        if self._lost:
            return
        self.ready = True
        self.factory.connection_ready(self, replies)

    def _setup_failed(self, failure):
        if not self._lost:
            self._log.warn("redis: setting up a connection failed: {why}", why=failure.getErrorMessage())
            self.transport.abortConnection()

    def execute(self, *args) -> defer.Deferred:
        d = self._send(*args)
        if not self._lost:
            self._sent.append(self.factory.clock.seconds())
            if self._watchdog is None:
                self._watchdog = self.factory.clock.callLater(self.factory.timeout, self._check)
        return d

    def _reply(self, reply) -> None:
        if not self._waiting:
            self._log.warn("redis: a reply to no command; dropping the connection")
            self.transport.abortConnection()
            return
        self._sent.popleft()
        self._answer(reply)

    def _check(self):
        """The oldest command has waited ``timeout``: drop the connection (everything behind it waits too)."""
        self._watchdog = None
        if not self._sent or self._lost:
            return
        clock, timeout = self.factory.clock, self.factory.timeout
        late = clock.seconds() - self._sent[0]
        if late >= timeout:
            self._log.warn("redis: no answer for {late:.1f}s; dropping the connection", late=late)
            self.transport.abortConnection()
            return
        self._watchdog = clock.callLater(timeout - late, self._check)

    def connectionLost(self, reason):
        self.ready = False
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None
        self._sent.clear()
        super().connectionLost(reason)


class _LinkFactory(Factory):
    protocol = RedisConnection
    noisy = False

    def __init__(self, link: "RedisLink"):
        self.link = link
        self.clock = link.clock
        self.timeout = link.timeout

    def setup_commands(self):
        return self.link.setup_commands()

    def connection_ready(self, conn, replies):
        self.link._connection_ready(conn, replies)

    def connection_lost(self, conn):
        self.link._connection_lost(conn)


class RedisLink:
    """
    The node's command connection, kept connected (backoff up to
    ``max_delay`` seconds between tries), with its scripts loaded.

    :param endpoint: where Redis is (a client endpoint).
    :param scripts: name -> Lua source, run with :meth:`run`.
    :param db: the database to select; ``password``: for ``AUTH``.
    :param clock: ``seconds``/``callLater`` for the answer timeout.
    :param reactor: what the retries are scheduled on.
    :param on_ready: called (no arguments) each time a connection is ready.
    :param on_lost: called (no arguments) each time the ready connection is lost.
    """

    _log = Logger()

    def __init__(self, endpoint, scripts: Dict[str, str], clock, reactor, db: int = 0,
                 password: Optional[str] = None, timeout: float = 5.0, max_delay: float = 5.0,
                 on_ready: Callable[[], object] = lambda: None, on_lost: Callable[[], object] = lambda: None):
        self.clock = clock
        self.timeout = timeout
        self.db = db
        self.password = password
        self.on_ready = on_ready
        self.on_lost = on_lost
        self._names = list(scripts)
        self._sources = [scripts[name] for name in self._names]
        self.sha = {name: hashlib.sha1(src.encode("utf-8")).hexdigest() for name, src in scripts.items()}
        self.connection: Optional[RedisConnection] = None  # the ready one, if any
        self._service = ClientService(endpoint, _LinkFactory(self), retryPolicy=backoffPolicy(maxDelay=max_delay),
                                      clock=reactor)

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> defer.Deferred:
        return self._service.stopService()

    @property
    def ready(self) -> bool:
        return self.connection is not None

    def setup_commands(self) -> List[tuple]:
        out: List[tuple] = []
        if self.password:
            out.append(("AUTH", self.password))
        if self.db:
            out.append(("SELECT", self.db))
        out.extend(("SCRIPT", "LOAD", source) for source in self._sources)
        return out

    def _connection_ready(self, conn, replies) -> None:
        loaded = [r.decode("ascii") if isinstance(r, bytes) else str(r) for r in replies[-len(self._sources):]]
        if loaded != [self.sha[name] for name in self._names]:
            self._log.warn("redis: the scripts loaded under other names than their SHA-1; dropping the connection")
            conn.transport.abortConnection()
            return
        self.connection = conn
        self.on_ready()

    def _connection_lost(self, conn) -> None:
        if self.connection is conn:
            self.connection = None
            self.on_lost()

    def run(self, name: str, args) -> defer.Deferred:
        """Run the script ``name`` with ``ARGV`` = ``args`` (no keys); a Deferred of its reply."""
        conn = self.connection
        if conn is None:
            return defer.fail(ConnectionLost("not connected to Redis"))
        d = conn.execute("EVALSHA", self.sha[name], 0, *args)
        d.addErrback(self._noscript, conn)
        return d

    def _noscript(self, failure, conn):
        # Redis forgot the scripts (SCRIPT FLUSH): load them again on a new
        # connection rather than run one now, after commands issued later
        if failure.check(ReplyError) and str(failure.value).startswith("NOSCRIPT") and conn.connected:
            self._log.warn("redis: the scripts are gone from Redis; connecting again to load them")
            conn.transport.abortConnection()
        return failure


class Subscriber(_Replies):
    """
    A connection in Redis's subscriber mode: :meth:`subscribe` and
    :meth:`unsubscribe` (one channel each; Deferreds fired by Redis's
    confirmation, in order), and every message published on a subscribed
    channel handed to ``factory.on_message(channel, data)`` as bytes.
    """

    def connectionMade(self):
        super().connectionMade()
        factory = self.factory
        if factory.password:
            self._send("AUTH", factory.password).addCallbacks(
                lambda _: factory.connection_ready(self), self._setup_failed)
        else:
            factory.connection_ready(self)

    def _setup_failed(self, failure):
        if not self._lost:
            self._log.warn("redis: authenticating the subscriber failed: {why}", why=failure.getErrorMessage())
            self.transport.abortConnection()

    def subscribe(self, channel: str) -> defer.Deferred:
        return self._send("SUBSCRIBE", channel)

    def unsubscribe(self, channel: str) -> defer.Deferred:
        return self._send("UNSUBSCRIBE", channel)

    def _reply(self, reply) -> None:
        if type(reply) is list and len(reply) == 3 and reply[0] == b"message":
            self.factory.on_message(reply[1], reply[2])
        elif self._waiting:  # (a confirmation of subscribe/unsubscribe, or AUTH's answer)
            self._answer(reply)
        # (else a confirmation nobody waits for: nothing to do)


class _SubscriberFactory(Factory):
    protocol = Subscriber
    noisy = False

    def __init__(self, link: "SubscriberLink"):
        self.link = link
        self.password = link.password
        self.on_message = link.on_message

    def connection_ready(self, conn):
        self.link.on_connected(conn)

    def connection_lost(self, conn):
        self.link.on_lost()


class SubscriberLink:
    """
    The node's subscriber connection, kept connected (backoff up to
    ``max_delay``): ``on_connected(subscriber)`` each time it is up (the
    caller subscribes then), ``on_lost()`` each time it goes, and
    ``on_message(channel, data)`` (bytes) for every message.
    """

    def __init__(self, endpoint, reactor, on_connected, on_lost, on_message, password: Optional[str] = None,
                 max_delay: float = 5.0):
        self.password = password
        self.on_connected = on_connected
        self.on_lost = on_lost
        self.on_message = on_message
        self._service = ClientService(endpoint, _SubscriberFactory(self),
                                      retryPolicy=backoffPolicy(maxDelay=max_delay), clock=reactor)

    def start(self) -> None:
        self._service.startService()

    def stop(self) -> defer.Deferred:
        return self._service.stopService()
