"""Per-connection rate limiting: a token bucket on an injected clock."""


class TokenBucket:
    """
    Allow ``rate`` events per second on average, and bursts of up to
    ``burst`` events.  ``rate <= 0`` disables the limit.
    """

    __slots__ = ("_clock", "rate", "burst", "_tokens", "_stamp")

    def __init__(self, clock, rate: float, burst: float):
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = clock.seconds()

    def take(self) -> bool:
        """Spend one token; return False (and spend nothing) if none is left."""
        if self.rate <= 0:
            return True
        now = self._clock.seconds()
        tokens = self._tokens + (now - self._stamp) * self.rate
        self._stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True
