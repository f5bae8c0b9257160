"""
Limits, pure and on an injected clock: the per-connection token bucket,
connection counts per address, and budgets for log lines.
"""

import ipaddress
from collections import OrderedDict
from typing import Dict, Optional


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


def address_key(address: str, ipv6_prefix: int = 64) -> Optional[str]:
    """
    What per-address limits count by: an IPv4 address as such, an IPv6
    address by its ``/ipv6_prefix`` network (one subscriber usually holds a
    whole /64, so counting single IPv6 addresses would not limit anyone),
    nothing (None) for the clients of a UNIX socket, which are all on this
    machine and have no address to tell them apart (the total caps still
    count them), anything else as given.
    """
    if address == "unix":
        return None
    if ":" not in address:
        return address  # IPv4 (or not an IP address at all): itself
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ipv6_prefix < 128:
        return str(ipaddress.ip_network((ip, ipv6_prefix), strict=False))
    return str(ip)


class ConnectionCounts:
    """
    Connections at once, in total and per address key, against two caps.
    ``add`` says why a connection is refused (and counts nothing), or
    counts it; ``remove`` uncounts it.
    """

    __slots__ = ("max_total", "max_per_key", "total", "per_key")

    def __init__(self, max_total: int, max_per_key: int):
        self.max_total = max_total
        self.max_per_key = max_per_key
        self.total = 0
        self.per_key: Dict[str, int] = {}

    def refusal(self, key: Optional[str]) -> Optional[str]:
        """``"total"`` or ``"address"`` if one more connection (from ``key``) is over a cap, else None."""
        if self.total >= self.max_total:
            return "total"
        if key is not None and self.per_key.get(key, 0) >= self.max_per_key:
            return "address"
        return None

    def add(self, key: Optional[str]) -> Optional[str]:
        refused = self.refusal(key)
        if refused is None:
            self.total += 1
            if key is not None:
                self.per_key[key] = self.per_key.get(key, 0) + 1
        return refused

    def add_key(self, key: str) -> bool:
        """Count under ``key`` a connection already counted in the total; False if over the per-key cap."""
        if self.per_key.get(key, 0) >= self.max_per_key:
            return False
        self.per_key[key] = self.per_key.get(key, 0) + 1
        return True

    def remove(self, key: Optional[str]) -> None:
        self.total -= 1
        if key is not None:
            self.remove_key(key)

    def remove_key(self, key: str) -> None:
        left = self.per_key[key] - 1
        if left:
            self.per_key[key] = left
        else:
            del self.per_key[key]


class LogBudget:
    """
    Log lines about one source (a peer, or a kind of refusal): at most
    ``lines`` per ``interval`` seconds.  What is held back is counted by
    kind and handed to ``report`` (as ``"3 rate-limited, 1 invalid-json"``)
    when the interval ends, or at :meth:`close`.  A flood then costs a few
    lines per interval, not one per message.
    """

    __slots__ = ("_clock", "_report", "lines", "interval", "_start", "_used", "held", "_call")

    def __init__(self, clock, report, lines: int = 5, interval: float = 10.0):
        self._clock = clock
        self._report = report
        self.lines = lines
        self.interval = interval
        self._start = clock.seconds()
        self._used = 0
        self.held: Dict[str, int] = {}  # kind -> lines held back since the last report
        self._call = None

    def allow(self, kind: str) -> bool:
        """Whether a line of this ``kind`` may be logged now; if not, it is counted."""
        now = self._clock.seconds()
        if now - self._start >= self.interval:
            self._start = now
            self._used = 0
        if self._used < self.lines:
            self._used += 1
            return True
        self.held[kind] = self.held.get(kind, 0) + 1
        if self._call is None:
            self._call = self._clock.callLater(max(0.0, self._start + self.interval - now), self._flush)
        return False

    def _flush(self) -> None:
        self._call = None
        if self.held:
            held, self.held = self.held, {}
            self._report(", ".join(f"{n} {kind}" for kind, n in sorted(held.items(), key=lambda kv: (-kv[1], kv[0]))))

    def close(self) -> None:
        """Report what is held now, and stop."""
        if self._call is not None:
            self._call.cancel()
        self._flush()


class AddressBuckets:
    """
    A token bucket per address key (requests from one client), for an
    endpoint that must not be hammered.  At most ``max_keys`` buckets are
    kept: past that the longest unused one is forgotten (an address that
    comes back starts full, as one that waited would).
    """

    def __init__(self, clock, rate: float, burst: int, max_keys: int = 10000):
        self._clock = clock
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: "OrderedDict[str, TokenBucket]" = OrderedDict()

    def take(self, key: str) -> bool:
        """Spend one of ``key``'s tokens; False if it has none left."""
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self._clock, self.rate, self.burst)
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
        self._buckets[key] = bucket  # now the most recently used
        return bucket.take()

    def __len__(self) -> int:
        return len(self._buckets)


class Pacer:
    """
    Paces requests per address key instead of refusing them: ``rate`` a
    second on average, ``burst`` at once; :meth:`delay` gives each request
    its turn (the generic cell rate algorithm: first come, first served,
    nothing queued but a time per key).  ``rate <= 0`` paces nothing.  At
    most ``max_keys`` keys are kept (past that the longest unused one is
    forgotten: an address that comes back may burst again, as one that
    waited would).
    """

    def __init__(self, clock, rate: float, burst: int, max_keys: int = 10000):
        self._clock = clock
        self.rate = rate
        self.burst = max(1, burst)
        self.max_keys = max_keys
        self._due: "OrderedDict[str, float]" = OrderedDict()  # key -> when its bucket is next empty

    def delay(self, key: str) -> float:
        """Take a turn for ``key``: the seconds to wait before answering (0: at once)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock.seconds()
        step = 1.0 / self.rate
        due = max(self._due.pop(key, now), now)
        if len(self._due) >= self.max_keys:
            self._due.popitem(last=False)
        self._due[key] = due + step
        return max(0.0, due - (self.burst - 1) * step - now)

    def __len__(self) -> int:
        return len(self._due)
