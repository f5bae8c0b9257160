"""
The WebSocket side: an Autobahn protocol per browser peer, and the factory
that owns the peer registry and the live connections.

Wire contract (full text: ``docs/protocol.rst``)::

    server -> client on open  {"type": "welcome", "id": "<uuid4>"}
    client -> server          {"type": T, "to": "<peer id>", "data": {...}}
                              T in ping pong offer answer ice-candidate disconnect
    server -> target          {"type": T, "from": "<sender id>", "data": <as sent>}
    server -> sender on error {"type": "error", "code": C, "message": "...", "ref": T|null}
    partner of a gone user    {"type": "disconnect", "from": "<gone id>",
                               "data": {"reason": "peer_left"}}

The pairing rules live in :mod:`signaling.registry`; this module parses,
validates, asks the registry, relays, replies with errors and logs.
Registry operations may answer with a ``Deferred`` (see
:class:`~signaling.registry.IRegistry`): the operations of one connection are
then run one after another, in the order their frames arrived.
"""

import itertools
import os
import random
from collections import Counter, deque
from time import perf_counter
from typing import Any, Dict, Optional, Set

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from signaling import _compat, messages
from signaling._tcp import unsent_bytes, write
from signaling.admission import Refused, authorize, client_address, host_of, is_trusted_proxy, request_token
from signaling.errors import (
    BINARY_FRAME,
    NOT_DELIVERED,
    QUEUE_FULL,
    QUEUE_IS_FULL,
    SERVER_FAULT,
    PeerIdTaken,
    SignalingError,
    refusal,
)
from signaling.fastpath import FastPath
from signaling.frameguard import CLOSE_POLICY_VIOLATION, CLOSE_TOO_BIG, FrameGuard, HeldConnections
from signaling.framing import text_frame
from signaling.limits import ConnectionCounts, LogBudget, TokenBucket, address_key
from signaling.metrics import Counts, close_reason
from signaling.registry import CONNECTED, IClusterRegistry, ILocalPeers
from signaling.results import is_deferred, then
from signaling.safetext import SafeLogger, safe, txaio_off
from signaling.sessions import MOVED, NEW, RESUMED, ISessions, LocalSessions
from signaling.settings import Settings
from signaling.timers import SlotTimer
from signaling.tokens import make_resume_token, verify_resume_token
from signaling.turn import NO_ICE_SERVERS
from signaling.writes import WriteBatch

__all__ = ["SignalingServerProtocol", "SignalingFactory", "CLOSE_POLICY_VIOLATION", "CLOSE_TOO_BIG"]

#: close code sent to every peer when the server shuts down
CLOSE_GOING_AWAY = 1001
#: close code for a peer that could not be registered (the cluster's state is unreachable)
CLOSE_TRY_AGAIN_LATER = 1013
#: close code for the holder of a fixed peer id when a newer connection with that id arrives
CLOSE_REPLACED = 4409


# which registry operation checks each message type
_OPERATIONS = {
    "ping": "ping",
    "pong": "pong",
    "offer": "check_paired",
    "answer": "check_paired",
    "ice-candidate": "check_paired",
    "disconnect": "disconnect",
}
#: the message types relayed between partners only (what a link lets through)
_CHECKED = frozenset(t for t, operation in _OPERATIONS.items() if operation == "check_paired")


class SignalingServerProtocol(FastPath, FrameGuard, WebSocketServerProtocol):  # type: ignore[misc]  # (Autobahn's)
    """
    One browser peer, speaking the native protocol.

    Other wire formats (PeerJS at ``/peerjs``, y-webrtc at ``/yjs``) are
    subclasses that the factory maps to a path (:meth:`SignalingFactory.serve`):
    the handshake's path picks the class in :meth:`onConnect`, before anything
    else about the connection is decided.  A subclass names its format
    (:attr:`wire`), keeps its ids apart (:attr:`id_prefix`: every id it
    registers starts with it; native ids never contain ``/``), and overrides
    the wire-facing hooks: :meth:`_identity` (the id and resume token a
    handshake asks for), :meth:`_greeting`, :meth:`_admitted`, :meth:`_join_failed`,
    :meth:`_handle` and :meth:`_error_frame`.  Admission, limits, the outbound cap, delivery (here or
    through the cluster), metrics and logs are the same for every format.
    """

    #: the wire format this class speaks (stats, metrics and logs name it)
    wire = "native"
    #: what every id this format registers starts with ("" for native ids, which never contain "/")
    id_prefix = ""
    #: whether a lost socket gets a grace period (resume); a format whose clients reconnect afresh says no
    resumable = True

    _log = Logger()  # Autobahn owns ``self.log``
    #: Autobahn's own log lines for this protocol, with client-controlled values made safe
    log = SafeLogger(WebSocketServerProtocol.log, off=txaio_off())

    transport: Any  # a connected TCP or TLS transport
    peer_id: Optional[str] = None
    ip: str = "?"
    _counted = False  # in the factory's connection counts
    _key: Optional[str] = None  # the per-address key it is counted under
    _fixed_id: Optional[str] = None
    _replaces = None  # the older connection holding our fixed id, which we take over
    conn_id = ""  # names this connection in the registry (see IRegistry.remove)
    _resume_id: Optional[str] = None  # the id a valid resume token asks back
    _welcomed = False  # its session has begun (a lost socket then puts it in grace)
    _dropped_for: Optional[str] = None  # why this server dropped its socket, if it did (metrics)
    _read_at = 0.0  # perf_counter() at its last read
    _reserving = False  # holds the reservation of its fixed id (until it has joined or closed)
    _errors = None  # LogBudget of this peer's error lines, made at its first error
    # the connection of this peer's partner while both are on this process
    # and known paired: their relays need no registry, nor Redis (see _link)
    _partner: Optional["SignalingServerProtocol"] = None
    _unlinks = 0  # how many times a link of this connection was dropped (see _link)

    def _connectionMade(self):
        _compat.connection_made_quietly(self, WebSocketServerProtocol)
        # Counted from the first byte, before the handshake is even read.
        refused = self.factory.accept(self)
        if refused is not None:
            self._refuse(*refused)

    def onConnect(self, request):
        """Admit or refuse the WebSocket handshake (HTTP status and reason on refusal)."""
        factory = self.factory
        wire = factory.wire_formats.get(request.path)
        if wire is not None and not isinstance(self, wire):
            # another wire format on this path: this connection is one of its
            # protocols from now on (a subclass: same state, other hooks)
            self.__class__ = factory.concrete(wire)
            factory.opened_by_wire[wire.wire] += 1  # (less in connectionLost: metrics)
            return self.onConnect(request)
        settings = factory.settings
        if self._key is None:  # through a trusted proxy: count the client it forwards for
            self.ip = client_address(self.ip, request.headers.get("x-forwarded-for"), settings.trusted_proxies)
            if not factory.count_address(self):
                self._deny(429, "too many connections from your address")
        if factory.shutting_down:
            self._deny(503, "server shutting down")
        unready = factory.unready()
        if unready is not None:
            self._deny(503, unready)
        try:
            claims = authorize(settings, request.origin, self._access_token(request), factory.clock.seconds())
        except Refused as e:
            self._deny(e.status, e.reason)
        fixed, resume = self._identity(request, claims)
        self._resume_id = resume
        if fixed is not None:
            if fixed in factory.reserved:  # another handshake with that id is under way
                self._deny(409, "that peer id is already connecting")
            if resume is None:  # (resuming keeps the older connection's session instead)
                self._replaces = factory.connections.get(fixed)
            self._fixed_id = fixed
            self._reserving = True
            factory.reserved.add(fixed)
        return None

    def _access_token(self, request) -> Optional[str]:
        """The access token a handshake presents (``?token=``, or ``Authorization: Bearer``)."""
        return request_token((request.params.get("token") or [None])[0], request.headers.get("authorization"))

    def _identity(self, request, claims):
        """
        ``(fixed id, resume id)`` for an admitted handshake: the id its access
        token fixes (``sub``), and the id its resume token asks back, if
        valid; either may be None.  (Other wire formats take their ids
        from elsewhere, starting with their :attr:`id_prefix`.)
        """
        fixed = claims.get("sub") if claims is not None else None
        resume = self.factory.resume_id((request.params.get("resume") or [None])[0])
        if fixed is not None and resume is not None and resume != fixed:
            resume = None  # a token for another id than the access token fixes: not resumed
        return fixed, resume

    def dataReceived(self, data):
        self._read_at = perf_counter()  # (the relays it brings are timed from here: metrics)
        if self._discard:
            return
        if self._held is not None:  # (a TLS layer may hand over what it had already decrypted)
            self._held += data
            return
        state = self.state
        if state == _compat.STATE_OPEN:
            self._budget = self.factory.settings.frames_per_turn
            if self.fast_path and _compat.between_frames(self):
                data = self._fast_frames(data)
                if not data:
                    return
                if self._budget <= 0:
                    self._hold(data)
                    return
        elif state == _compat.STATE_CONNECTING:
            head = _compat.buffered(self)
            if len(head) + len(data) > self.factory.settings.max_handshake and self._handshake_too_big(head + data):
                return
        WebSocketServerProtocol.dataReceived(self, data)

    def _handshake_too_big(self, head: bytes) -> bool:
        """
        Refuse (414, or 431) and return True if the handshake does not end
        within ``max_handshake`` bytes (what follows a complete one is the
        peer's first frames, and fine).
        """
        limit = self.factory.settings.max_handshake
        if head.find(b"\r\n\r\n", 0, limit + 4) >= 0:
            return False
        if head.find(b"\r\n", 0, limit) < 0:
            self._refuse(414, "request line too long")
        else:
            self._refuse(431, "request headers too large")
        return True

    def _refuse(self, status: int, reason: str) -> None:
        """Refuse the opening handshake with an HTTP status, reading nothing more."""
        self.factory.note_refusal(self.ip, status, reason)
        self._discard = True
        self.failHandshake(reason, status)

    def _deny(self, status: int, reason: str):
        self.factory.note_refusal(self.ip, status, reason)
        raise ConnectionDeny(status, reason)

    def failHandshake(self, reason, code=400, responseHeaders=None):
        # Autobahn words some reasons with what the client sent, and puts the
        # reason in the status line: keep both short and harmless.
        WebSocketServerProtocol.failHandshake(self, safe(reason), code, responseHeaders)

    # -- a peer's life ----------------------------------------------------------

    def onOpen(self):
        factory = self.factory
        self.peer_id = self._resume_id or self._fixed_id or factory.new_id()
        self.conn_id = factory.new_conn_id()
        self.connected_at = factory.clock.seconds()
        self.closed = Deferred()
        self._bucket = TokenBucket(
            factory.clock, factory.settings.rate, factory.settings.burst
        )
        self._strikes = 0
        self._busy = False
        self._queue = None  # made when an operation has to wait
        _compat.drop_handshake_state(self)
        _compat.spread_first_ping(self, factory.ping_phase())
        if self._replaces is not None:
            older, self._replaces = self._replaces, None
            self._enqueue(factory.take_over, older)
        self._enqueue(self._resume_session if self._resume_id is not None else self._join)

    def _handle(self, payload, isBinary):
        """Parse one message that passed the rate limit, and queue its operation."""
        if isBinary:
            self._error("invalid-message", BINARY_FRAME, None)
            return
        try:
            message = messages.parse(payload)
        except SignalingError as e:
            self._error(e.code, e.message, e.ref)
            return
        if not self._busy and message.type in _CHECKED:
            # the commonest messages: an offer, answer or candidate with
            # nothing of this peer's still pending, relayed now, as
            # _process would
            partner = self._partner
            if partner is not None and partner.peer_id == message.to and partner.state == _compat.STATE_OPEN:
                # to the partner it is linked with (see _link)
                sender = self.peer_id
                delivered = partner.send(messages.encode(messages.relay(message.type, sender, message.data)))
                self._relayed(delivered, message, sender, len(payload), self._read_at)
                return
            factory = self.factory
            if factory.cluster is not None and message.to not in factory.connections and "/" not in message.to:
                # to a peer on another node (see _relay_across)
                self._relay_across(message, len(payload), self._read_at)
                return
        self._enqueue(self._process, message, len(payload))

    def connectionLost(self, reason=connectionDone):
        WebSocketServerProtocol.connectionLost(self, reason)
        if self.wire != "native":
            self.factory.opened_by_wire[self.wire] -= 1
        self.factory.release(self)
        _compat.forget_closed_deferred(self)  # (nothing waits on it here)

    def onClose(self, wasClean, code, reason):
        if self._errors is not None:
            self._errors.close()
        self._unlink()
        if self._welcomed:
            self.factory.metrics.disconnect(self._disconnect_reason())
        if self.peer_id is None or not hasattr(self, "closed"):
            return  # the opening handshake never completed
        peer_id = self.peer_id
        self.peer_id = None
        if self._lost_may_resume():
            # (at once, not after the operations it has pending: what is sent
            # to it from now on must be kept for it, not written to a dead socket)
            self.factory.suspend(self, peer_id, code)
        else:
            self._enqueue(self.factory.leave, self, peer_id, wasClean, code)

    def _lost_may_resume(self) -> bool:
        """
        Whether this closed session may be resumed: it was welcomed, resume
        is on, and its socket was lost without a close frame from it (a
        reset, a timeout, a network change, this server going away).  A
        peer that closed, or broke the protocol, ends its session at once.
        (SignalingFactory.suspend may still refuse it a grace period: caps.)
        """
        return (
            self._welcomed and self.resumable and self.factory.settings.resume_grace > 0
            and not _compat.closed_by_peer(self) and not _compat.failed_by_us(self)
        )

    def _disconnect_reason(self) -> str:
        """Why this welcomed peer's WebSocket ended (``signaling.metrics.DISCONNECT_REASONS``)."""
        if self._dropped_for is not None:
            return self._dropped_for
        if _compat.closed_by_peer(self):
            return "closed"
        if _compat.failed_by_us(self) or _compat.closed_by_us(self):
            return close_reason(_compat.local_close_code(self))
        return "lost"

    def leave_now(self, code: int):
        """
        End this peer's session now, not when its socket is finally gone
        (its partners get ``peer_left``, its id is free); fires when done.
        """
        peer_id = self.peer_id
        if peer_id is None or not hasattr(self, "closed"):
            return None  # not open, or gone already
        self.peer_id = None  # so that its close removes nothing more
        done: Deferred = Deferred()

        def left(result):
            done.callback(None)
            return result

        self.closed.addBoth(left)
        self._enqueue(self.factory.leave, self, peer_id, False, code)
        return done

    # -- sending ------------------------------------------------------------

    def send(self, payload: bytes) -> bool:
        """
        Send one JSON text frame if the socket is open; return whether it was
        sent.  A peer that lets more than ``max_outbound`` bytes pile up
        unread is dropped (and the frame counts as not sent).
        """
        if self.state != _compat.STATE_OPEN:
            return False
        if self.fast_path and _compat.sending_idle(self):
            frame = text_frame(payload)
            if self.factory.writes.hold(self, frame):
                return True  # written at the end of this reactor turn
            if write(self.transport, frame):
                return True  # all taken by the socket: nothing waits
        else:
            self.sendMessage(payload, isBinary=False)
        return not self._over_outbound()

    def write_held(self, data: bytes) -> None:
        """Write frames held for this peer by the factory's WriteBatch."""
        if not write(self.transport, data):
            self._over_outbound()

    def sendData(self, data, sync=False, chopsize=None):
        # Everything Autobahn writes (close frames, pongs) comes through
        # here: frames held for this peer go first, so that the order on the
        # wire is the order of sending.  Written as Autobahn would (it
        # queues only for sync or a chopsize, which this server never asks
        # for), but tried on the socket at once: a keepalive ping, the
        # handshake's answer or a close frame then needs no register-for-
        # writable round trip through the reactor either.
        self.factory.writes.release(self)
        if sync or chopsize or self.send_queue:
            WebSocketServerProtocol.sendData(self, data, sync, chopsize)
        else:
            write(self.transport, data)

    def _over_outbound(self) -> bool:
        """
        Drop the peer if more than ``max_outbound`` bytes wait unsent (it is
        not reading); return whether it was dropped.
        """
        unsent = unsent_bytes(self.transport)
        if unsent > self.factory.settings.max_outbound:
            self._log.warn(
                "peer {peer} ({ip}) dropped: not reading, {unsent} bytes unsent",
                peer=self.peer_id,
                ip=self.ip,
                unsent=unsent,
            )
            self._dropped_for = "not_reading"
            self.dropConnection(abort=True)
            return True
        return False

    def close(self, code: int, reason: str) -> None:
        """
        Start the closing handshake with any valid close code.  (Autobahn's
        ``sendClose`` only lets applications send 1000 and 3000-4999; 1001
        and 1008 are the right codes for a server going away and for a
        policy violation.)
        """
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    def _error(self, code: str, text: str, ref: Optional[str]) -> None:
        """
        Answer the sender with an error.  ``ref`` may be what the client sent
        as its type: it is echoed and logged made safe.  At most a few lines
        per peer per interval are logged; the rest are counted and reported
        in one line (a flood cannot fill the disk).
        """
        self.factory.metrics.error(code)
        if ref is not None and ref not in messages.CLIENT_TYPES:
            ref = safe(ref)
        budget = self._errors
        if budget is None:
            peer = self.peer_id  # (still known when the held lines are reported after it left)
            budget = self._errors = LogBudget(
                self.factory.clock, lambda summary: self._errors_held(peer, summary), lines=3
            )
        if budget.allow(code):
            self._log.info(
                "error {code} to {peer}: {text} (ref {ref})",
                code=code,
                peer=self.peer_id,
                text=text,
                ref=ref,
            )
        self.send(self._error_frame(code, text, ref))

    def _error_frame(self, code: str, text: str, ref: Optional[str]) -> bytes:
        """The frame that tells the sender of an error (another wire format words it its own way)."""
        if code == "rate-limited":
            return self.factory.rate_limited_frame
        return messages.encode(messages.error(code, text, ref))

    def _errors_held(self, peer: Optional[str], summary: str) -> None:
        self._log.info(
            "errors to {peer} ({ip}) not logged in the last {interval}s: {summary}",
            peer=peer, ip=self.ip, interval=getattr(self._errors, "interval", None), summary=summary,
        )

    # -- operations, run in arrival order -----------------------------------

    def _enqueue(self, operation, *args) -> None:
        """
        Run ``operation(*args)`` (returning a value or a ``Deferred``) now,
        or after the operations of this connection still in flight.
        """
        if self._busy:
            if self._queue is None:
                self._queue = deque()
            self._queue.append((operation, args))
            return
        self._busy = True
        self._run(operation, args)

    def _run(self, operation, args) -> None:
        while True:
            try:
                result = operation(*args)
            except Exception:
                self._log.failure("operation failed for peer {peer}", peer=self.peer_id)
                result = None
            if is_deferred(result):
                self._waited(result)
                return
            if not self._queue:
                self._busy = False
                return
            operation, args = self._queue.popleft()

    def _waited(self, result: Deferred) -> None:
        """The operation running (``_busy``) answered ``result``: the next one runs when it fires."""
        result.addErrback(
            lambda f: self._log.failure(
                "operation failed for peer {peer}", f, peer=self.peer_id
            )
        )
        result.addCallback(lambda _: self._next())

    def _next(self) -> None:
        if self._queue:
            self._run(*self._queue.popleft())
        else:
            self._busy = False

    def _join(self):
        try:
            result = self.factory.join(self)
        except (SignalingError, PeerIdTaken):  # (from a registry that answers at once)
            return self._join_failed(Failure())
        if is_deferred(result):
            return result.addCallbacks(self._welcome, self._join_failed)
        return self._welcome(result)

    def _join_failed(self, failure):
        self.factory.unreserve(self)
        if failure.check(SignalingError):
            # The shared registry is unreachable: a peer that others cannot
            # reach is never welcomed.  Closing removes it (if the add went
            # through after all) like any other departure.
            self._log.warn("peer {peer} refused: {why}", peer=self.peer_id, why=failure.value.message)
            self.close(CLOSE_TRY_AGAIN_LATER, "cluster state unavailable; try again")
            return None
        if not failure.check(PeerIdTaken):
            self._log.failure("registering peer {peer} failed", failure, peer=self.peer_id)
            self.close(1011, "internal error")
            return None
        self._log.warn("peer {peer} refused: id already connected elsewhere", peer=self.peer_id)
        # never registered: forget it here so that closing removes nothing
        # (the id belongs to a peer elsewhere in the cluster)
        if self.factory.connections.get(self.peer_id) is self:
            del self.factory.connections[self.peer_id]
        self.peer_id = None
        self.close(CLOSE_POLICY_VIOLATION, "peer id already connected")
        return None

    def _resume_session(self):
        """
        Take back the session a resume token names: in its grace period (its
        queued messages follow the welcome, in order), still held by an older
        connection (which this one replaces), or, if it is gone, the same id
        afresh if it is free.  Otherwise a fresh id, as without a token.
        """
        result = self.factory.resume(self)
        if is_deferred(result):
            return result.addCallbacks(self._resumed, self._join_failed)
        return self._resumed(result)

    def _resumed(self, outcome):
        if self.peer_id is None:
            return None  # it closed meanwhile (its close ends what it took back)
        if outcome is None:  # the id is someone else's now: a fresh one
            self._log.info("peer {peer}'s resume token names a taken id: a fresh id", peer=self.peer_id)
            self.factory.unreserve(self)
            self.peer_id = self.factory.new_id()
            return self._join()
        resumed, queued = outcome
        self._welcome(None, resumed)
        for payload in queued:
            self.send(payload)
        return None

    def _welcome(self, _, resumed: bool = False):
        factory = self.factory
        factory.unreserve(self)
        if factory.shutting_down:
            self.close(CLOSE_GOING_AWAY, "server shutting down")
            return
        peer_id = self.peer_id
        if peer_id is None:
            return  # it closed meanwhile
        self._welcomed = True
        greeting = self._greeting(peer_id, resumed)
        if greeting is not None:
            self.send(greeting)
        factory.metrics.connects += 1
        self._admitted(peer_id)

    def _admitted(self, peer_id: str) -> None:
        """After the greeting: what another wire format does once a peer is in (the native one: nothing)."""

    def _greeting(self, peer_id: str, resumed: bool) -> Optional[bytes]:
        """The frame that tells a newly admitted peer it is in (None: its wire format sends none)."""
        factory = self.factory
        return messages.encode(messages.welcome(
            peer_id, factory.ice_servers.for_user(peer_id), factory.resume_token(peer_id), resumed
        ))

    def _process(self, message: messages.Message, size: int):
        factory = self.factory
        if "/" in message.to:  # another wire format's id: never a native peer's
            e = refusal("no-such-peer")
            self._error(e.code, e.message, message.type)
            return None
        operation_name = _OPERATIONS[message.type]
        started = self._read_at
        link = None
        if operation_name == "check_paired":
            partner = self._partner
            if partner is not None and partner.peer_id == message.to and partner.state == _compat.STATE_OPEN:
                # both here and known paired, which only their own
                # connections can undo: no registry, no Redis (see _link)
                sender = self.peer_id
                payload = messages.encode(messages.relay(message.type, sender, message.data))
                return self._relayed(partner.send(payload), message, sender, size, started)
            if factory.cluster is not None and message.to not in factory.connections:
                self._relay_across(message, size, started)
                return None
        elif operation_name == "disconnect":
            self._unlink()  # before the registry ends the pairing: from now on relays are checked there
        if operation_name != "disconnect":
            link = self._link_state(message.to)
        operation = getattr(factory.registry, operation_name)
        sender = self.peer_id  # (the relay names it even if its socket closes before the registry answers)
        try:
            result = operation(sender, message.to)
        except SignalingError as e:
            self._error(e.code, e.message, message.type)
            return None
        if is_deferred(result):
            return result.addCallbacks(
                self._relay,
                self._refused,
                callbackArgs=(message, sender, size, started, link),
                errbackArgs=(message,),
            )
        return self._relay(result, message, sender, size, started, link)

    def _relay_across(self, message: messages.Message, size: int, started: float) -> None:
        """
        Relay to a peer elsewhere: the check and the publish in one script
        (with the other relays of this turn), not waited for: the registry
        runs this node's operations in the order they are called, so what
        this peer sends next reaches Redis after it (docs/cluster.rst).
        """
        sender = self.peer_id
        payload = messages.encode(messages.relay(message.type, sender, message.data))
        self.factory.registry.relay_across(sender, message.to, payload, self._answered, message, sender, size, started)

    def _answered(self, outcome, message: messages.Message, sender: Optional[str], size: int, started: float) -> None:
        """What the registry answered for a relay across nodes (:meth:`_relay_across`)."""
        if isinstance(outcome, Exception):
            if isinstance(outcome, SignalingError):
                self._error(outcome.code, outcome.message, message.type)
            else:  # (a fault, which the registry logged)
                self._error("internal-error", SERVER_FAULT, message.type)
            return
        self._relayed(outcome, message, sender, size, started)

    # -- links: the pairs of this process known paired, which relay without the registry --

    def _link_state(self, to: str):
        """What :meth:`_link` needs to link this connection with ``to``'s, if ``to`` is here."""
        partner = self.factory.connections.get(to)
        if partner is None:
            return None
        return partner, self._unlinks, partner._unlinks

    def _link(self, state) -> None:
        """
        After the registry answered that this peer and the one of ``state``
        are paired: relay between their connections directly from now on
        (no registry check; in a cluster, no Redis), unless either link was
        dropped since the question was asked (then the registry may already
        have ended the pairing: the next relay asks again).  A pairing of
        two peers of this process can only end by what their own
        connections do here (disconnect, close), each of which drops the
        link first (:meth:`_unlink`), by a transition a registry operation
        reports (:meth:`SignalingFactory.note_transitions` drops the links
        of peers no longer connected), or, in a cluster, by this node
        losing Redis or its registration (the registry then calls
        ``forget_links``).
        """
        partner, mine, theirs = state
        if (
            mine != self._unlinks or theirs != partner._unlinks or self.peer_id is None
            or partner.peer_id is None or partner.state != _compat.STATE_OPEN
            or self.state != _compat.STATE_OPEN
        ):
            return
        self._unlink()
        partner._unlink()
        self._partner = partner
        partner._partner = self

    def _unlink(self) -> None:
        """Relay between this connection and its partner's through the registry again (both ends)."""
        self._unlinks += 1
        partner = self._partner
        if partner is not None:
            self._partner = None
            if partner._partner is self:
                partner._partner = None
                partner._unlinks += 1

    def _refused(self, failure, message: messages.Message) -> None:
        error = failure.check(SignalingError)
        if error is None:
            self._log.failure("registry failed for peer {peer}", failure, peer=self.peer_id)
            self._error("internal-error", SERVER_FAULT, message.type)
        else:
            e = failure.value
            self._error(e.code, e.message, message.type)

    def _relay(self, transitions, message: messages.Message, sender: Optional[str], size: int, started: float,
               link=None):
        if transitions:
            self.factory.note_transitions(transitions)
        if link is not None and message.type != "ping":
            self._link(link)  # (a pong or a check that passed: the two are paired in Redis)
        payload = messages.encode(messages.relay(message.type, sender, message.data))
        delivered = self.factory.deliver(message.to, payload)
        if is_deferred(delivered):
            return delivered.addCallback(self._relayed, message, sender, size, started)
        return self._relayed(delivered, message, sender, size, started)

    def _relayed(self, delivered, message: messages.Message, sender: Optional[str], size: int,
                 started: float) -> None:
        if delivered is not True:
            if delivered == QUEUE_FULL:
                self._error("queue-full", QUEUE_IS_FULL, message.type)
            else:
                self._error("peer-not-found", NOT_DELIVERED, message.type)
            return
        # (this runs for every relay: plain additions; the latency of one
        # relay in Counts.SAMPLE is timed, which keeps the cost out of sight)
        metrics = self.factory.metrics
        metrics.relays[message.type] += 1
        metrics.relayed_bytes += size
        metrics.until_sample -= 1
        if not metrics.until_sample:
            metrics.until_sample = metrics.SAMPLE
            metrics.relay_latency.observe(perf_counter() - started)
        if self.factory.settings.log_relays:
            self._log.info(
                "relay {type} {sender} -> {to} ({size} bytes)",
                type=message.type,
                sender=sender,
                to=message.to,
                size=size,
            )


@implementer(ILocalPeers)
class SignalingFactory(WebSocketServerFactory):
    """
    Owns the peer registry and the open connections of this process.

    :param registry: an :class:`~signaling.registry.IRegistry` provider.
    :param settings: :class:`Settings`.
    :param clock: the reactor (``seconds``/``callLater``), a ``Clock`` in tests.
    :param new_id: makes peer ids (``uuid4`` strings by default).
    """

    protocol = SignalingServerProtocol
    _log = Logger()

    def __init__(self, registry, settings: Settings, clock=None, new_id=None, ice_servers=NO_ICE_SERVERS, **kwargs):
        if clock is None:
            from twisted.internet import reactor as clock
        kwargs.setdefault("server", "signaling")  # the Server header: no versions to fingerprint
        super().__init__(reactor=clock, **kwargs)
        self.registry = registry
        self.settings = settings
        self.ice_servers = ice_servers  # what each welcome carries
        self._own_secret = os.urandom(32)  # (see resume_secret)
        # the peers in grace: in the shared registry (any node may resume
        # them), else in this process
        self._local_sessions: Optional[LocalSessions] = None
        self.sessions: ISessions
        if self.cluster is not None:
            self.sessions = registry
        else:
            self.sessions = self._local_sessions = LocalSessions(
                registry, clock, settings.resume_grace, settings.resume_queue, settings.max_outbound, self._expired
            )
        # peers put in grace here within the last grace period, in total and
        # per address key: bounded as connections are (a client that drops
        # connections on purpose cannot pile up sessions)
        self.graced = ConnectionCounts(settings.max_connections, settings.max_connections_per_ip)
        self._conn_ids = itertools.count(1)
        self.metrics = Counts()  # what happened: for /metrics and /api/dashboard
        self._conn_prefix = os.urandom(3).hex()
        self.clock = clock
        self.new_id = uuid4_text if new_id is None else new_id
        self.connections: Dict[str, SignalingServerProtocol] = {}  # by id (with its format's id_prefix)
        #: handshake path -> the protocol class of another wire format served there (see serve())
        self.wire_formats: Dict[str, type] = {}
        #: wire format -> its WebSockets opening or open now (the native ones: admitted less these)
        self.opened_by_wire: Counter = Counter()
        self.shutting_down = False
        # every WebSocket connection from its first byte to its end, in total
        # and per address key (an IPv6 client by its /ipv6_prefix network)
        self.counts = ConnectionCounts(settings.max_connections, settings.max_connections_per_ip)
        self.reserved: Set[str] = set()  # fixed peer ids (from tokens) of opening connections
        self.rate_limited_text = (
            f"too many messages: at most {settings.rate:g} per second (bursts of {settings.burst}); "
            "this one was dropped"
        )
        self.rate_limited_frame = messages.encode(messages.error("rate-limited", self.rate_limited_text, None))
        self._refusals = LogBudget(clock, self._refusals_held, lines=10)
        self.held = HeldConnections(clock, settings.held_slice)  # connections with frames left for a later turn
        self.writes = WriteBatch(clock)  # frames held until the end of a reactor turn
        #: where in the second half of the keepalive interval a new peer's first ping falls (0 to 1)
        self.ping_phase = random.Random().random
        _compat.use_timer(self, SlotTimer(clock))  # keepalive and handshake deadlines, in 2 ms slots
        self.setProtocolOptions(
            maxMessagePayloadSize=settings.max_message_size,
            maxFramePayloadSize=settings.max_message_size,
            autoPingInterval=settings.ping_interval,
            autoPingTimeout=settings.ping_timeout,
            openHandshakeTimeout=settings.handshake_timeout,
            closeHandshakeTimeout=settings.close_timeout,
            webStatus=False,
            # fail with a close frame naming the reason (1009 too big,
            # 1007 bad UTF-8, 1002 protocol error), not a bare TCP drop
            failByDrop=False,
        )

    def resetProtocolOptions(self):
        super().resetProtocolOptions()
        self._concrete: Dict[type, type] = {}

    def setProtocolOptions(self, *args, **kwargs):
        super().setProtocolOptions(*args, **kwargs)
        self._concrete = {}  # (their options changed: made anew, see concrete())

    def concrete(self, cls: type) -> type:
        """
        ``cls`` (a wire format's protocol) with this factory's protocol
        options as class attributes, which its connections are made of: a
        new connection then copies none of them (``_compat.with_options``).
        """
        made = self._concrete.get(cls)
        if made is None:
            made = self._concrete[cls] = _compat.with_options(cls, self, WebSocketServerProtocol)
        return made

    def buildProtocol(self, addr):
        proto = self.concrete(self.protocol)()
        proto.factory = self
        return proto

    def serve(self, path: str, protocol) -> None:
        """
        Serve another wire format at ``path`` (``/peerjs``): ``protocol`` is
        a subclass of :class:`SignalingServerProtocol`, with its own
        :attr:`~SignalingServerProtocol.wire` and ``id_prefix``.  Every
        other path stays the native protocol.
        """
        if not (isinstance(protocol, type) and issubclass(protocol, SignalingServerProtocol)):
            raise TypeError(f"{protocol!r} is not a SignalingServerProtocol")
        if not protocol.id_prefix.endswith("/") or protocol.wire == SignalingServerProtocol.wire:
            raise ValueError(f"{protocol.__name__} needs its own wire name and an id_prefix ending in '/'")
        self.wire_formats[path] = protocol

    @property
    def registry(self):
        """The :class:`~signaling.registry.IRegistry` (setting it also sets :attr:`cluster`)."""
        return self._registry

    @registry.setter
    def registry(self, registry) -> None:
        self._registry = registry
        #: the registry if it is a cluster's (an IClusterRegistry), else None
        self.cluster = registry if IClusterRegistry.providedBy(registry) else None

    # -- admission ----------------------------------------------------------

    def unready(self) -> Optional[str]:
        """Why no peer may be admitted now (a cluster node not registered), or None."""
        registry = self.registry
        if self.cluster is None or registry.ready:
            return None
        return "cluster state unavailable ({}); try again".format(registry.health().get("redis", "not ready"))

    @property
    def admitted(self) -> int:
        """WebSocket connections counted now (opening or open)."""
        return self.counts.total

    @property
    def per_ip(self) -> dict:
        """Address key -> connections counted from it."""
        return self.counts.per_key

    def accept(self, proto: SignalingServerProtocol):
        """
        Count a new connection from its first byte, by its TCP peer's
        address (not yet, for a trusted proxy: see :meth:`count_address`);
        return ``(status, reason)`` if it is over a cap (then it is not counted).
        """
        settings = self.settings
        peer = proto.ip = host_of(proto.transport.getPeer())
        key = None if is_trusted_proxy(peer, settings.trusted_proxies) else address_key(peer, settings.ipv6_prefix)
        refused = self.counts.add(key)
        if refused == "total":
            return 503, "server full"
        if refused is not None:
            return 429, "too many connections from your address"
        proto._counted = True
        proto._key = key
        return None

    def count_address(self, proto: SignalingServerProtocol) -> bool:
        """Count a connection through a trusted proxy by the address it forwards for; False if over the cap."""
        key = address_key(proto.ip, self.settings.ipv6_prefix)
        if key is None:  # (a UNIX socket's client, forwarded for no one)
            return proto._counted
        if not proto._counted or not self.counts.add_key(key):
            return False
        proto._key = key
        return True

    def release(self, proto: SignalingServerProtocol) -> None:
        if proto._counted:
            proto._counted = False
            self.counts.remove(proto._key)
        self.unreserve(proto)

    def unreserve(self, proto: SignalingServerProtocol) -> None:
        """Let other handshakes use ``proto``'s fixed id again (it has joined, or failed)."""
        if proto._reserving:
            proto._reserving = False
            self.reserved.discard(proto._fixed_id)

    def note_refusal(self, ip: str, status: int, reason: str) -> None:
        """Count a refused handshake, and log it within a budget of lines per interval."""
        self.metrics.handshake_refusals[status] += 1
        if self._refusals.allow(str(status)):
            self._log.info("refused connection from {ip}: {status} {reason}", ip=ip, status=status, reason=reason)

    def _refusals_held(self, summary: str) -> None:
        self._log.warn(
            "refused connections not logged in the last {interval}s (by HTTP status): {summary}",
            interval=self._refusals.interval, summary=summary,
        )

    def take_over(self, older: SignalingServerProtocol):
        """
        A newer connection presented a token for the fixed id ``older``
        holds: ``older`` (perhaps a dead network nobody has noticed yet) is
        closed with 4409 and forgotten at once, so that the id is free for
        the newer one (its partners get ``peer_left``).  Fires when done.
        """
        peer_id = older.peer_id
        if peer_id is None or self.connections.get(peer_id) is not older:
            return None  # it has gone already
        self._log.info("peer {peer} replaced by a newer connection with its token", peer=peer_id)
        older.close(CLOSE_REPLACED, "replaced by a newer connection with the same id")
        older.transport.loseConnection()
        return older.leave_now(CLOSE_REPLACED)

    # -- membership ---------------------------------------------------------

    def join(self, proto: SignalingServerProtocol):
        peer_id = proto.peer_id
        if peer_id is None:
            return None  # (it closed before joining)
        if self._local_sessions is not None and self._local_sessions.end(peer_id):
            # its id (fixed by its access token) was in grace and it came back
            # without the resume token: a newer connection takes the id over,
            # as from an open older one (its partners were told peer_left)
            self._log.info("peer {peer}'s grace period ended: a newer connection has its id", peer=peer_id)
        self.connections[peer_id] = proto
        try:
            result = self.registry.add(peer_id, proto.ip, proto.conn_id)
        except (SignalingError, PeerIdTaken):
            if self.connections.get(peer_id) is proto:
                del self.connections[peer_id]
            raise
        self._log.info("peer {peer} connected from {ip}", peer=peer_id, ip=proto.ip)
        return result

    def leave(self, proto: SignalingServerProtocol, peer_id: str, clean: bool, code):
        proto._unlink()  # (before Redis removes it and ends its pairing)
        if self.connections.get(peer_id) is proto:
            del self.connections[peer_id]
        self._log.info(
            "peer {peer} disconnected from {ip} (close code {code}, {how})",
            peer=peer_id,
            ip=proto.ip,
            code=code,
            how="clean" if clean else "not clean",
        )
        result = then(self.registry.remove(peer_id, proto.conn_id), lambda t: self._left(peer_id, t))
        if is_deferred(result):
            result.addErrback(
                lambda f: self._log.warn("peer {peer} not removed from the registry: {why}",
                                         peer=peer_id, why=f.getErrorMessage())
            )
            return result.addBoth(_firing, proto.closed)
        _fire(proto.closed)
        return None

    def _left(self, gone: str, transitions):
        self.note_transitions(transitions)
        payload = messages.encode(messages.peer_left(gone))
        pending = []
        for t in transitions:
            result = then(self.deliver(t.peer, payload), lambda ok, to=t.peer: self._told(ok, gone, to))
            if is_deferred(result):
                pending.append(result)
        return DeferredList(pending) if pending else None

    def _told(self, delivered, gone: str, to: str) -> None:
        if delivered is True:
            self._log.info("peer_left {gone} -> {to}", gone=gone, to=to)

    # -- sessions that outlive their socket (resume) -------------------------------

    def new_conn_id(self) -> str:
        """A name for a new connection, unique among this process's (and, with the node id, the cluster's)."""
        return f"{self._conn_prefix}.{next(self._conn_ids)}"

    @property
    def resume_secret(self) -> bytes:
        """
        What signs resume tokens: ``--resume-secret-file`` (or derived from
        the access-token secret); else, in a cluster, the one shared through
        Redis; else one for this process only.
        """
        if self.settings.resume_secret is not None:
            return self.settings.resume_secret
        if self.cluster is not None and self.registry.resume_secret is not None:
            return self.registry.resume_secret
        return self._own_secret

    def resume_id(self, token: Optional[str]) -> Optional[str]:
        """The peer id a resume token (``?resume=``) names, if this server signed it."""
        return verify_resume_token(self.resume_secret, token) if token else None

    def resume_token(self, peer_id: str) -> str:
        """The token a welcome carries for ``peer_id`` to resume with."""
        return make_resume_token(self.resume_secret, peer_id)

    def suspend(self, proto: SignalingServerProtocol, peer_id: str, code) -> None:
        """
        ``proto``'s socket was lost without a close frame from the peer: keep
        its session (id, state, partner) for the grace period, queue what is
        sent to it, and remove it only when the period ends without a resume.
        """
        key = proto._key
        refused = self.graced.add(key)
        if refused is not None:
            self.metrics.grace_refused += 1
            self._log.warn(
                "peer {peer} ({ip}) lost its connection (close code {code}): no grace period, too many peers "
                "in grace ({cap}); removed", peer=peer_id, ip=proto.ip, code=code,
                cap="in total" if refused == "total" else "from its address",
            )
            proto._enqueue(self.leave, proto, peer_id, False, code)
            return
        self.clock.callLater(self.settings.resume_grace, self.graced.remove, key)
        self.metrics.grace_started += 1
        if self.connections.get(peer_id) is proto:
            del self.connections[peer_id]
        self._log.info(
            "peer {peer} ({ip}) lost its connection (close code {code}): in grace for {grace}s",
            peer=peer_id, ip=proto.ip, code=code, grace=self.settings.resume_grace,
        )
        result = self.sessions.suspend(peer_id, proto.conn_id, proto.ip)
        if is_deferred(result):
            result.addBoth(_firing, proto.closed)
        else:
            _fire(proto.closed)

    def _expired(self, session) -> None:
        """A peer in grace here did not resume in time: removed, as when it leaves."""
        self.metrics.grace_expired += 1
        self._log.info(
            "peer {peer} ({ip}) did not resume within {grace}s: removed ({queued} queued messages dropped)",
            peer=session.peer_id, ip=session.ip, grace=self.settings.resume_grace, queued=len(session.queue),
        )
        result = then(self.registry.remove(session.peer_id), lambda t: self._left(session.peer_id, t))
        if is_deferred(result):
            result.addErrback(lambda f: self._log.warn("peer {peer} not removed from the registry: {why}",
                                                       peer=session.peer_id, why=f.getErrorMessage()))

    def resume(self, proto: SignalingServerProtocol):
        """
        ``proto`` presented a valid resume token for ``proto.peer_id``:
        ``(True, queued frames)`` if it takes a session back (in grace, or
        still held by an older connection, which it replaces);
        ``(False, [])`` if the id was free and is now its own afresh; None if
        the id is someone else's.  (Or a Deferred of that.)
        """
        peer_id = proto.peer_id
        if peer_id is None:
            return None  # (it closed before resuming)
        older = self.connections.get(peer_id)
        if older is proto:
            older = None
        if older is not None and self._local_sessions is not None:
            # the same peer on a newer connection (say, after a network
            # change) before its older socket was found dead: the session moves
            self._log.info("peer {peer} resumed on a newer connection from {ip}", peer=peer_id, ip=proto.ip)
            self._evict(older, "resumed on a newer connection")
            self.connections[peer_id] = proto
            self.metrics.resumes[MOVED] += 1
            return True, []

        def outcome(found):
            if found is None:
                return None
            kind, queued = found
            self.metrics.resumes[kind] += 1
            if older is not None and self.connections.get(peer_id) is older:
                # (a cluster: the shared state now names this connection, so
                # what the older one still does there is ignored)
                self._evict(older, "resumed on a newer connection")
            self.connections[peer_id] = proto
            if kind == RESUMED:
                self._log.info("peer {peer} resumed from {ip} ({queued} queued messages)",
                               peer=peer_id, ip=proto.ip, queued=len(queued))
                return True, queued
            if kind == MOVED:
                self._log.info("peer {peer} resumed on a newer connection from {ip}; the older one is closed",
                               peer=peer_id, ip=proto.ip)
                return True, queued
            assert kind == NEW
            self._log.info("peer {peer} came back from {ip} after its session ended: the same id, idle",
                           peer=peer_id, ip=proto.ip)
            return False, []

        return then(self.sessions.resume(peer_id, proto.ip, proto.connected_at, proto.conn_id), outcome)

    def evict(self, peer_id: str, conn: Optional[str]) -> None:
        """
        ``peer_id`` resumed on another node: close its connection here (if
        ``conn`` still holds it; any, if None) without ending the session.
        """
        proto = self.connections.get(peer_id)
        if proto is not None and (conn is None or proto.conn_id == conn):
            self._log.info("peer {peer} resumed on another node: its connection here is closed", peer=peer_id)
            self._evict(proto, "resumed on another connection")

    def _evict(self, older: SignalingServerProtocol, reason: str) -> None:
        if older.peer_id is not None and self.connections.get(older.peer_id) is older:
            del self.connections[older.peer_id]
        older.peer_id = None  # its close must not end the session it no longer holds
        older.close(CLOSE_REPLACED, reason)
        older.transport.loseConnection()
        _fire(older.closed)

    # -- delivery -----------------------------------------------------------

    def deliver(self, to: str, payload: bytes):
        """
        Send ``payload`` to the peer ``to``: directly if it is connected
        here, else through the registry's ``route`` (other nodes), if it has
        one.  Returns whether it was delivered (or a Deferred firing with it).
        """
        proto = self.connections.get(to)
        if proto is not None:
            return proto.send(payload)
        if self._local_sessions is not None:
            held = self._local_sessions.hold(to, payload)
            if held is not None:  # in its grace period: kept for it, or its queue is full
                return True if held else QUEUE_FULL
        if self.cluster is not None:
            return self.registry.route(to, payload)
        return False

    def deliver_local(self, to: str, payload: bytes) -> bool:
        """Send ``payload`` to ``to`` if it is connected to this process (held to the end of the turn, see writes)."""
        proto = self.connections.get(to)
        if proto is None:
            return False
        self.writes.open()
        return proto.send(payload)

    def local_peers(self):
        """(id, ip, connected_at, conn) of every open connection of this process."""
        return [(p.peer_id, p.ip, p.connected_at, p.conn_id) for p in list(self.connections.values())]

    def forget_links(self) -> None:
        """Relay every pair of this node through Redis again (it lost Redis, or re-registered)."""
        for proto in list(self.connections.values()):
            proto._unlink()

    def note_transitions(self, transitions) -> None:
        """Log what a registry operation changed; a peer here that is no longer paired relays through Redis."""
        connections = self.connections
        for t in transitions:
            if t.new != CONNECTED:
                proto = connections.get(t.peer)
                if proto is not None:
                    proto._unlink()
        self.log_transitions(transitions)

    def log_transitions(self, transitions) -> None:
        for t in transitions:
            self._log.info(
                "peer {peer} {old} -> {new} (target {target})",
                peer=t.peer,
                old=t.old,
                new=t.new,
                target=t.target,
            )

    # -- shutdown -----------------------------------------------------------

    def shutdown(self, timeout: float) -> Deferred:
        """
        Close every connection with 1001 and fire when all have closed, or
        after ``timeout`` seconds, when the rest are dropped.
        """
        self.shutting_down = True
        protos = list(self.connections.values())
        if not protos:
            return succeed(0)
        self._log.info(
            "closing {count} connections (waiting up to {timeout}s)",
            count=len(protos),
            timeout=timeout,
        )
        for proto in protos:
            proto.close(CLOSE_GOING_AWAY, "server shutting down")
        done = DeferredList([p.closed for p in protos])
        timer = self.clock.callLater(timeout, self._drop_remaining, done)
        done.addCallback(lambda _: timer.cancel() if timer.active() else None)
        done.addCallback(lambda _: len(protos))
        return done

    def _drop_remaining(self, done: Deferred) -> None:
        remaining = [p for p in self.connections.values()]
        self._log.warn(
            "drain timeout: dropping {count} connections that did not close",
            count=len(remaining),
        )
        for proto in remaining:
            proto.dropConnection(abort=True)
            _fire(proto.closed)


def uuid4_text() -> str:
    """``str(uuid.uuid4())``, in a third of the time (every connection gets one)."""
    global _random, _taken
    if _taken >= len(_random):  # (the random bytes of 256 ids, read at once: one getrandom() for 256 ids)
        _random, _taken = os.urandom(4096), 0
    b = bytearray(_random[_taken:_taken + 16])
    _taken += 16
    b[6] = b[6] & 0x0F | 0x40  # version 4
    b[8] = b[8] & 0x3F | 0x80  # the RFC 4122 variant
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_random, _taken = b"", 0  # (see uuid4_text)


def _firing(result, d: Deferred):
    """Fire ``d``, and pass ``result`` on."""
    _fire(d)
    return result


def _fire(d: Deferred) -> None:
    if not d.called:
        d.callback(None)
