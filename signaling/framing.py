"""
The WebSocket framing the fast path needs (RFC 6455): unmasking client
frames, building server text frames, writing them with as little reactor
work as possible, and measuring what waits unsent.
"""

import struct

from twisted.internet import tcp


def unsent_bytes(transport) -> int:
    """
    Bytes written to ``transport`` that the kernel has not taken yet.
    (Reads Twisted's FileDescriptor buffer; looks through a TLS wrapper.)
    """
    for _ in range(3):
        pending = getattr(transport, "_tempDataLen", None)
        if pending is not None:
            return len(transport.dataBuffer) - transport.offset + pending
        transport = getattr(transport, "transport", None)
        if transport is None:
            break
    return 0


def unmask(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    key = int.from_bytes((mask * ((n >> 2) + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def text_frame(payload: bytes) -> bytes:
    """A single unmasked text frame (FIN, opcode 1), as a server sends it."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


def write(transport, data: bytes) -> bool:
    """
    Write to a transport, trying the socket at once when nothing is queued
    on a plain TCP connection: that saves Twisted's register-for-writable
    round trip through the reactor (two epoll_ctl calls and a wakeup) per
    message.  Anything not sent at once goes through ``transport.write``.
    Return whether the socket took all of it (then nothing waits unsent).
    """
    if (
        type(transport) is tcp.Server
        and not transport.dataBuffer
        and not transport._tempDataBuffer
        and transport.connected
        and not transport.disconnecting
        and transport.producer is None
    ):
        written = transport.writeSomeData(data)
        if isinstance(written, int):
            if written == len(data):
                return True
            data = data[written:]
    transport.write(data)
    return False
