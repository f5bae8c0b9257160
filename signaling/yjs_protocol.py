"""
y-webrtc's signaling protocol (npm ``y-webrtc`` 10.x, its ``bin/server.js``
and lib0's WebSocket client), served at ``/yjs`` on the same core as the
native protocol: admission (origins, access tokens, connection caps),
limits (frame rate, message size, the outbound cap), logs, the registry
(stats, the cluster's node bookkeeping) and metrics are shared.

Wire (full text: ``docs/yjs.rst``)::

    server -> client on open  nothing
    client -> server          {"type": "subscribe", "topics": [T, ...]}
                              {"type": "unsubscribe", "topics": [T, ...]}
                              {"type": "publish", "topic": T, ...}
                              {"type": "ping"}
    server -> subscribers     the publish, whole, with "clients": <subscribers of T>
                              (to every subscriber of T, the sender too if it is one)
    server -> client          {"type": "pong"} for a ping
    server -> client on error {"type": "error", "code": C, "message": "...", "ref": <type>|null}
                              (y-webrtc ignores it; repeated invalid frames close with 1008)

The topic rules live in :mod:`signaling.topics`; with ``--redis``, topics
span the nodes through :mod:`signaling.cluster_topics`.  Each connection
is registered as ``yjs/<uuid4>`` (idle: the pairing rules do not apply).
"""

from collections import Counter
from typing import Any, Optional

from twisted.logger import Logger

from signaling import messages
from signaling.errors import BINARY_FRAME
from signaling.frameguard import CLOSE_POLICY_VIOLATION
from signaling.protocol import SignalingServerProtocol
from signaling.results import is_deferred
from signaling.topics import REASONS, TOO_MANY_HERE, Change, TopicAccess, Topics, valid_topic

__all__ = ["YjsProtocol", "YjsRooms", "install", "PATH", "INVALID_FRAMES_LIMIT"]

#: where the protocol is served (on the HTTP port and the WebSocket port)
PATH = "/yjs"

#: invalid frames (net of valid ones since) at which a connection is closed with 1008
INVALID_FRAMES_LIMIT = 20

PONG = b'{"type":"pong"}'

#: the message types a y-webrtc client sends
TYPES = ("subscribe", "unsubscribe", "publish", "ping")


class InvalidFrame(Exception):
    """A frame that is not a y-webrtc message: ``code`` (error code), ``text``, ``ref`` (its type)."""

    def __init__(self, code: str, text: str, ref: Optional[str] = None):
        super().__init__(text)
        self.code = code
        self.text = text
        self.ref = ref


def parse(payload: bytes) -> dict:
    """
    One frame as a y-webrtc message (a JSON object with a string ``type``),
    or :class:`InvalidFrame`.  Shapes are checked here: ``topics`` a list
    (absent: none), ``topic`` of a publish a valid topic name.
    """
    try:
        message = messages.loads(payload)
    except (ValueError, RecursionError) as e:
        raise InvalidFrame("invalid-json", f"frame is not valid JSON: {messages._short(e)}") from None
    if type(message) is not dict:
        raise InvalidFrame("invalid-message", "a message must be a JSON object")
    kind = message.get("type")
    if type(kind) is not str:
        raise InvalidFrame("invalid-message", 'field "type" must be a string')
    if kind == "publish":
        if not valid_topic(message.get("topic")):
            raise InvalidFrame("invalid-topic", 'field "topic" of a publish: ' + REASONS["invalid-topic"], kind)
    elif kind in ("subscribe", "unsubscribe"):
        topics = message.get("topics", [])
        if type(topics) is not list:
            raise InvalidFrame("invalid-message", 'field "topics" must be an array of topic names', kind)
    elif kind != "ping":
        raise InvalidFrame("unknown-type", "unknown message type; expected one of " + ", ".join(TYPES), kind)
    return message


def frame_with_clients(payload: bytes, message: dict):
    """
    ``head``: the publish as the subscribers get it, but for its closing
    ``,"clients":N}`` (see :func:`finish`).  The client's own bytes are kept
    (relayed as sent) unless it set ``clients`` itself, when it is encoded
    again without it.
    """
    if "clients" in message:
        del message["clients"]
        body = messages.encode(message)
    else:
        body = payload.rstrip(b" \t\r\n")
    return body[:-1] + b',"clients":'


def finish(head: bytes, clients: int) -> bytes:
    return head + b"%d}" % clients


class YjsRooms:
    """
    The y-webrtc side of one server process: its topics and their
    subscribers (:class:`~signaling.topics.Topics`), publishing to them
    (here, and through the cluster backend if there is one), and counters.

    :param factory: the :class:`~signaling.protocol.SignalingFactory`.
    :param max_per_connection: topics one connection may subscribe to.
    :param max_topics: topics this process holds at once.
    """

    def __init__(self, factory, max_per_connection: int = 64, max_topics: int = 20000):
        self.factory = factory
        self.topics = Topics(max_per_connection, max_topics)
        #: the cluster's side (:class:`~signaling.cluster_topics.RedisTopics`), or None
        self.backend: Any = None
        self.publishes = 0  # publishes received
        self.delivered = 0  # frames handed to subscribers' sockets here
        self.refused: Counter = Counter()  # topics refused to a subscribe, by reason
        self.generation = 0  # counts changes of who subscribes to what here (the stats' cache)

    # -- subscriptions --------------------------------------------------------

    def subscribe(self, proto, names):
        """
        Subscribe ``proto`` to the topics of ``names`` it may join:
        ``(change, done)``, ``done`` a Deferred (in a cluster, until the
        other nodes would see its publishes reach it) or None.
        """
        change = self.topics.subscribe(proto, names, proto.access)
        for _, reason in change.refused:
            self.refused[reason] += 1
        return change, self._changed(change, 1)

    def unsubscribe(self, proto, names):
        """Unsubscribe ``proto`` from ``names``: ``(change, done)`` as for :meth:`subscribe`."""
        change = self.topics.unsubscribe(proto, names)
        return change, self._changed(change, -1)

    def leave(self, proto) -> Change:
        """Unsubscribe ``proto`` from every topic (its socket went)."""
        change = self.topics.leave(proto)
        self._changed(change, -1)
        return change

    def _changed(self, change: Change, step: int):
        if change.topics:
            self.generation += 1
        if change.topics and self.backend is not None:
            return self.backend.changed(change, step)
        return None

    # -- publishing -------------------------------------------------------------

    def publish(self, topic: str, head: bytes):
        """
        Deliver a publish (``head``, see :func:`frame_with_clients`) to every
        subscriber of ``topic``: here, and through the cluster backend on
        the other nodes.  Returns how many subscribers it counted (the
        ``clients`` it sent), or a Deferred of that.
        """
        self.publishes += 1
        here = self.topics.count(topic)
        if self.backend is None:
            if here:
                self.deliver(topic, finish(head, here))
            return here
        return self.backend.publish(topic, head, here)

    def deliver(self, topic: str, frame: bytes) -> int:
        """Send ``frame`` to every subscriber of ``topic`` here; return to how many."""
        sent = 0
        proto: Any
        for proto in list(self.topics.subscribers(topic)):  # (a send may drop one, and so unsubscribe it)
            if proto.send(frame):
                sent += 1
        self.delivered += sent
        return sent

    # -- views ------------------------------------------------------------------

    def summary(self) -> dict:
        """``topics`` and ``subscriptions`` of this process (for stats and metrics)."""
        return self.topics.summary()

    def topics_of(self, peer_id: str) -> int:
        """How many topics the connection registered as ``peer_id`` subscribes to here (0 if none)."""
        proto = self.factory.connections.get(peer_id)
        return len(self.topics.topics_of(proto)) if proto is not None else 0

    def counters(self) -> dict:
        """What happened since start (for metrics): publishes, frames delivered, topics refused by reason."""
        return {"publishes": self.publishes, "delivered": self.delivered, "refused": dict(self.refused)}


class YjsProtocol(SignalingServerProtocol):
    """One y-webrtc client (see the module's docstring)."""

    wire = "yjs"
    id_prefix = "yjs/"
    resumable = False  # y-webrtc reconnects and subscribes again by itself

    _log = Logger()
    access: Optional[TopicAccess] = None  # what its access token allows (None: every topic)
    _invalid = 0  # invalid frames, less one for each valid one since

    def _identity(self, request, claims):
        # no ids on this wire: a fresh one at open (onOpen); the token's topics restrict it
        self.access = TopicAccess.from_claims(claims)
        return None, None

    def onOpen(self):
        self._fixed_id = self.id_prefix + self.factory.new_id()
        super().onOpen()

    def _greeting(self, peer_id: str, resumed: bool):
        return None  # (y-webrtc expects nothing on open)

    def _handle(self, payload, isBinary):
        # (bin/server.js reads binary frames as JSON too)
        try:
            message = parse(payload)
        except InvalidFrame as e:
            self._invalid_frame(e.code, e.text if not isBinary else f"{e.text} ({BINARY_FRAME})", e.ref)
            return
        if self._invalid:
            self._invalid -= 1
        kind = message["type"]
        if kind == "ping":
            self._enqueue(self.send, PONG)  # (after what earlier frames do: a publish through Redis)
        elif kind == "publish":
            self._enqueue(self._publish, message["topic"], frame_with_clients(payload, message), len(payload))
        else:
            self._enqueue(getattr(self, "_" + kind), message.get("topics", []))

    def _invalid_frame(self, code: str, text: str, ref: Optional[str]) -> None:
        self._error(code, text, ref)
        if code == "unknown-type":
            return  # (perhaps a newer client's: answered, not held against it)
        self._invalid += 1
        if self._invalid >= INVALID_FRAMES_LIMIT:
            self._log.warn("peer {peer} ({ip}) closed: {count} invalid frames", peer=self.peer_id, ip=self.ip,
                           count=self._invalid)
            self._fail(CLOSE_POLICY_VIOLATION, "too many invalid messages", logged=True)

    def _subscribe(self, names):
        if self.peer_id is None:
            return None  # (it closed meanwhile)
        rooms = self.factory.yjs
        # no more names looked at than a connection may have topics (a long
        # list would cost the server time for nothing)
        cap = rooms.topics.max_per_subscriber
        beyond = max(0, len(names) - cap)
        change, done = rooms.subscribe(self, names[:cap])
        reasons = Counter(reason for _, reason in change.refused)
        if beyond:
            reasons[TOO_MANY_HERE] += beyond
            rooms.refused[TOO_MANY_HERE] += beyond
        for reason, count in reasons.items():
            self._error(reason, f"{REASONS[reason]} ({count} of the topics refused)", "subscribe")
        return done

    def _unsubscribe(self, names):
        if self.peer_id is None:
            return None
        rooms = self.factory.yjs
        return rooms.unsubscribe(self, names[:rooms.topics.max_per_subscriber])[1]

    def _publish(self, topic: str, head: bytes, size: int):
        if self.peer_id is None:
            return None
        if self.access is not None and not self.access.allows(topic):
            self._error("topic-not-allowed", REASONS["topic-not-allowed"], "publish")
            return None
        clients = self.factory.yjs.publish(topic, head)
        if is_deferred(clients):
            return clients.addCallback(self._published, size)
        return self._published(clients, size)

    def _published(self, clients: int, size: int) -> None:
        if self.factory.settings.log_relays:
            self._log.info("publish from {peer} to {clients} subscribers ({size} bytes)",
                           peer=self.peer_id, clients=clients, size=size)

    def leave_now(self, code: int):
        self.factory.yjs.leave(self)
        return super().leave_now(code)

    def onClose(self, wasClean, code, reason):
        self.factory.yjs.leave(self)
        super().onClose(wasClean, code, reason)


def install(factory, max_per_connection: int = 64, max_topics: int = 20000, path: str = PATH) -> YjsRooms:
    """Serve y-webrtc's protocol at ``path`` of ``factory``; returns its rooms (also ``factory.yjs``)."""
    factory.yjs = YjsRooms(factory, max_per_connection, max_topics)
    factory.serve(path, YjsProtocol)
    return factory.yjs
