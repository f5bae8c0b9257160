"""
The frame layer, bounded (``docs/security.rst``): every frame Autobahn reads
(continuations and control frames too) spends the peer's rate limit; strikes
close a flooder (1008); a message's fragments are capped in number and in
cost (1009); a failed peer reads and processes nothing more; and each
connection gets a bounded number of frames per reactor turn, the rest held
with its socket paused and served in turn (:class:`HeldConnections`), so that
hundreds of busy connections cannot keep a quiet one waiting.
"""

from collections import deque
from typing import TYPE_CHECKING, Any, Deque, Optional

from autobahn.twisted.websocket import WebSocketServerProtocol
from twisted.logger import Logger

from signaling import _compat
from signaling._tcp import half_close
from signaling.limits import TokenBucket

#: close code for a peer that keeps sending over the rate limit
CLOSE_POLICY_VIOLATION = 1008
#: close code for a message over the size limits (bytes, or fragments)
CLOSE_TOO_BIG = 1009
#: what a message's frame costs besides its payload, counted against the size limit
FRAME_OVERHEAD = 64


class FrameGuard:
    """
    Mixed into the server protocol (before Autobahn's), which provides:
    ``factory`` (``settings``, ``held``, ``rate_limited_text``), ``state``,
    ``peer_id``, ``ip``, ``_bucket``, ``_strikes``, ``_error``, ``close``,
    ``leave_now``, ``_handle``.
    """

    _log = Logger()

    # provided by the protocol class it is mixed into (declared for type checkers)
    factory: Any
    transport: Any
    state: int
    peer_id: Optional[str]
    ip: str
    _bucket: TokenBucket
    _strikes: int

    if TYPE_CHECKING:

        def dataReceived(self, data: bytes) -> None: ...

        def _error(self, code: str, text: str, ref: Optional[str]) -> None: ...

        def close(self, code: int, reason: str) -> None: ...

        def leave_now(self, code: int) -> Any: ...

    _discard = False  # failed: read nothing more, process nothing more
    _dropping = False  # the message being received lost the rate limit: drop it at its end
    _fragments = 0  # frames of the message being received
    _cost = 0  # what the message being received counts against the size limit
    _budget = 0  # frames this connection may still have handled in this reactor turn
    _held = None  # what it sent past that budget, handled at a later turn (reading paused)

    # -- Autobahn's frame machinery (fragments, control frames, large frames) --

    def processData(self):
        if self._discard:
            _compat.take_buffered(self)
            return False
        if self._budget <= 0 and self.state == _compat.STATE_OPEN and _compat.between_frames_with_data(self):
            self._hold(_compat.take_buffered(self))
            return False
        return WebSocketServerProtocol.processData(self)

    # -- fairness: a bounded number of frames per connection per reactor turn --

    def _hold(self, data: bytes) -> None:
        """
        This connection has had its frames for this reactor turn: keep the
        rest of what it sent, read nothing more from it, and wait in the
        factory's queue of held connections (see SignalingFactory.resume_held)
        while every other connection is served.
        """
        self._held = data
        self.transport.pauseProducing()
        self.factory.held.hold(self)

    def _resume_reading(self) -> None:
        data, self._held = self._held, None
        if data is None or self._discard or self.state != _compat.STATE_OPEN:
            return
        self.dataReceived(data)
        if self._held is None and not self._discard and self.state == _compat.STATE_OPEN:
            self.transport.resumeProducing()

    def onFrameBegin(self):
        """Every frame Autobahn reads (data, continuation, control) spends a token; messages are bounded."""
        self._budget -= 1
        opcode, length = _compat.frame_header(self)
        if self.peer_id is not None and not self._spend():
            if self._discard:
                return
            if opcode < 8:
                self._dropping = True
        if opcode < 8:  # a data frame: a message begins (1, 2) or goes on (0)
            if opcode:
                self._fragments, self._cost = 0, 0
            else:  # a continuation: it costs its overhead too (a single frame may hold the whole limit)
                self._cost += FRAME_OVERHEAD
            self._fragments += 1
            self._cost += length
            settings = self.factory.settings
            if self._fragments > settings.max_fragments:
                return self._fail(CLOSE_TOO_BIG, f"message in more than {settings.max_fragments} fragments")
            if self._cost > settings.max_message_size:
                return self._fail(CLOSE_TOO_BIG, "message too big")
        WebSocketServerProtocol.onFrameBegin(self)

    def onMessage(self, payload, isBinary):
        """A whole message from Autobahn's machinery (its frames have spent their tokens)."""
        if self.peer_id is None or self._discard:
            return
        if self._dropping:
            self._dropping = False
            self._rate_limited()
            return
        self._handle(payload, isBinary)

    # -- limits ----------------------------------------------------------------

    def _spend(self) -> bool:
        """
        Spend a token of the rate limit for a frame; False if there was none.
        Each frame without a token is a strike, each frame with one takes a
        strike away: at ``flood_strikes`` the peer is closed (1008).  So a
        burst past the limit, or a sender keeping above twice the rate, is
        closed, and one near the rate is only answered ``rate-limited``.
        """
        if self._bucket.take():
            if self._strikes:
                self._strikes -= 1
            return True
        self._strike()
        return False

    def _strike(self) -> None:
        """A frame found no token: count it, and close the peer once it has flooded."""
        self._strikes += 1
        if self._strikes >= self.factory.settings.flood_strikes:
            self._log.warn(
                "peer {peer} ({ip}) closed for flooding: {strikes} frames over the rate limit",
                peer=self.peer_id, ip=self.ip, strikes=self._strikes,
            )
            self._fail(CLOSE_POLICY_VIOLATION, "message rate limit exceeded", logged=True)

    def _rate_limited(self) -> None:
        self._error("rate-limited", self.factory.rate_limited_text, None)

    def _fail(self, code: int, reason: str, logged: bool = False) -> None:
        """
        Close with ``code`` and read nothing more: what this peer already
        sent (the rest of its flood) is dropped unread.
        """
        if self._discard:
            return
        self._discard = True
        _compat.take_buffered(self)
        if not logged:
            self._log.info("closing {peer} ({ip}) with {code}: {reason}", peer=self.peer_id, ip=self.ip,
                           code=code, reason=reason)
        self.close(code, reason)
        # Read nothing more, and end our side once the close frame is out;
        # the close handshake then ends by its timeout (close_timeout).
        # (Closing the socket at once, with the flood still unread in it,
        # would reset it before the peer had read the close frame.)
        self.transport.pauseProducing()
        half_close(self.transport)
        self.leave_now(code)


class HeldConnections:
    """
    The connections that have had their frames for this reactor turn, with
    the rest of what they sent held; served in turn.

    :param clock: ``seconds`` and ``callLater``.
    :param slice: seconds per reactor turn spent serving them.
    """

    def __init__(self, clock, slice: float):
        self._clock = clock
        self.slice = slice
        self._held: Deque[Any] = deque()  # in the order they were held
        self._resuming = None

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, proto) -> None:
        """Queue a connection that has had its frames for this turn (see :meth:`resume_held`)."""
        self._held.append(proto)
        if self._resuming is None:
            self._resuming = self._clock.callLater(0, self.resume)

    def resume(self) -> None:
        """
        Once a reactor turn: give held connections their next batch of
        frames, first held first served, for at most ``held_slice`` seconds;
        the rest wait for the next turn, and a connection held again goes to
        the back.  So whatever hundreds of busy connections sent, a frame
        from a quiet one waits for at most about one slice, plus one batch
        of each connection that became readable with it.
        """
        self._resuming = None
        held = self._held
        clock = self._clock
        deadline = clock.seconds() + self.slice
        for _ in range(len(held)):
            held.popleft()._resume_reading()
            if not held or clock.seconds() >= deadline:
                break
        if held and self._resuming is None:
            self._resuming = clock.callLater(0, self.resume)
