"""
ICE servers for clients: STUN URIs, and TURN URIs with short-lived
credentials in the scheme coturn checks with ``use-auth-secret`` (the "TURN
REST API"): username ``"<expiry unix seconds>:<user>"``, password the padded
base64 of HMAC-SHA1(shared secret, username).  Pure: a clock is injected.

``docs/turn.rst`` shows coturn configured to match.
"""

import base64
import hashlib
import hmac
import os
import re
import stat
from typing import Dict, List, Optional, Sequence

#: the TTLs a deployment may choose, in seconds
MIN_TTL, MAX_TTL = 60, 7 * 86400

# RFC 7064 (stun:, stuns:) and RFC 7065 (turn:, turns:): scheme, host (a name,
# an IPv4 address or a bracketed IPv6 one), optional port, and for TURN an
# optional ?transport=udp|tcp.
_URI = re.compile(
    r"(?P<scheme>stuns?|turns?):"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)"
    r"(?::(?P<port>[0-9]{1,5}))?"
    r"(?:\?transport=(?P<transport>udp|tcp))?"
)


def check_uri(uri: str, kinds: Sequence[str]) -> str:
    """
    ``uri`` if it is a valid STUN/TURN URI of one of ``kinds`` (schemes);
    else ValueError saying what is wrong.
    """
    m = _URI.fullmatch(uri)
    if m is None or m.group("scheme") not in kinds:
        raise ValueError(f"not a {' or '.join(k + ':' for k in kinds)} URI: {uri!r}")
    if m.group("port") is not None and not 0 < int(m.group("port")) < 65536:
        raise ValueError(f"port out of range in {uri!r}")
    if m.group("transport") and not m.group("scheme").startswith("turn"):
        raise ValueError(f"only TURN URIs take ?transport=: {uri!r}")
    return uri


def read_secrets(path: str) -> List[bytes]:
    """
    The shared secrets in a file, one per line (the first one signs; keep
    the previous one on the next line while coturn still accepts it).
    Refuses a file others can read, and a file with no secret.
    """
    mode = os.stat(path).st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ValueError(f"{path} can be read or written by anyone: chmod o-rwx it")
    with open(path, "rb") as f:
        secrets = [line.strip() for line in f.read().splitlines() if line.strip()]
    if not secrets:
        raise ValueError(f"{path} holds no secret")
    return secrets


def credential(secret: bytes, username: str) -> str:
    """The password coturn expects for ``username``: padded base64 of HMAC-SHA1."""
    digest = hmac.new(secret, username.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


class IceServers:
    """
    What clients get to configure ``RTCPeerConnection``: a list of
    ``RTCIceServer`` dictionaries, STUN URIs in one entry and TURN URIs in
    another with credentials for one user, valid for ``ttl`` seconds.

    :param clock: ``seconds()``.
    :param secrets: the shared secrets (the first one signs); required with
        TURN URIs.
    """

    def __init__(self, clock, stun: Sequence[str] = (), turn: Sequence[str] = (),
                 secrets: Sequence[bytes] = (), ttl: int = 86400):
        if turn and not secrets:
            raise ValueError("TURN URIs need a shared secret")
        self._clock = clock
        self.stun = list(stun)
        self.turn = list(turn)
        self._secret: Optional[bytes] = secrets[0] if secrets else None
        self.ttl = ttl

    def __bool__(self) -> bool:
        return bool(self.stun or self.turn)

    def for_user(self, user: str) -> List[Dict]:
        """The list for ``user`` (a peer id): empty when nothing is configured."""
        servers: List[Dict] = []
        if self.stun:
            servers.append({"urls": list(self.stun)})
        if self.turn and self._secret is not None:
            username = f"{int(self._clock.seconds()) + self.ttl}:{user}"
            servers.append({"urls": list(self.turn), "username": username,
                            "credential": credential(self._secret, username)})
        return servers


#: nothing configured: every list is empty
NO_ICE_SERVERS = IceServers(clock=None)
