"""
The whole server as one service: started with its registry's backend first,
stopped gracefully (stop listening, close every WebSocket with 1001, wait a
bounded time), and a periodic summary line.
"""

from typing import Callable

from twisted.application.service import MultiService
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

from signaling import __version__
from signaling.logs import write_lines_per_turn


class SignalingService(MultiService):
    """
    The whole server.  Stopping it stops the listeners first, then closes
    every WebSocket with 1001 and waits at most ``drain_timeout`` for them.
    """

    _log = Logger()
    _flush_log: Callable[[], None] = staticmethod(lambda: None)  # (see _running)

    def __init__(self, factory, drain_timeout: float, reactor, backend=None):
        super().__init__()
        self.factory = factory
        self.drain_timeout = drain_timeout
        self.reactor = reactor
        #: a service the registry needs (Redis connections): started first, stopped last
        self.backend = backend

    def startService(self):
        if self.backend is not None:
            self.backend.startService()
        super().startService()
        # twistd starts services before the reactor runs and installs its
        # signal handlers; "ready" is logged once both are done.  From then
        # on the log's lines are written once a reactor turn (signaling.logs).
        self.reactor.callWhenRunning(self._running)

    def _running(self):
        self._flush_log = write_lines_per_turn(self.reactor)
        self._log.info("signaling {version} ready", version=__version__)

    def stopService(self):
        self._log.info("shutting down: no longer accepting connections")
        d = super().stopService()
        d.addCallback(lambda _: self.factory.shutdown(self.drain_timeout))
        d.addCallback(self._stopped)
        if self.backend is not None:
            d.addCallback(lambda _: self.backend.stopService())
        return d

    def _stopped(self, closed):
        self._log.info(
            "stopped: closed {closed} connections; {users} users left in the registry",
            closed=closed,
            users=len(self.factory.connections),
        )
        self._flush_log()


_summary_log = Logger(namespace="signaling.summary")


def log_summary(registry):
    """Log one line of who is connected."""

    def log(s):
        _summary_log.info(
            "summary: {users} users ({idle} idle, {connecting} connecting, "
            "{connected} connected), {pairs} pairs",
            **s,
        )

    d = maybeDeferred(registry.summary)
    d.addCallbacks(log, lambda f: _summary_log.warn("summary unavailable: {e}", e=f.getErrorMessage()))
