"""
Peer state and the pairing rules, with no network code.

This module knows nothing about WebSockets, JSON or HTTP.  It keeps, for each
connected user, its state (``idle``, ``connecting``, ``connected``), the user
it points at (``target``), its address and when it arrived, and it applies the
rules of the wire contract (``docs/protocol.rst``):

====================  =========================================  ===========================
operation (A -> B)    allowed when                               effect
====================  =========================================  ===========================
``ping``              A connected to B (liveness)                none
                      A not connected; B not connected to        A: connecting -> B
                      someone else
``pong``              A and B connected to each other            none
                      B connecting -> A, A not connected         A, B: connected, each other
``offer``/``answer``  A and B connected to each other            none
/``ice-candidate``
``disconnect``        A's target is B                            A idle; B idle if it
                                                                 pointed at A
(A's socket closes)   always                                     A removed; everyone whose
                                                                 target was A goes idle
====================  =========================================  ===========================

(For ``pong`` the table reads with A as the sender: "B connecting -> A" means
the user being ponged is waiting for the sender.)

A rule that does not hold raises the :mod:`signaling.errors` exception its
refusal names (:func:`~signaling.errors.refusal`); the protocol layer turns
it into an error reply.  Every operation
that changes state returns the list of :class:`Transition` objects it made, so
the caller can log them.

:class:`IRegistry` is the seam for other implementations (a Redis-backed one
shared by several nodes): callers must accept either a plain value or a
``Deferred`` from every operation, and :class:`Registry` here answers
synchronously.
"""

from typing import Dict, List, NamedTuple, Optional, Set, Tuple

from zope.interface import Attribute, Interface, implementer

from signaling.errors import PeerIdTaken, SignalingError, refusal

__all__ = [
    "IRegistry", "IClusterRegistry", "ILocalPeers", "Registry", "Peer", "Transition", "PeerIdTaken", "SignalingError",
]

IDLE = "idle"
CONNECTING = "connecting"
CONNECTED = "connected"


class Transition(NamedTuple):
    """One user's state change: ``peer`` went from ``old`` to ``new`` (now pointing at ``target``)."""

    peer: str
    old: str
    new: str
    target: Optional[str]


class Peer:
    """One connected user, as the registry sees it."""

    __slots__ = ("id", "ip", "connected_at", "state", "target", "node", "online")

    def __init__(self, peer_id: str, ip: str, connected_at: float, node: Optional[str] = None):
        self.id = peer_id
        self.ip = ip
        self.connected_at = connected_at
        self.state = IDLE
        self.target: Optional[str] = None
        #: the server process it is connected to (shared registries only)
        self.node = node
        #: False while its socket is lost and it may resume (its grace period)
        self.online = True

    def __repr__(self) -> str:
        return f"<Peer {self.id} {self.state} -> {self.target}>"


class IRegistry(Interface):
    """
    Who is connected and who is paired with whom.

    Every method may return its result directly or as a ``Deferred`` that
    fires with it (or fails with a :class:`SignalingError`).

    A registry shared by several processes also provides
    :class:`IClusterRegistry`.
    """

    def add(peer_id, ip, conn=""):
        """
        Register a new, idle user; returns its :class:`Peer`.  ``conn``
        names the connection holding it (see :meth:`remove`).
        """

    def remove(peer_id, conn=""):
        """
        Forget a user whose socket went away; returns the transitions of
        the users who pointed at it (they are now idle).  With ``conn``, a
        shared registry leaves a user alone that another connection holds
        now (it resumed there).
        """

    def ping(sender, to):
        """Apply a ``ping`` from ``sender`` to ``to``; returns transitions."""

    def pong(sender, to):
        """Apply a ``pong`` from ``sender`` to ``to``; returns transitions."""

    def check_paired(sender, to):
        """
        Raise unless ``sender`` and ``to`` are connected to each other (for
        offer/answer/ice-candidate); returns no transitions.
        """

    def disconnect(sender, to):
        """Apply a ``disconnect`` from ``sender`` to ``to``; returns transitions."""

    def peers():
        """Return a list of every :class:`Peer`, oldest first."""

    def summary():
        """
        Return counts: ``users``, ``idle``, ``connecting``, ``connected``,
        ``pairs``, and ``offline`` (users in their grace period).
        """


#: what :meth:`ISessions.resume` found
RESUMED = "resumed"  # the peer was in its grace period: its queued frames follow
MOVED = "moved"  # another connection still held it (it is closed without ending the session)
NEW = "new"  # its session was gone: the same id again, idle

Outcome = Optional[Tuple[str, List[bytes]]]


class ISessions(Interface):
    """Grace periods of peers whose socket was lost."""

    def suspend(peer_id, conn, ip):
        """
        The connection ``conn`` holding ``peer_id`` lost its socket without
        a close frame from the peer: begin the grace period (state kept, the
        peer shown offline, what is sent to it queued).  May answer a
        Deferred; it fires once the session is in grace.
        """

    def resume(peer_id, ip, at, conn):
        """
        The new connection ``conn`` presented a valid resume token for
        ``peer_id``: ``(RESUMED, queued frames)``, ``(MOVED, [])`` or
        ``(NEW, [])`` (see the constants), or None if the id is someone
        else's now.  May answer a Deferred of it.
        """


class IClusterRegistry(IRegistry, ISessions):
    """
    A registry shared by several server processes ("nodes"): peers connected
    to other nodes are reached through it, and it may be unusable for a
    while (starting, or its shared state unreachable).

    Its operations take effect in the shared state in the order this node
    calls them, whether or not the caller waits for one's answer before
    the next (the protocol does not wait for ``relay_across``: what the
    same peer sends next must still reach the shared state after it).
    """

    node = Attribute("This process's id among the nodes (``--node-id``).")

    ready = Attribute(
        "Whether peers may be admitted now: this node is registered in the shared "
        "state and can be reached through it.  A node never welcomes a peer while "
        "it is not ready."
    )

    resume_secret = Attribute(
        "The secret of resume tokens shared by the nodes (bytes), once registered; "
        "None before (a node may have its own: --resume-secret-file)."
    )

    def route(to, frame):
        """
        Deliver ``frame`` to ``to`` on another node, or queue it if ``to`` is
        in its grace period; returns whether a node (or the queue) took it,
        or ``signaling.errors.QUEUE_FULL``.
        """

    def relay_across(sender, to, frame, answer, *args):
        """
        ``check_paired`` and, if it passes, ``route``, in one step, for a
        relay to a peer on another node; then ``answer(outcome, *args)``
        (now or later): ``outcome`` is what ``route`` answers, or the
        exception it failed with (a ``SignalingError`` for a refusal; any
        other is a fault, which the registry has logged).  A callback, not
        a Deferred: this runs for every relay across nodes.
        """

    def health():
        """
        A dict for ``/api/health``: ``registry``, ``node``, ``since`` and
        ``redis``, one of ``starting`` (not registered yet), ``connected``,
        ``disconnected``.
        """

    def attach(local):
        """
        Use ``local`` (an :class:`ILocalPeers`: this process's connections)
        to deliver what other nodes send to its peers, and to register its
        peers again after Redis was lost.
        """


class ILocalPeers(Interface):
    """The peers connected to this process, as a cluster registry needs them."""

    def deliver_local(to, frame):
        """Send ``frame`` to ``to`` if it is connected here; return whether it was."""

    def local_peers():
        """``(id, ip, connected_at, conn)`` of every open connection here."""

    def evict(peer_id, conn):
        """
        ``peer_id`` resumed on another connection: close ``conn`` here, if it
        still holds it, without ending the session.
        """

    def forget_links():
        """
        Check every relay through the registry again: what it said about
        which peers are paired may no longer hold (this node lost Redis, or
        was re-registered after being taken for dead).
        """


@implementer(IRegistry)
class Registry:
    """The in-memory registry of one server process."""

    def __init__(self, clock):
        """
        :param clock: anything with a ``seconds()`` method (the reactor, or
            ``twisted.internet.task.Clock`` in tests).
        """
        self._clock = clock
        self._peers: Dict[str, Peer] = {}
        # target id -> ids of the users whose target it is (reverse index,
        # so that a departure finds its watchers without a scan)
        self._pointing: Dict[str, Set[str]] = {}
        #: counts the changes the stats show (users, states, targets, online):
        #: the same generation, the same stats document
        self.generation = 0

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, peer_id) -> bool:
        return peer_id in self._peers

    def get(self, peer_id: str) -> Optional[Peer]:
        return self._peers.get(peer_id)

    # -- membership ---------------------------------------------------------

    def add(self, peer_id: str, ip: str, conn: str = "") -> Peer:
        if peer_id in self._peers:
            raise PeerIdTaken(peer_id)
        peer = Peer(peer_id, ip, self._clock.seconds())
        self._peers[peer_id] = peer
        self.generation += 1
        return peer

    def remove(self, peer_id: str, conn: str = "") -> List[Transition]:
        peer = self._peers.pop(peer_id, None)
        if peer is None:
            return []
        self.generation += 1
        if peer.target is not None:
            self._unpoint(peer.id, peer.target)
        transitions = []
        for watcher_id in sorted(self._pointing.pop(peer_id, ())):
            watcher = self._peers[watcher_id]
            transitions.append(Transition(watcher_id, watcher.state, IDLE, None))
            watcher.state = IDLE
            watcher.target = None
        return transitions

    def set_online(self, peer_id: str, online: bool) -> None:
        """Show a user online, or offline while it is in its grace period."""
        peer = self._peers.get(peer_id)
        if peer is not None and peer.online != online:
            peer.online = online
            self.generation += 1

    # -- pairing rules ------------------------------------------------------

    def ping(self, sender: str, to: str) -> List[Transition]:
        a, b = self._pair(sender, to)
        if a.state == CONNECTED:
            if a.target == b.id:
                return []  # liveness check between partners
            raise refusal("connected-elsewhere")
        if b.state == CONNECTED:
            raise refusal("peer-busy")
        if a.state == CONNECTING and a.target == b.id:
            return []  # repeated ping while waiting: nothing changes
        return [self._set(a, CONNECTING, b.id)]

    def pong(self, sender: str, to: str) -> List[Transition]:
        b, a = self._pair(sender, to)
        if b.state == CONNECTED and b.target == a.id:
            return []  # liveness check between partners
        if a.state == CONNECTING and a.target == b.id and b.state != CONNECTED:
            return [self._set(a, CONNECTED, b.id), self._set(b, CONNECTED, a.id)]
        raise refusal("not-waiting")

    def check_paired(self, sender: str, to: str) -> List[Transition]:
        a, b = self._pair(sender, to)
        if not (a.state == CONNECTED and a.target == b.id):
            raise refusal("not-paired")
        return []

    def disconnect(self, sender: str, to: str) -> List[Transition]:
        a, b = self._pair(sender, to)
        if a.target != b.id:
            raise refusal("not-pointing")
        transitions = [self._set(a, IDLE, None)]
        if b.target == a.id:
            transitions.append(self._set(b, IDLE, None))
        return transitions

    # -- views --------------------------------------------------------------

    def peers(self) -> List[Peer]:
        return list(self._peers.values())

    def summary(self) -> Dict[str, int]:
        counts = {IDLE: 0, CONNECTING: 0, CONNECTED: 0}
        offline = 0
        for peer in self._peers.values():
            counts[peer.state] += 1
            offline += not peer.online
        return {
            "users": len(self._peers),
            IDLE: counts[IDLE],
            CONNECTING: counts[CONNECTING],
            CONNECTED: counts[CONNECTED],
            "pairs": counts[CONNECTED] // 2,
            "offline": offline,
        }

    # -- internals ----------------------------------------------------------

    def _pair(self, sender: str, to: str):
        a = self._peers.get(sender)
        if a is None:
            raise refusal("not-registered")
        if to == sender:
            raise refusal("self")
        b = self._peers.get(to)
        if b is None:
            raise refusal("no-such-peer")
        return a, b

    def _set(self, peer: Peer, state: str, target: Optional[str]) -> Transition:
        old = peer.state
        self.generation += 1
        if peer.target != target:
            if peer.target is not None:
                self._unpoint(peer.id, peer.target)
            if target is not None:
                self._pointing.setdefault(target, set()).add(peer.id)
        peer.state = state
        peer.target = target
        return Transition(peer.id, old, state, target)

    def _unpoint(self, peer_id: str, target: str) -> None:
        watchers = self._pointing.get(target)
        if watchers is not None:
            watchers.discard(peer_id)
            if not watchers:
                del self._pointing[target]
