"""
Socket-level helpers that rely on Twisted's transports beyond their public
interface.  Each says what it relies on; ``tests/test_compat.py`` checks
every assumption against the installed Twisted and fails loudly (rather than
letting a limit quietly stop working) if one no longer holds.
"""

from twisted.internet import tcp


def unsent_bytes(transport) -> int:
    """
    Bytes written to ``transport`` that the kernel has not taken yet (looks
    through a TLS wrapper).  What ``--max-outbound-buffer`` measures.

    Relies on Twisted's ``FileDescriptor`` buffer: ``dataBuffer`` from
    ``offset`` on, plus ``_tempDataLen`` bytes not yet joined into it.
    There is no public way to ask; if these go, the outbound cap would read
    0 and never drop a peer, so the compat test asserts they exist.
    """
    for _ in range(3):
        pending = getattr(transport, "_tempDataLen", None)
        if pending is not None:
            return len(transport.dataBuffer) - transport.offset + pending
        transport = getattr(transport, "transport", None)
        if transport is None:
            break
    return 0


def write(transport, data: bytes) -> bool:
    """
    Write to a transport, trying the socket at once when nothing is queued
    on a plain TCP connection: that saves Twisted's register-for-writable
    round trip through the reactor (two epoll_ctl calls and a wakeup) per
    message.  Anything not sent at once goes through ``transport.write``.
    Return whether the socket took all of it (then nothing waits unsent).

    The socket's ``send`` is called directly (what ``writeSomeData`` does,
    less a memoryview and a wrapper per call); any error (would block, or
    the connection is broken) leaves the data to ``transport.write``, which
    buffers it, and Twisted's own write path meets the error and reports it
    as it always does.

    Relies on ``tcp.Server``'s buffers (``dataBuffer``, ``_tempDataBuffer``),
    its ``connected``/``disconnecting``/``producer`` flags and its
    ``socket``.  If they change, the compat test fails; at worst the fast
    write is skipped (``transport.write`` is always correct).
    """
    if (
        type(transport) is tcp.Server
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and transport.producer is None
    ):
        try:
            written = transport.socket.send(data)
        except OSError:
            written = 0
        if written == len(data):
            return True
        if written:
            data = data[written:]
    transport.write(data)
    return False


def half_close(transport) -> bool:
    """
    End our side of the connection once what is written is out, keep the
    socket (``loseWriteConnection``: TCP transports have it, Twisted's TLS
    wrapper does not); return whether it could.
    """
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is None:
        return False
    lose_write()
    return True
