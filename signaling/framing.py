"""
The WebSocket framing the fast path needs (RFC 6455): unmasking client
frames and building server text frames.  (Writing them with as little
reactor work as possible, and measuring what waits unsent: ``_tcp``.)
"""

import struct
from typing import Dict

#: words -> the integer whose every 32-bit word is 1, for frames up to 1 KiB:
#: multiplied by the mask, it is the mask repeated over the whole frame
#: (filled as lengths are met; at most 256 entries, 128 KiB)
_ONES: Dict[int, int] = {}
_ONES_WORDS = 256


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` repeated (RFC 6455, 5.3), as one big integer."""
    n = len(payload)
    words = (n + 3) >> 2
    if words <= _ONES_WORDS:
        ones = _ONES.get(words)
        if ones is None:
            ones = _ONES[words] = int.from_bytes(b"\x01\x00\x00\x00" * words, "little")
        key = int.from_bytes(mask, "little") * ones  # (a multiplication is cheaper than building the bytes)
    else:
        key = int.from_bytes(mask * words, "little")
    return (int.from_bytes(payload, "little") ^ key).to_bytes(words << 2, "little")[:n]


def text_frame(payload: bytes) -> bytes:
    """A single unmasked text frame (FIN, opcode 1), as a server sends it."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload
