"""
Who may open a WebSocket (or get ICE servers): client addresses behind
trusted proxies, Origin allow-lists, bearer tokens.  Pure functions, no
network code.
"""

import fnmatch
import ipaddress
from typing import Optional

from twisted.internet.address import UNIXAddress

from signaling.tokens import TokenError, verify_token


def normal_ip(text: str) -> Optional[str]:
    """
    An address in one canonical form, or None if it is not an IP address:
    whitespace and an IPv6 zone (``%eth0``) dropped, IPv4-mapped IPv6 shown
    as IPv4, IPv6 compressed and lower case.
    """
    text = text.strip()
    if "%" in text:
        text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


#: what a client connected through a UNIX socket is called (its address has no name)
UNIX_PEER = "unix"


def host_of(address) -> str:
    """
    The address of a Twisted IAddress, in :func:`normal_ip` form when it is
    an IP address; ``"unix"`` for a client of a UNIX socket.
    """
    host = getattr(address, "host", None)
    if host is None:
        return UNIX_PEER if isinstance(address, UNIXAddress) else str(address)
    if ":" not in host:
        return host  # IPv4 from the kernel: already in its one form
    return normal_ip(host) or host


def _trusted(host: str, networks) -> bool:
    if host == UNIX_PEER:
        return UNIX_PEER in networks  # (--trusted-proxy=unix)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks if not isinstance(network, str))


def is_trusted_proxy(peer: str, trusted_proxies) -> bool:
    return bool(trusted_proxies) and _trusted(peer, trusted_proxies)


def client_address(peer: str, forwarded_for: Optional[str], trusted_proxies) -> str:
    """
    The client's address: the TCP peer, or, when the peer is a trusted
    proxy, the nearest address in ``X-Forwarded-For`` that is not one
    (normalized by :func:`normal_ip`).  Anything in the header that is not
    an IP address makes the proxy's own address count instead.
    """
    if not forwarded_for or not is_trusted_proxy(peer, trusted_proxies):
        return peer
    hops = [normal_ip(hop) for hop in forwarded_for[:4096].split(",")]
    for hop in reversed(hops):
        if hop is None:
            return peer  # garbage in the header: believe only the socket
        if not _trusted(hop, trusted_proxies):
            return hop
    return hops[0] or peer  # every hop a trusted proxy: the farthest one


def origin_allowed(origin: Optional[str], allowed) -> bool:
    """
    Whether a browser's Origin may connect.  No Origin header (Autobahn
    hands an empty string then) means a client that is not a browser: the
    check protects browsers' users, and such a client could send any Origin
    it liked, so it is allowed.
    """
    if not allowed or not origin:
        return True
    origin = origin.lower()
    return any(fnmatch.fnmatchcase(origin, pattern.lower()) for pattern in allowed)


def bearer(header: Optional[str]) -> Optional[str]:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


class Refused(Exception):
    """A request that may not proceed: the HTTP ``status`` and ``reason`` to answer with."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


def request_token(query_token: Optional[str], authorization: Optional[str]) -> Optional[str]:
    """The access token a request presents: ``?token=``, else ``Authorization: Bearer``."""
    return query_token or bearer(authorization)


def authorize(settings, origin: Optional[str], token: Optional[str], now: float) -> Optional[dict]:
    """
    The Origin and access-token rules that the WebSocket handshake and
    ``/api/ice-servers`` share: the token's claims (None when no token is
    required), or :class:`Refused` with 403 or 401.

    :param settings: ``allowed_origins``, ``token_secret``, ``token_max_lifetime``.
    """
    if not origin_allowed(origin, settings.allowed_origins):
        raise Refused(403, "origin not allowed")
    if settings.token_secret is None:
        return None
    if not token:
        raise Refused(401, "access token required")
    try:
        return verify_token(settings.token_secret, token, now, settings.token_max_lifetime)
    except TokenError as e:
        raise Refused(401, str(e)) from None
