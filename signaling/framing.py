"""
The WebSocket framing the fast path needs (RFC 6455): unmasking client
frames and building server text frames.  (Writing them with as little
reactor work as possible, and measuring what waits unsent: ``_tcp``.)
"""

import struct


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
