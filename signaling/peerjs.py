"""
PeerJS's wire protocol, as rules with no network code: what the ``peerjs``
npm client (1.5) expects of a server, as PeerJS server 1.0 speaks it
(``docs/peerjs.rst``).  The clock is injected; nothing here imports
Autobahn or touches a socket (:mod:`signaling.peerjs_protocol` does).

Wire::

    GET /<key>/id                          a fresh id, as text (CORS)
    WebSocket /peerjs?key=K&id=I&token=T&version=V
    server -> client, admitted             {"type": "OPEN"}
                      id held, other T     {"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}}   (closed)
                      K is not the key     {"type": "INVALID-KEY", "payload": {"msg": ...}}          (closed)
                      a malformed message  {"type": "ERROR", "payload": {"msg": ...}}
    client -> server  {"type": "HEARTBEAT"}                       (no reply; it is liveness)
                      {"type": T, "dst": D, "payload": P}         T in OFFER ANSWER CANDIDATE LEAVE
    server -> D       {"type": T, "src": S, "dst": D, "payload": P}   (S: the sender's id, stamped)
    server -> S       {"type": "EXPIRE", "src": D, "dst": S}     (D did not connect in time)

An OFFER, ANSWER or CANDIDATE for an id that is not connected waits for it
(:class:`Pending`): flushed in order when it connects, or, after the expire
timeout, dropped with one EXPIRE to each sender (LEAVE is never held).
"""

import hashlib
import re
from collections import deque
from typing import Any, Callable, Deque, Dict, List, NamedTuple, Optional

from signaling.errors import InvalidJSON, InvalidMessage, SignalingError, UnknownType
from signaling.messages import encode, loads

# -- ids and tokens -------------------------------------------------------------------

#: a PeerJS id (the client's own rule, ``validateId``): letters and digits,
#: with single ``-``, ``_`` or spaces inside
ID = re.compile(r"[A-Za-z0-9]+(?:[ _-][A-Za-z0-9]+)*")
#: the longest id accepted (PeerJS sets none; uuid4 ids from GET /<key>/id have 36)
MAX_ID = 128
#: the longest client token accepted (the client's own is ~11 characters of base 36)
MAX_TOKEN = 256


def valid_id(text: Any) -> bool:
    """Whether ``text`` is an id PeerJS clients accept (and may connect with)."""
    return isinstance(text, str) and 0 < len(text) <= MAX_ID and ID.fullmatch(text) is not None


def valid_token(text: Any) -> bool:
    """Whether ``text`` may be a client's token (its per-client secret: anything short, non-empty)."""
    return isinstance(text, str) and 0 < len(text) <= MAX_TOKEN


def token_digest(token: str) -> bytes:
    """What is kept of a client's token, to compare (in constant time) when the same id comes back."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


# -- client messages --------------------------------------------------------------------

HEARTBEAT = "HEARTBEAT"
OFFER, ANSWER, CANDIDATE, LEAVE = "OFFER", "ANSWER", "CANDIDATE", "LEAVE"
#: what clients send to another peer (``dst``), relayed with ``src`` stamped
RELAYED = frozenset([OFFER, ANSWER, CANDIDATE, LEAVE])
#: what is held for an id that is not connected yet (PeerJS drops a LEAVE for one)
HELD = frozenset([OFFER, ANSWER, CANDIDATE])
#: every type a client may send
CLIENT_TYPES = RELAYED | {HEARTBEAT}

#: the native relay type each PeerJS type counts as in the relay metrics (same meaning)
NATIVE_TYPE = {OFFER: "offer", ANSWER: "answer", CANDIDATE: "ice-candidate", LEAVE: "disconnect"}


class Message(NamedTuple):
    """A valid client message: ``dst`` is None for HEARTBEAT (and a LEAVE without one)."""

    type: str
    dst: Optional[str]
    payload: Any


_message = tuple.__new__  # Message(...) without its Python-level __new__ (the hot path)

#: what the server answers for input it cannot use (the ERROR's ``msg``)
BINARY_FRAME = "binary frames are not accepted; PeerJS messages are JSON text"
NOT_AN_OBJECT = "a message must be a JSON object"
NO_TYPE = 'a message needs a "type" string'
NO_DST = 'a message of this type needs a "dst" string (the id of the peer it is for)'
BAD_PAYLOAD = '"payload" must be JSON'


def parse(payload: bytes) -> Message:
    """
    Parse one text frame from a client (UTF-8, already checked by the
    WebSocket layer).

    :raises SignalingError: ``InvalidJSON``, ``InvalidMessage`` or
        ``UnknownType`` (their ``code`` is the error code counted in the
        metrics; ``ref`` the offending type, if one could be read).
    """
    try:
        obj = loads(payload)
    except (ValueError, RecursionError) as e:
        raise _ref(InvalidJSON(f"not valid JSON: {str(e)[:80]}"), None) from None
    if not isinstance(obj, dict):
        raise _ref(InvalidMessage(NOT_AN_OBJECT), None)
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise _ref(InvalidMessage(NO_TYPE), None)
    if kind not in CLIENT_TYPES:
        raise _ref(UnknownType(f"unknown message type (one of {', '.join(sorted(CLIENT_TYPES))})"), kind)
    if kind == HEARTBEAT:
        return Message(kind, None, None)
    dst = obj.get("dst")
    if dst is None and kind == LEAVE:
        return Message(kind, None, None)  # (a client leaving the server: its socket's close says so)
    if not isinstance(dst, str) or not dst:
        raise _ref(InvalidMessage(NO_DST), kind)
    return _message(Message, (kind, dst, obj.get("payload")))


def _ref(error: SignalingError, ref: Optional[str]) -> SignalingError:
    error.ref = ref
    return error


# -- server messages ---------------------------------------------------------------------

OPEN = encode({"type": "OPEN"})
ID_TAKEN = encode({"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}})
INVALID_KEY = encode({"type": "INVALID-KEY", "payload": {"msg": "Invalid key provided"}})
#: PeerJS server's words for a handshake without its parameters
NO_PARAMETERS = "No id, token, or key supplied to websocket server"


def error(text: str) -> bytes:
    """An ERROR (the client reports it as a server error and disconnects)."""
    return encode({"type": "ERROR", "payload": {"msg": text}})


def relay(kind: str, src: str, dst: str, payload: Any) -> bytes:
    """What ``dst`` receives: the message with its sender's id stamped as ``src``."""
    if payload is None:
        return encode({"type": kind, "src": src, "dst": dst})
    return encode({"type": kind, "src": src, "dst": dst, "payload": payload})


def expire(src: str, dst: str) -> bytes:
    """What a sender (``dst``) receives when ``src`` did not connect in time for its messages."""
    return encode({"type": "EXPIRE", "src": src, "dst": dst})


# -- messages for ids that are not connected (yet) ----------------------------------------------

#: the bounds of :class:`Pending` by default: messages per destination, per
#: sender and in total; bytes per sender and in total; destinations at once
PER_DESTINATION = 64
PER_SENDER = 256
TOTAL = 10000
SENDER_BYTES = 1024 * 1024
TOTAL_BYTES = 32 * 1024 * 1024
DESTINATIONS = 2000


class Held:
    """One message waiting for its destination."""

    __slots__ = ("sender", "kind", "frame", "size")

    def __init__(self, sender: str, kind: str, frame: bytes, size: int):
        self.sender = sender
        self.kind = kind
        self.frame = frame
        self.size = size  # of the message as received (the relay metrics)


class _Queue:
    __slots__ = ("items", "timer")

    def __init__(self, timer):
        self.items: Deque[Held] = deque()
        self.timer = timer


class Pending:
    """
    Messages for ids that are not connected (yet), held as PeerJS server
    holds them: a destination's queue lives ``timeout`` seconds from its
    first message (later ones join it and expire with it); then it is
    dropped and ``expire(destination, senders)`` is called, with each
    sender that had a message in it once, in order.  The caller takes the
    messages out in order (:meth:`first`, :meth:`delivered`) when the
    destination connects.

    Bounded: at most ``per_destination`` messages for one id,
    ``per_sender`` messages and ``sender_bytes`` bytes from one sender,
    ``total`` messages and ``total_bytes`` bytes in all, and
    ``destinations`` ids at once.  :meth:`hold` refuses past them (the
    caller answers the sender EXPIRE at once).

    :param clock: ``callLater``.
    """

    def __init__(self, clock, timeout: float, expire: Callable[[str, List[str]], object],
                 per_destination: int = PER_DESTINATION, per_sender: int = PER_SENDER, total: int = TOTAL,
                 sender_bytes: int = SENDER_BYTES, total_bytes: int = TOTAL_BYTES,
                 destinations: int = DESTINATIONS):
        self._clock = clock
        self.timeout = timeout
        self._expire = expire
        self.per_destination = per_destination
        self.per_sender = per_sender
        self.total = total
        self.sender_bytes = sender_bytes
        self.total_bytes = total_bytes
        self.destinations_max = destinations
        self._queues: Dict[str, _Queue] = {}
        self._by_sender: Dict[str, List[int]] = {}  # sender -> [messages, bytes] held from it
        self.count = 0  # messages held in all
        self.bytes = 0  # their frames' bytes

    def __contains__(self, to) -> bool:
        return to in self._queues

    def __len__(self) -> int:
        return self.count

    def destinations(self) -> List[str]:
        """The ids messages wait for, oldest queue first."""
        return list(self._queues)

    def hold(self, sender: str, to: str, kind: str, frame: bytes, size: int = 0) -> Optional[str]:
        """
        Keep ``frame`` (from ``sender``) for ``to``: None if held, else the
        bound that refused it (``"destination"``, ``"sender"``, ``"total"``).
        """
        queue = self._queues.get(to)
        own = self._by_sender.get(sender, (0, 0))
        if queue is not None and len(queue.items) >= self.per_destination:
            return "destination"
        if own[0] >= self.per_sender or own[1] + len(frame) > self.sender_bytes:
            return "sender"
        if (
            self.count >= self.total or self.bytes + len(frame) > self.total_bytes
            or (queue is None and len(self._queues) >= self.destinations_max)
        ):
            return "total"
        if queue is None:
            queue = self._queues[to] = _Queue(self._clock.callLater(self.timeout, self._expired, to))
        queue.items.append(Held(sender, kind, frame, size))
        counts = self._by_sender.setdefault(sender, [0, 0])
        counts[0] += 1
        counts[1] += len(frame)
        self.count += 1
        self.bytes += len(frame)
        return None

    def first(self, to: str) -> Optional[Held]:
        """The oldest message waiting for ``to``, or None."""
        queue = self._queues.get(to)
        return queue.items[0] if queue is not None else None

    def delivered(self, to: str, held: Held) -> bool:
        """
        ``held`` (taken with :meth:`first`) was delivered: forget it, if it
        is still first in line (its queue may have expired meanwhile);
        return whether it was.
        """
        queue = self._queues.get(to)
        if queue is None or not queue.items or queue.items[0] is not held:
            return False
        queue.items.popleft()
        self._forget(held)
        if not queue.items:
            del self._queues[to]
            if queue.timer.active():
                queue.timer.cancel()
        return True

    def _forget(self, held: Held) -> None:
        self.count -= 1
        self.bytes -= len(held.frame)
        counts = self._by_sender[held.sender]
        counts[0] -= 1
        counts[1] -= len(held.frame)
        if not counts[0]:
            del self._by_sender[held.sender]

    def _expired(self, to: str) -> None:
        queue = self._queues.pop(to, None)
        if queue is None:
            return
        senders: Dict[str, None] = {}
        for held in queue.items:
            self._forget(held)
            senders.setdefault(held.sender)
        self._expire(to, list(senders))
