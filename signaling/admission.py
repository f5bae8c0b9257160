"""
Who may open a WebSocket: client addresses behind trusted proxies, Origin
allow-lists, bearer tokens.  Pure functions, no network code.
"""

import fnmatch
import ipaddress
from typing import Optional


def host_of(address) -> str:
    """The address of a Twisted IAddress, IPv4-mapped IPv6 shown as IPv4."""
    host = getattr(address, "host", None)
    if host is None:
        return str(address)
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:") :]
    return host


def _trusted(host: str, networks) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def client_address(peer: str, forwarded_for: Optional[str], trusted_proxies) -> str:
    """
    The client's address: the TCP peer, or, when the peer is a trusted
    proxy, the nearest address in ``X-Forwarded-For`` that is not one.
    """
    if not trusted_proxies or not forwarded_for or not _trusted(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted_proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage in the header: believe only the socket
    return hops[0] if hops else peer


def origin_allowed(origin: Optional[str], allowed) -> bool:
    """Whether a browser's Origin may connect (no Origin header: not a browser, allowed)."""
    if not allowed or origin is None:
        return True
    origin = origin.lower()
    return any(fnmatch.fnmatchcase(origin, pattern.lower()) for pattern in allowed)


def bearer(header: Optional[str]) -> Optional[str]:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None
