"""
PeerJS clients on the same core as native peers (``docs/peerjs.rst``):
:class:`PeerJSProtocol`, the WebSocket at ``/peerjs`` (on the HTTP port and
the WebSocket port), and :class:`PeerJSRealm`, what a server keeps for them
(the key, the messages for ids not connected yet, the tokens of the
clients that may come back), with ``GET /<key>/id``.

The rules (ids, messages, the queue and EXPIRE) are :mod:`signaling.peerjs`;
admission, limits, the outbound cap, delivery (here or on another node of
a cluster), resume, metrics and logs are
:class:`~signaling.protocol.SignalingServerProtocol`'s, shared with every
wire format.  A PeerJS client's id ``I`` is ``peerjs/I`` in the registry, so
native and PeerJS peers never address each other.

Where the queue lives: on the node of the sender.  When the destination
connects on this node its messages follow its OPEN at once; in a cluster,
the node also tries to deliver each waiting queue every
``retry_interval`` seconds (to the destination wherever it connected, through
Redis), so that nothing needs to tell the sending node where, or when, an
id connected.  Messages of a queue are delivered one after another, in
order; new ones for the same id wait behind them.

PeerJS's reconnect (the same id and token on a new socket) takes the
session back through the core's resume: from an older connection still
open, or from its grace period (what was sent to it meanwhile follows the
OPEN).  A token is kept as its SHA-256 digest, by the node the client is
connected to, and in a cluster also in Redis (``P peerjs:<id>``: the digest
and the connection holding the id, see ``signaling/lua/peerjs_*.lua``), so
that the same client may come back to any node; only while its connection
is open or its session in its grace period.
"""

import hmac
from collections import Counter, deque
from typing import Deque, Dict, Optional, Tuple

from twisted.logger import Logger
from twisted.python.failure import Failure

from signaling import peerjs
from signaling.admission import Refused, authorize, request_token
from signaling.errors import QUEUE_FULL, PeerIdTaken, SignalingError
from signaling.frameguard import CLOSE_POLICY_VIOLATION
from signaling.limits import TokenBucket
from signaling.protocol import SignalingServerProtocol
from signaling.registry import IClusterRegistry
from signaling.results import is_deferred, then
from signaling.sessions import LocalSessions

__all__ = ["PATH", "PeerJSProtocol", "PeerJSRealm", "serve_peerjs"]

#: where PeerJS clients open their WebSocket (with ``path: "/"``, their default)
PATH = "/peerjs"
#: the id prefix of PeerJS peers in the registry
PREFIX = "peerjs/"
#: seconds between tries to deliver waiting messages to ids connected to another node (a cluster)
RETRY_INTERVAL = 0.5
#: what an id against PeerJS's rules is told
INVALID_ID = "invalid id: letters, digits, and single -, _ or spaces inside"
#: seconds a client's token is kept in Redis at most, while its connection is open (a backstop: it is
#: removed when the connection closes, or kept for the grace period only)
CLUSTER_CLAIM_TTL = 86400
#: what the server says when the cluster's shared state is unreachable at a client's join
UNAVAILABLE = "the server cannot register peers now (its cluster state is unreachable); try again"


def _param(request, name: str) -> Optional[str]:
    return (request.params.get(name) or [None])[0]


class _Claim:
    """The token of the client that holds (or held, and may take back) an id on this node."""

    __slots__ = ("digest", "proto", "until")

    def __init__(self, digest: bytes, proto):
        self.digest = digest
        self.proto = proto  # the connection that holds it
        self.until: Optional[float] = None  # once its socket is lost: the end of its grace period


class PeerJSRealm:
    """
    What this server keeps for PeerJS clients: the key, the messages held for
    ids not connected yet (:class:`~signaling.peerjs.Pending`), and the token
    of each client connected here (to let the same client back in with its
    id, and nobody else).

    :param factory: the :class:`~signaling.protocol.SignalingFactory`.
    :param key: what ``?key=`` must be (PeerJS's ``key`` option), unless
        access tokens are required (then the key *is* the access token).
    :param expire_timeout: seconds messages wait for an id to connect.
    :param retry_interval: seconds between tries to deliver waiting
        messages, in a cluster (the id may connect to another node).
    """

    _log = Logger()

    def __init__(self, factory, key: str = "peerjs", expire_timeout: float = 5.0,
                 retry_interval: float = RETRY_INTERVAL, **bounds):
        self.factory = factory
        self.key = key
        self.retry_interval = retry_interval
        self.pending = peerjs.Pending(factory.clock, expire_timeout, self._expired, **bounds)
        self._claims: Dict[str, _Claim] = {}
        self._lost: Deque[Tuple[float, str, _Claim]] = deque()  # claims of lost sockets, by end of grace
        self._flushing: Dict[str, object] = {}  # ids whose waiting messages are being delivered (their run)
        self._retry = None
        #: what happened to PeerJS messages, for the metrics: held, flushed, expired, expire_sent, refused
        self.counts: Counter = Counter()

    # -- ids ------------------------------------------------------------------------

    def fresh_id(self) -> str:
        """An id for a client that has none (``GET /<key>/id``): the server's own kind, not in use here."""
        for _ in range(8):
            peer = self.factory.new_id()
            if PREFIX + peer not in self.factory.connections:
                return peer
        return peer  # (ids are random: never reached in practice)

    def claim(self, peer_id: str) -> Optional[_Claim]:
        """
        The token of the client that holds ``peer_id`` on this node, or lost
        its socket and may still take it back; None otherwise.
        """
        self._purge()
        claim = self._claims.get(peer_id)
        if claim is None:
            return None
        if claim.proto.peer_id == peer_id:
            return claim  # its connection is open
        sessions = self.factory.sessions
        if claim.until is not None and (
            peer_id in sessions if isinstance(sessions, LocalSessions) else self.factory.clock.seconds() < claim.until
        ):
            return claim  # in its grace period
        del self._claims[peer_id]
        return None

    def joined(self, peer_id: str, digest: bytes, proto) -> None:
        """``proto`` was given ``peer_id`` (OPEN): remember its token; what waits for it follows."""
        self._claims[peer_id] = _Claim(digest, proto)
        run = self._scripts()
        if run is not None:  # (so that the same client may come back to another node)
            self._quietly(run("peerjs_claim", peer_id, digest.hex(), proto.conn_id, str(CLUSTER_CLAIM_TTL)),
                          peer_id)
        self.flush(peer_id)

    def closed(self, peer_id: str, proto, may_resume: bool) -> None:
        """``proto``, which held ``peer_id``, closed; ``may_resume``: its session is in its grace period."""
        claim = self._claims.get(peer_id)
        if claim is None or claim.proto is not proto:
            return  # (another connection holds it now)
        grace = self.factory.settings.resume_grace
        may_resume = may_resume and grace > 0
        run = self._scripts()
        if run is not None:
            seconds = int(grace) + 10 if may_resume else 0
            self._quietly(run("peerjs_release", peer_id, f"{claim.digest.hex()}:{proto.conn_id}", str(seconds)),
                          peer_id)
        if not may_resume:
            del self._claims[peer_id]
            return
        # (in a cluster the grace period is Redis's, begun a little later than
        # now: this one ends a little sooner, so that it never outlives it)
        margin = 0 if isinstance(self.factory.sessions, LocalSessions) else min(1.0, grace / 10)
        claim.until = self.factory.clock.seconds() + grace - margin
        self._lost.append((claim.until, peer_id, claim))

    def same_client_elsewhere(self, peer_id: str, digest: bytes):
        """
        In a cluster, a Deferred firing with whether ``peer_id`` is held (or
        in its grace period) on another node by a client with this token;
        None without a cluster.
        """
        run = self._scripts()
        if run is None:
            return None
        return then(run("peerjs_check", peer_id, digest.hex()), lambda reply: reply == 1)

    def _scripts(self):
        """The Redis registry's way of running a script of signaling/lua (``RedisRules._execute``), or None."""
        registry = self.factory.registry
        run = getattr(registry, "_execute", None)
        return run if IClusterRegistry.providedBy(registry) and callable(run) else None

    def _quietly(self, d, peer_id: str) -> None:
        if is_deferred(d):
            d.addErrback(lambda f: self._log.warn("PeerJS token of {peer} not recorded in Redis: {why}",
                                                  peer=peer_id, why=f.getErrorMessage()))

    def _purge(self) -> None:
        now = self.factory.clock.seconds()
        lost = self._lost
        while lost and (lost[0][0] <= now or self._claims.get(lost[0][1]) is not lost[0][2]):
            _, peer_id, claim = lost.popleft()
            if self._claims.get(peer_id) is claim and claim.proto.peer_id != peer_id:
                del self._claims[peer_id]

    # -- relaying -------------------------------------------------------------------

    def relay(self, sender: str, message: peerjs.Message, size: int):
        """
        Send ``message`` from ``sender`` (a registry id) on to its ``dst``:
        delivered, or held until that id connects.  May answer a Deferred
        (fires when done).
        """
        dst = message.dst or ""  # (never empty: parse() sees to it)
        frame = peerjs.relay(message.type, sender[len(PREFIX):], dst, message.payload)
        to = PREFIX + dst
        if len(dst) > peerjs.MAX_ID:  # no client can ever connect with such an id
            self._expire_now(sender, to, "not an id")
            return None
        if self.pending.count and to in self.pending:  # earlier messages wait for it: this one waits behind them
            return self._hold(sender, to, message.type, frame, size)
        factory = self.factory
        proto = factory.connections.get(to)
        delivered = proto.send(frame) if proto is not None else factory.deliver(to, frame)
        if delivered is True:  # (the commonest case, first)
            self._relayed(message.type, sender, to, size)
            return None
        if is_deferred(delivered):
            return delivered.addCallback(self._sent, sender, to, message.type, frame, size)
        return self._sent(delivered, sender, to, message.type, frame, size)

    def _sent(self, delivered, sender: str, to: str, kind: str, frame: bytes, size: int) -> None:
        if delivered is True:
            self._relayed(kind, sender, to, size)
        elif delivered == QUEUE_FULL:  # reconnecting, with too much waiting for it already: dropped
            self._expire_now(sender, to, "its resume queue is full")
        elif kind in peerjs.HELD or to in self.pending:
            self._hold(sender, to, kind, frame, size)
        # (else a LEAVE for an id that is not connected: dropped, as PeerJS server does)

    def _relayed(self, kind: str, sender: str, to: str, size: int) -> None:
        factory = self.factory
        metrics = factory.metrics
        metrics.relays[peerjs.NATIVE_TYPE[kind]] += 1
        metrics.relayed_bytes += size
        if factory.settings.log_relays:
            self._log.info("relay {type} {sender} -> {to} ({size} bytes)", type=kind, sender=sender, to=to, size=size)

    def _hold(self, sender: str, to: str, kind: str, frame: bytes, size: int) -> None:
        refused = self.pending.hold(sender, to, kind, frame, size)
        if refused is not None:
            self.counts["refused"] += 1
            self._expire_now(sender, to, f"too many messages wait ({refused})")
            return
        self.counts["held"] += 1
        if self.factory.settings.log_relays:  # (a line per message, as relays)
            self._log.info("{type} from {sender} held for {to}, not connected (yet)", type=kind, sender=sender, to=to)
        self._schedule_retry()

    def _expire_now(self, sender: str, to: str, why: str) -> None:
        if self.factory.settings.log_relays:
            self._log.info("{to} cannot be reached: EXPIRE to {sender} ({why})", to=to, sender=sender, why=why)
        self._tell_expired(to, sender)

    def _expired(self, to: str, senders) -> None:
        """The messages for ``to`` waited too long (the rules dropped them): each sender gets EXPIRE."""
        self.counts["expired"] += 1
        self._flushing.pop(to, None)
        self._log.info("{to} did not connect within {timeout}s: EXPIRE to {senders}",
                       to=to, timeout=self.pending.timeout, senders=", ".join(senders))
        for sender in senders:
            self._tell_expired(to, sender)

    def _tell_expired(self, to: str, sender: str) -> None:
        self.counts["expire_sent"] += 1
        result = self.factory.deliver(sender, peerjs.expire(to[len(PREFIX):], sender[len(PREFIX):]))
        if is_deferred(result):
            result.addErrback(lambda _: None)  # (a sender gone meanwhile: nobody to tell)

    # -- waiting messages ----------------------------------------------------------------

    def flush(self, to: str) -> None:
        """Deliver the messages waiting for ``to``, in order, one after another; stop at the first not delivered."""
        if to in self._flushing or to not in self.pending:
            return
        run = self._flushing[to] = object()  # (a delivery answered late must not stop a newer run)
        self._flush_next(to, run)

    def _flush_next(self, to: str, run: object) -> None:
        while self._flushing.get(to) is run:
            held = self.pending.first(to)
            if held is None:
                del self._flushing[to]
                return
            delivered = self.factory.deliver(to, held.frame)
            if is_deferred(delivered):
                delivered.addCallback(self._flushed_later, to, held, run).addErrback(self._flush_failed, to, run)
                return
            if not self._took(delivered, to, held, run):
                return

    def _flushed_later(self, delivered, to: str, held: peerjs.Held, run: object) -> None:
        if self._took(delivered, to, held, run):
            self._flush_next(to, run)

    def _took(self, delivered, to: str, held: peerjs.Held, run: object) -> bool:
        """Whether ``held`` was delivered (and the run of deliveries goes on)."""
        if self._flushing.get(to) is not run:
            return False  # (its queue expired meanwhile)
        if delivered is not True or not self.pending.delivered(to, held):
            del self._flushing[to]  # not there (yet, or any more): the next try, or the expiry, decides
            return False
        self.counts["flushed"] += 1
        self._relayed(held.kind, held.sender, to, held.size)
        return True

    def _flush_failed(self, failure: Failure, to: str, run: object) -> None:
        if self._flushing.get(to) is run:
            del self._flushing[to]
        self._log.failure("delivering the messages waiting for {to} failed", failure, to=to)

    def _schedule_retry(self) -> None:
        if self._retry is None and len(self.pending) and IClusterRegistry.providedBy(self.factory.registry):
            self._retry = self.factory.clock.callLater(self.retry_interval, self._retry_all)

    def _retry_all(self) -> None:
        self._retry = None
        for to in self.pending.destinations():
            self.flush(to)
        self._schedule_retry()

    # -- GET /<key>/id ---------------------------------------------------------------------

    def http_id(self, request, key: str) -> bytes:
        """
        A fresh id as text, for any key (as PeerJS server: a wrong key is
        told INVALID-KEY on the WebSocket); with access tokens required, the
        key is the access token, checked as the WebSocket checks it, and a
        token that fixes an id answers that id.  Origins as for WebSockets;
        readable from any page otherwise (CORS).
        """
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Vary", b"Origin")
        settings = self.factory.settings
        origin = (request.getHeader(b"origin") or b"").decode("latin-1")
        try:
            claims = authorize(settings, origin, key, self.factory.clock.seconds())
        except Refused as e:
            request.setResponseCode(e.status)
            if e.status == 401:
                request.setHeader(b"WWW-Authenticate", b'Bearer realm="signaling"')
            return (e.reason + "\n").encode("utf-8")
        request.setHeader(b"Access-Control-Allow-Origin",
                          origin.encode("latin-1") if origin and settings.allowed_origins else b"*")
        peer = (claims or {}).get("sub") or self.fresh_id()
        return peer.encode("utf-8")

    def http_peers(self, request) -> bytes:
        """``GET /<key>/peers``: no discovery (as PeerJS server without ``allow_discovery``)."""
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        request.setResponseCode(401)
        return b""


class PeerJSProtocol(SignalingServerProtocol):
    """
    A PeerJS client (npm ``peerjs`` 1.5, unchanged), connected at
    ``/peerjs?key=&id=&token=``: its rules are :mod:`signaling.peerjs`, what
    its server keeps is the factory's :class:`PeerJSRealm` (``factory.peerjs``).
    """

    wire = "peerjs"
    id_prefix = PREFIX

    #: a handshake refused in PeerJS's way (a frame, then a close): (frame, reason)
    _refusal: Optional[Tuple[bytes, str]] = None
    _digest = b""  # of its token
    _claimed: Optional[str] = None  # the id it was given with its OPEN (kept after a newer connection took it)

    # -- admission and identity ------------------------------------------------------------

    def _access_token(self, request) -> Optional[str]:
        """With access tokens required, PeerJS's key is the access token (``new Peer({key: token})``)."""
        return request_token(_param(request, "key"), request.headers.get("authorization"))

    def _identity(self, request, claims):
        factory = self.factory
        realm: PeerJSRealm = factory.peerjs
        key, peer, token = _param(request, "key"), _param(request, "id"), _param(request, "token")
        if not (key and peer and token):
            return self._refuse_in_band(peerjs.error(peerjs.NO_PARAMETERS), 400, "PeerJS: no id, token or key")
        if factory.settings.token_secret is None and not hmac.compare_digest(
            key.encode("utf-8", "surrogatepass"), realm.key.encode("utf-8")
        ):
            return self._refuse_in_band(peerjs.INVALID_KEY, 401, "wrong PeerJS key")
        fixed = (claims or {}).get("sub")
        if fixed is not None and peer != fixed:
            return self._refuse_in_band(peerjs.error("the access token is for another id"), 403,
                                        "PeerJS id is not the access token's")
        if fixed is None and not peerjs.valid_id(peer):
            return self._refuse_in_band(peerjs.error(INVALID_ID), 400, "invalid PeerJS id")
        if not peerjs.valid_token(token):
            return self._refuse_in_band(peerjs.error("invalid token"), 400, "invalid PeerJS token")
        peer_id = PREFIX + peer
        self._digest = digest = peerjs.token_digest(token)
        held = realm.claim(peer_id)
        if held is not None and hmac.compare_digest(held.digest, digest):
            return peer_id, peer_id  # the same client again (PeerJS's reconnect): it takes its session back
        if (
            peer_id in factory.connections or peer_id in factory.reserved
            or (not IClusterRegistry.providedBy(factory.registry) and peer_id in factory.registry)
        ):
            return self._refuse_in_band(peerjs.ID_TAKEN, 409, "PeerJS id taken")
        return peer_id, None  # (in a cluster, the id may be taken on another node: the join says)

    def _refuse_in_band(self, frame: bytes, status: int, reason: str):
        """Refuse in PeerJS's way: accept the socket, send ``frame``, close (counted and logged as ``status``)."""
        self.factory.note_refusal(self.ip, status, reason)
        self._refusal = (frame, reason)
        return None, None

    def onOpen(self):
        if self._refusal is None:
            super().onOpen()
            return
        frame, reason = self._refusal
        # (what it sends until it has closed is read, against the rate limit, and dropped)
        self._bucket = TokenBucket(self.factory.clock, self.factory.settings.rate, self.factory.settings.burst)
        self._strikes = 0
        self.send(frame)
        self.close(CLOSE_POLICY_VIOLATION, reason)

    def _greeting(self, peer_id: str, resumed: bool) -> bytes:
        return peerjs.OPEN

    def _admitted(self, peer_id: str) -> None:
        self._claimed = peer_id
        self.factory.peerjs.joined(peer_id, self._digest, self)  # (what waits for it follows the OPEN)

    def _join_failed(self, failure):
        if failure.check(PeerIdTaken):
            check = self.factory.peerjs.same_client_elsewhere(self.peer_id, self._digest) if self.peer_id else None
            if check is None:
                self._taken()
                return None
            if is_deferred(check):  # (Redis unreachable: as taken)
                return check.addCallbacks(self._held_elsewhere, lambda _: self._taken())
            return self._held_elsewhere(check)
        if failure.check(SignalingError):
            self.send(peerjs.error(UNAVAILABLE))
        return super()._join_failed(failure)

    def _held_elsewhere(self, same: bool):
        """The id is held in the cluster: by this very client (``same``) on another node, or by another."""
        if self.peer_id is None:
            self.factory.unreserve(self)
            return None  # it closed meanwhile
        if not same:
            self._taken()
            return None
        self._log.info("PeerJS peer {peer} came back with its token: taking its session over from another node",
                       peer=self.peer_id)
        return self._resume_session()

    def _resumed(self, outcome):
        if outcome is None and self.peer_id is not None:  # the id is someone else's now
            self._taken()
            return None
        return super()._resumed(outcome)

    def _taken(self) -> None:
        """Never registered: ID-TAKEN, and closed (its close removes nothing)."""
        self.factory.unreserve(self)
        if self.peer_id is None:
            return  # it closed meanwhile
        self._log.info("PeerJS peer {peer} refused: id taken", peer=self.peer_id)
        connections = self.factory.connections
        if connections.get(self.peer_id) is self:
            del connections[self.peer_id]
        self.peer_id = None
        self.send(peerjs.ID_TAKEN)
        self.close(CLOSE_POLICY_VIOLATION, "ID is taken")

    def onClose(self, wasClean, code, reason):
        claimed = self._claimed  # (peer_id is None by now if a newer connection took the session)
        factory = self.factory
        may_resume = (
            claimed is not None and self.peer_id == claimed and self._lost_may_resume()
            and factory.graced.refusal(self._key) is None
        )  # (as SignalingServerProtocol.onClose decides, and SignalingFactory.suspend)
        super().onClose(wasClean, code, reason)
        if claimed is not None:
            factory.peerjs.closed(claimed, self, may_resume)

    # -- messages ------------------------------------------------------------------------

    def _handle(self, payload, isBinary):
        if self._refusal is not None or self.peer_id is None:
            return
        if isBinary:
            self._error("invalid-message", peerjs.BINARY_FRAME, None)
            return
        try:
            message = peerjs.parse(payload)
        except SignalingError as e:
            self._error(e.code, e.message, e.ref)
            return
        if message.dst is None:
            return  # HEARTBEAT (its frame kept the connection alive), or a LEAVE for nobody
        if self._busy:  # (what this peer sent before is still on its way: this waits behind it)
            self._enqueue(self._send_on, message, len(payload))
            return
        try:
            result = self.factory.peerjs.relay(self.peer_id, message, len(payload))
        except Exception:  # (as the operation queue does: logged, and this connection goes on)
            self._log.failure("operation failed for peer {peer}", peer=self.peer_id)
            return
        if result is not None:  # (delivered later: through the cluster; what follows waits for it)
            self._busy = True
            self._waited(result)

    def _send_on(self, message: peerjs.Message, size: int):
        sender = self.peer_id
        if sender is None:
            return None  # it closed meanwhile
        return self.factory.peerjs.relay(sender, message, size)

    def _error_frame(self, code: str, text: str, ref: Optional[str]) -> bytes:
        return peerjs.error(text)


def serve_peerjs(factory, key: str = "peerjs", expire_timeout: float = 5.0, path: str = PATH,
                 **options) -> PeerJSRealm:
    """
    Serve PeerJS clients at ``path`` on ``factory`` (a
    :class:`~signaling.protocol.SignalingFactory`); its :class:`PeerJSRealm`
    is ``factory.peerjs`` (``GET /<key>/id`` answers from it).
    """
    realm = factory.peerjs = PeerJSRealm(factory, key, expire_timeout, **options)
    factory.serve(path, PeerJSProtocol)
    return realm
