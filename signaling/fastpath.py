"""
The fast path: small, complete, masked, unfragmented text frames taken
straight from what a read delivered, without Autobahn's general frame
machinery (which handles everything else exactly as before).  About a third
of a relay's cost in Autobahn's parser, saved on the frames that make up
nearly all of the traffic; the write side of it is ``signaling.writes``.
"""

from typing import TYPE_CHECKING, Any

from signaling import _compat
from signaling.framing import unmask
from signaling.limits import TokenBucket


class FastPath:
    """
    Mixed into the server protocol, which provides: ``factory.writes``,
    ``maxMessagePayloadSize``, ``state``, the rate limit (``_bucket``,
    ``_strikes``, ``_strike``, ``_rate_limited``), the fairness budget
    (``_budget``), ``_discard`` and ``_handle`` (one message that passed).
    """

    #: take small, complete, masked, unfragmented text frames without
    #: Autobahn's general frame machinery (everything else goes through it)
    fast_path = True

    # provided by the protocol class it is mixed into (declared for type checkers)
    factory: Any
    state: int
    maxMessagePayloadSize: int
    _bucket: TokenBucket
    _strikes: int
    _budget: int
    _discard: bool

    if TYPE_CHECKING:

        def _strike(self) -> None: ...

        def _rate_limited(self) -> None: ...

        def _handle(self, payload: bytes, isBinary: bool) -> None: ...

    def _fast_frames(self, data: bytes) -> bytes:
        """
        Deliver the complete text frames at the start of ``data`` that are
        FIN, unfragmented, masked, without RSV bits, with a 7- or 16-bit
        length within the size limit, and valid UTF-8.  Return the bytes
        from the first frame that is not (or is incomplete) on, for Autobahn,
        which then handles them exactly as it would have.
        """
        self.factory.writes.open()
        pos, end = 0, len(data)
        limit = self.maxMessagePayloadSize
        bucket = self._bucket
        while end - pos >= 6 and data[pos] == 0x81 and self._budget > 0:
            b1 = data[pos + 1]
            if not b1 & 0x80:
                break  # unmasked: a protocol error, Autobahn's to report
            length = b1 & 0x7F
            if length < 126:
                start = pos + 6
            elif length == 126:
                if end - pos < 8:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                if length < 126:
                    break  # not the minimal encoding: a protocol error
                start = pos + 8
            else:
                break  # 64-bit lengths
            if (limit and length > limit) or start + length > end:
                break
            if bucket.take():
                if self._strikes:
                    self._strikes -= 1
            else:  # over the rate limit: dropped unread (not even unmasked)
                self._strike()
                if self._discard:
                    break
                pos = start + length
                self._budget -= 1
                self._rate_limited()
                continue
            payload = unmask(data[start : start + length], data[start - 4 : start])
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                break  # Autobahn fails the connection with 1007
            pos = start + length
            self._budget -= 1
            self._handle(payload, False)
            if self.state != _compat.STATE_OPEN:
                break
        if self._discard:
            return b""
        if not pos:
            return data
        _compat.traffic_seen(self)  # (once a read: what Autobahn does for every frame it reads)
        return data[pos:]
