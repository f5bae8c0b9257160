"""
A reactor for the signaling server: Twisted's epoll reactor, with less
work per event.  Chosen with twistd's own option, before the plugin name::

    twistd -n -r signaling-epoll signaling --ws=tcp:8080

(``twisted/plugins/signaling_reactor.py`` names it; ``twistd
--help-reactors`` lists it.)  Without ``-r`` the server runs on Twisted's
default reactor, unchanged.  Two differences from ``epoll``:

- No logging context per event.  Twisted wraps the handling of every
  socket event in one (``log.callWithLogger``: a context pushed and popped,
  and the selectable's ``logPrefix()``), which only legacy
  ``twisted.python.log`` calls made meanwhile read, to prefix their lines
  with the connection's name.  This server logs with ``twisted.logger``,
  which never reads it.  An exception escaping a handler is still logged
  within the connection's context, as Twisted does.
- Connected TCP connections (accepted ones, and outgoing ones such as a
  cluster node's connections to Redis) write without a round trip through
  epoll.
  When Twisted's ``transport.write`` has data for the socket it asks the
  reactor to watch for the socket being writable (``addWriter``: an
  ``epoll_ctl``), writes when the next poll says so, and stops watching
  (another ``epoll_ctl``).  Here such a connection is first tried at the
  end of the current reactor turn (after the events of its poll; for a
  write made by a timed call, after a poll that does not wait), as if the
  poll had said so: on a socket with room (nearly always) the data goes out
  and epoll is never involved; only what the socket does not take waits
  for writability, the usual way.  This is how Node (libuv) writes, and it
  is what every connect's opening handshake answer, keepalive pings and
  close frames go through.

Everything else is Twisted's: events are handled with the same decisions
as its ``_doReadOrWrite``; other writers (pipes, UNIX sockets, an
outgoing connection still connecting, which learns from writability that
it connected) register as always.  Every non-public name of Twisted this relies on
(``_poller``, ``_selectables``, ``_reads``, ``_writes``,
``_disconnectSelectable``, ``posixbase._NO_FILEDESC``) is checked against
the installed Twisted by ``tests/test_reactor.py``.  Measured in
docs/performance.rst ("Against PeerJS server (Node)").
"""

import errno
import sys
from errno import EWOULDBLOCK
from select import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT

from twisted.internet import epollreactor, posixbase, tcp
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST, installReactor
from twisted.python import log

_NO_FILEDESC = posixbase._NO_FILEDESC
_TCP_SERVER = tcp.Server
#: the connections whose writes are tried at the end of the turn: accepted ones, and outgoing
#: TCP ones once connected (a cluster node's Redis connections)
_TRIED = (tcp.Server, tcp.Client)
_DISCONNECTED = EPOLLHUP | EPOLLERR


class SignalingReactor(epollreactor.EPollReactor):
    """Twisted's epoll reactor, without a logging context per event, trying writes before watching for them."""

    def __init__(self):
        super().__init__()
        # accepted connections with data to write, tried at the end of the turn (dict: insertion order)
        self._to_try = {}
        self._trying = None  # the writer being tried now
        self._tried_all = False  # it wrote everything (it stopped writing)

    # -- writes ---------------------------------------------------------------------

    def addWriter(self, writer):
        """Watch ``writer`` for writability: a connected TCP connection is first tried, at the end of the turn."""
        if type(writer) in _TRIED and writer.connected and writer is not self._trying:
            if writer.fileno() not in self._writes:  # (else epoll watches it already: the socket was full)
                self._to_try[writer] = None
            return
        super().addWriter(writer)

    def removeWriter(self, writer):
        if writer is self._trying:
            self._tried_all = True
        if self._to_try:
            self._to_try.pop(writer, None)
        super().removeWriter(writer)

    def getWriters(self):
        return super().getWriters() + list(self._to_try)

    def removeAll(self):
        waiting = list(self._to_try)
        self._to_try.clear()
        removed = super().removeAll()
        return removed + [w for w in waiting if w not in removed]

    def _try_writes(self):
        """Write for the connections that asked since the last time; watch the ones the socket did not take in full."""
        writers, self._to_try = self._to_try, {}
        for writer in writers:
            self._trying, self._tried_all = writer, False
            try:
                if writer.fileno() == -1:
                    why = _NO_FILEDESC
                else:
                    why = writer.doWrite()
            except BaseException:
                why = sys.exc_info()[1]
                log.callWithLogger(writer, log.err)
            finally:
                self._trying = None
            if why:
                self._disconnectSelectable(writer, why, False)
            elif not self._tried_all:  # data left over: wait for the socket to be writable
                super().addWriter(writer)

    # -- the turn -------------------------------------------------------------------

    def doPoll(self, timeout):
        """Twisted's ``doPoll``, then the writes asked for meanwhile (and before, by timed calls: without waiting)."""
        if self._to_try:
            timeout = 0
        if timeout is None:
            timeout = -1  # wait until something happens
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        reads = self._reads
        dispatch = self._dispatch
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event == EPOLLIN and type(selectable) is _TCP_SERVER and fd in reads:
                # the commonest event, an accepted connection (still reading)
                # with data: tcp.Connection.doRead and _dataReceived, inline
                try:
                    data = selectable.socket.recv(selectable.bufferSize)
                except OSError as e:
                    if e.args[0] != EWOULDBLOCK:
                        self._disconnectSelectable(selectable, CONNECTION_LOST, True)
                    continue
                if not data:
                    self._disconnectSelectable(selectable, CONNECTION_DONE, True)
                    continue
                try:
                    selectable.protocol.dataReceived(data)
                except BaseException:
                    why = sys.exc_info()[1]
                    log.callWithLogger(selectable, log.err)
                    self._disconnectSelectable(selectable, why, True)
                continue
            dispatch(selectable, fd, event)
        if self._to_try:
            self._try_writes()

    doIteration = doPoll

    def _dispatch(self, selectable, fd, event):
        """Handle one event: what Twisted's ``_doReadOrWrite`` does, without the logging context."""
        why = None
        in_read = False
        if event & _DISCONNECTED and not event & EPOLLIN:
            # a hang-up or an error, with all the input read
            if fd in self._reads:
                in_read = True  # a clean end (or a half-close)
                why = CONNECTION_DONE
            else:
                why = CONNECTION_LOST
        else:
            try:
                if selectable.fileno() == -1:  # (closed under our feet: Twisted's check)
                    why = _NO_FILEDESC
                else:
                    if event & EPOLLIN:
                        why = selectable.doRead()
                        in_read = True
                    if not why and event & EPOLLOUT:
                        why = selectable.doWrite()
                        in_read = False
            except BaseException:
                why = sys.exc_info()[1]
                log.callWithLogger(selectable, log.err)
        if why:
            self._disconnectSelectable(selectable, why, in_read)


def install():
    """Install the reactor (what ``twistd -r signaling-epoll`` calls)."""
    reactor = SignalingReactor()
    installReactor(reactor)
    return reactor


__all__ = ["SignalingReactor", "install"]
