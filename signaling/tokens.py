"""
Signed access tokens for the WebSocket (``--token-secret-file``).

A token is ``<payload>.<signature>``: the payload is base64url JSON with an
expiry (``exp``, POSIX seconds) and optionally the peer id the holder must
use (``sub``); the signature is base64url HMAC-SHA256 of the payload with
the shared secret.  Tokens are made by the application server that knows the
secret, and checked by the signaling server at the WebSocket handshake.

Make one from Python::

    from signaling.tokens import make_token
    token = make_token(secret, ttl=3600, peer_id="alice")

or from the shell::

    python -m signaling.tokens --secret-file /etc/signaling/secret --ttl 3600 [--peer-id alice]

A token for y-webrtc clients (``/yjs``) may also name the topics (rooms) its
holder may subscribe and publish to: ``topics`` (a list) and/or
``topic_prefix``; a token naming neither allows every topic
(``--topic r1 --topic r2``, ``--topic-prefix team-7/``).

Browsers pass it in the URL: ``ws://host:8080/?token=<token>``; other clients
may send ``Authorization: Bearer <token>`` instead.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import sys
import time
from json.encoder import encode_basestring_ascii
from typing import Any, Dict, List, Optional

from signaling.topics import MAX_TOPIC_LENGTH, valid_topic

#: what a fixed peer id may look like
PEER_ID = re.compile(r"[A-Za-z0-9._~:@+=-]{1,128}")
#: what a token may look like: two base64url parts (anything else is malformed)
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
#: the longest token accepted, in characters
MAX_TOKEN = 2048
#: the most topics a token may list
MAX_TOKEN_TOPICS = 32


class TokenError(Exception):
    """The token is not acceptable; the message says why."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, payload: str) -> str:
    """HMAC-SHA256 of ``payload``, base64url (from a keyed HMAC kept per secret: every welcome signs one)."""
    keyed = _keyed.get(secret)
    if keyed is None:
        if len(_keyed) >= 8:
            _keyed.clear()
        keyed = _keyed[secret] = hmac.new(secret, digestmod=hashlib.sha256)
    mac = keyed.copy()
    mac.update(payload.encode("ascii"))
    return _b64(mac.digest())


_keyed: Dict[bytes, Any] = {}  # secret -> an HMAC keyed with it, copied for each signature


def make_token(secret: bytes, ttl: float, peer_id: Optional[str] = None, now: Optional[float] = None,
               topics: Optional[List[str]] = None, topic_prefix: Optional[str] = None) -> str:
    """
    Make a token valid for ``ttl`` seconds, optionally fixing the holder's
    peer id, and limiting the y-webrtc topics it may use to ``topics``
    and those starting with ``topic_prefix``.
    """
    if not secret:
        raise ValueError("the secret must not be empty")
    if peer_id is not None and not PEER_ID.fullmatch(peer_id):
        raise ValueError("a peer id is 1 to 128 characters of A-Z a-z 0-9 . _ ~ : @ + = -")
    claims: Dict[str, Any] = {"exp": int((time.time() if now is None else now) + ttl)}
    if peer_id is not None:
        claims["sub"] = peer_id
    if topics is not None:
        claims["topics"] = list(topics)
    if topic_prefix is not None:
        claims["topic_prefix"] = topic_prefix
    problem = _topics_problem(claims)
    if problem is not None:
        raise ValueError(problem)
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    token = f"{payload}.{_sign(secret, payload)}"
    if len(token) > MAX_TOKEN:
        raise ValueError(f"the token would be longer than servers accept ({MAX_TOKEN}): fewer or shorter topics")
    return token


def verify_token(secret: bytes, token: str, now: float, max_lifetime: Optional[float] = None) -> dict:
    """
    Check a token's form, signature and expiry; return its claims.  With
    ``max_lifetime``, a token that would stay valid longer than that many
    seconds from ``now`` is refused too.

    :raises TokenError: saying what is wrong (for any input, never another error).
    """
    if not token or len(token) > MAX_TOKEN:
        raise TokenError("missing or oversized token")
    if not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise TokenError("malformed token")
    payload, _, signature = token.partition(".")
    if not hmac.compare_digest(_sign(secret, payload), signature):
        raise TokenError("bad token signature")
    try:
        claims = json.loads(_unb64(payload))
    except ValueError:
        raise TokenError("malformed token payload") from None
    if not isinstance(claims, dict) or type(claims.get("exp")) is not int:
        raise TokenError("token has no expiry")
    if claims["exp"] <= now:
        raise TokenError("token expired")
    if max_lifetime is not None and claims["exp"] - now > max_lifetime:
        raise TokenError("token valid for longer than the server allows")
    sub = claims.get("sub")
    if sub is not None and not (isinstance(sub, str) and PEER_ID.fullmatch(sub)):
        raise TokenError("token has an invalid peer id")
    if _topics_problem(claims) is not None:
        raise TokenError("token has invalid topics")
    return claims


def _topics_problem(claims: dict) -> Optional[str]:
    """What is wrong with a token's ``topics`` and ``topic_prefix`` claims, if anything."""
    topics = claims.get("topics")
    if topics is not None and not (
        type(topics) is list and len(topics) <= MAX_TOKEN_TOPICS and all(valid_topic(t) for t in topics)
    ):
        return f"topics: a list of at most {MAX_TOKEN_TOPICS} topics of 1 to {MAX_TOPIC_LENGTH} printable characters"
    prefix = claims.get("topic_prefix")
    if prefix is not None and not valid_topic(prefix):
        return f"a topic prefix is 1 to {MAX_TOPIC_LENGTH} printable characters"
    return None


def make_resume_token(secret: bytes, peer_id: str) -> str:
    """
    The token a welcome carries so that its peer can take its id back after
    losing its socket (``?resume=``): base64url JSON ``{"rid": id}``, signed
    like an access token (with the resume secret).  It holds no expiry: the
    session it names expires on its own (``--resume-grace``).
    """
    # (what json.dumps({"rid": peer_id}, separators=(",", ":")) writes)
    payload = _b64(('{"rid":' + encode_basestring_ascii(peer_id) + "}").encode("ascii"))
    return f"{payload}.{_sign(secret, payload)}"


def verify_resume_token(secret: bytes, token: str) -> Optional[str]:
    """The peer id a resume token names, or None if it is not one this secret signed."""
    if not token or len(token) > MAX_TOKEN or not isinstance(token, str) or not _TOKEN.fullmatch(token):
        return None
    payload, _, signature = token.partition(".")
    if not hmac.compare_digest(_sign(secret, payload), signature):
        return None
    try:
        claims = json.loads(_unb64(payload))
    except ValueError:
        return None
    peer_id = claims.get("rid") if isinstance(claims, dict) else None
    return peer_id if isinstance(peer_id, str) and PEER_ID.fullmatch(peer_id) else None


def read_secret(path: str) -> bytes:
    """Read a secret file (surrounding whitespace ignored); refuse short secrets."""
    with open(path, "rb") as f:
        secret = f.read().strip()
    if len(secret) < 16:
        raise ValueError(f"{path}: the secret must be at least 16 bytes")
    return secret


def read_or_create_secret(path: str):
    """
    ``(secret, created)``: the secret in ``path``, or a new random one
    written there first (mode 0600) if the file does not exist.
    """
    try:
        return read_secret(path), False
    except FileNotFoundError:
        pass
    secret = base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it meanwhile
        return read_secret(path), False
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    return secret, True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m signaling.tokens", description="Make a signed access token."
    )
    parser.add_argument("--secret-file", required=True, help="file holding the shared secret")
    parser.add_argument("--ttl", type=float, default=3600, help="seconds the token is valid (3600)")
    parser.add_argument("--peer-id", help="fix the peer id the holder gets")
    parser.add_argument("--topic", action="append", dest="topics", metavar="TOPIC",
                        help="y-webrtc (/yjs): a topic (room) the holder may use; repeatable")
    parser.add_argument("--topic-prefix", help="y-webrtc (/yjs): the holder may use the topics starting with this")
    args = parser.parse_args(argv)
    if not 0 < args.ttl < 10 ** 9:  # (refuses nan, inf and negatives)
        parser.error(f"--ttl must be a positive number of seconds, got {args.ttl!r}")
    if args.ttl > 86400:
        print("warning: servers refuse tokens valid for longer than their --token-max-lifetime "
              "(86400 s by default)", file=sys.stderr)
    try:
        print(make_token(read_secret(args.secret_file), args.ttl, args.peer_id,
                         topics=args.topics, topic_prefix=args.topic_prefix))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
