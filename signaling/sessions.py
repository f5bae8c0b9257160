"""
Sessions that outlive their socket: a peer whose WebSocket was lost without
a close frame from it keeps its id, state and partner for a grace period,
what is sent to it meanwhile waits in a bounded queue, and a new connection
with its resume token takes it all back (``docs/protocol.rst``, "Resume").

:class:`ISessions` (declared in :mod:`signaling.registry`) is what the
factory asks of them; :class:`LocalSessions`
keeps them in this process, over the in-memory registry.  With ``--redis``
the registry provides :class:`ISessions` itself and the sessions live in
Redis, so that a peer may resume on any node.
"""

from collections import deque
from typing import Callable, Deque, Dict, Optional

from zope.interface import implementer

from signaling.errors import PeerIdTaken
from signaling.registry import MOVED, NEW, RESUMED, ISessions, Outcome, Registry

__all__ = ["ISessions", "LocalSessions", "MOVED", "NEW", "RESUMED", "Session"]


class Session:
    """A peer in its grace period."""

    __slots__ = ("peer_id", "ip", "queue", "size", "timer")

    def __init__(self, peer_id: str, ip: str, timer):
        self.peer_id = peer_id
        self.ip = ip
        self.queue: Deque[bytes] = deque()
        self.size = 0  # bytes in the queue
        self.timer = timer


@implementer(ISessions)
class LocalSessions:
    """
    The peers in grace of this process (the in-memory registry), each with
    its queue and the timer that ends it.  Pure: a clock (``callLater``) is
    injected.

    :param registry: the in-memory :class:`~signaling.registry.Registry`.
    :param clock: ``callLater``.
    :param grace: seconds a peer stays in grace.
    :param limit: frames queued for one peer at most.
    :param max_bytes: bytes queued for one peer at most.
    :param expire: called with the :class:`Session` when its grace period
        ends (it then removes the peer from the registry).
    """

    def __init__(self, registry: Registry, clock, grace: float, limit: int, max_bytes: int,
                 expire: Callable[[Session], object]):
        self._registry = registry
        self._clock = clock
        self.grace = grace
        self.limit = limit
        self.max_bytes = max_bytes
        self._expire = expire
        self._sessions: Dict[str, Session] = {}

    def __contains__(self, peer_id) -> bool:
        return peer_id in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)

    def suspend(self, peer_id: str, conn: str, ip: str) -> None:
        previous = self._sessions.pop(peer_id, None)
        if previous is not None and previous.timer.active():
            previous.timer.cancel()
        self._sessions[peer_id] = Session(peer_id, ip, self._clock.callLater(self.grace, self._ended, peer_id))
        self._set_online(peer_id, False)

    def hold(self, peer_id: str, frame: bytes) -> Optional[bool]:
        """
        Queue ``frame`` for ``peer_id`` if it is in grace: True, or False if
        its queue is full (``limit`` frames, or ``max_bytes``); None if it
        is not in grace here.
        """
        session = self._sessions.get(peer_id)
        if session is None:
            return None
        if len(session.queue) >= self.limit or session.size + len(frame) > self.max_bytes:
            return False
        session.queue.append(frame)
        session.size += len(frame)
        return True

    def resume(self, peer_id: str, ip: str, at: float, conn: str) -> Outcome:
        session = self._sessions.pop(peer_id, None)
        if session is not None:
            if session.timer.active():
                session.timer.cancel()
            self._set_online(peer_id, True)
            return RESUMED, list(session.queue)
        try:
            self._registry.add(peer_id, ip)
        except PeerIdTaken:
            return None
        return NEW, []

    def end(self, peer_id: str) -> bool:
        """End ``peer_id``'s grace period now, as if it had run out; False if it is not in grace here."""
        session = self._sessions.get(peer_id)
        if session is None:
            return False
        if session.timer.active():
            session.timer.cancel()
        self._ended(peer_id)
        return True

    def _set_online(self, peer_id: str, online: bool) -> None:
        self._registry.set_online(peer_id, online)

    def _ended(self, peer_id: str) -> None:
        session = self._sessions.pop(peer_id, None)
        if session is not None:
            self._expire(session)
