"""The tunables of the WebSocket side, in one frozen value (``signaling.tap.Options`` documents each)."""

from typing import Optional

import attr


@attr.s(frozen=True, auto_attribs=True)
class Settings:
    """Tunables of the WebSocket side; ``signaling.tap.Options`` documents each."""

    max_message_size: int = 256 * 1024
    ping_interval: float = 20.0
    ping_timeout: float = 10.0
    handshake_timeout: float = 10.0
    close_timeout: float = 2.0
    rate: float = 50.0
    burst: int = 100
    #: rate-limited frames (net of those let through since) at which the peer is closed (1008)
    flood_strikes: int = 100
    drain_timeout: float = 5.0
    #: open (or opening, from the first byte) WebSockets allowed in total, and per client address
    max_connections: int = 20000
    max_connections_per_ip: int = 1000
    #: IPv6 clients are counted per network of this prefix length
    ipv6_prefix: int = 64
    #: bytes of an opening handshake (request line and headers)
    max_handshake: int = 16384
    #: frames (the first and its continuations) one message may arrive in
    max_fragments: int = 64
    #: frames of one connection handled per reactor turn; the rest wait for a later turn
    frames_per_turn: int = 8
    #: seconds per reactor turn spent on connections that had frames left over
    held_slice: float = 0.005
    #: bytes queued for a peer that does not read before it is dropped
    max_outbound: int = 1024 * 1024
    #: allowed Origin values (exact, or fnmatch patterns); empty: any
    allowed_origins: tuple = ()
    #: HMAC secret for access tokens; None: no token needed
    token_secret: Optional[bytes] = attr.ib(default=None, repr=False)
    #: the longest a token may still be valid for when presented, in seconds
    token_max_lifetime: float = 86400.0
    #: seconds a peer whose socket was lost keeps its id, state and partner (0: none, as v1)
    resume_grace: float = 15.0
    #: messages queued for a peer in its grace period
    resume_queue: int = 256
    #: HMAC secret of resume tokens; None: no resume tokens
    resume_secret: Optional[bytes] = attr.ib(default=None, repr=False)
    #: networks of reverse proxies whose X-Forwarded-For is believed
    trusted_proxies: tuple = ()
    #: log one line per relayed message (type, from, to, size)
    log_relays: bool = True
