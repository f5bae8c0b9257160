"""
Every error of the wire contract, as a named exception carrying its code,
and the one table of what the pairing rules say when they refuse.

Both registries raise these: the in-memory one directly, the Redis one from
the name its Lua scripts return (``REFUSALS`` is the only place the words
live).  Only the protocol layer turns them into ``{"type": "error", ...}``
replies.
"""

from typing import Optional


class SignalingError(Exception):
    """A message broke a rule of the contract; ``code`` is the wire error code."""

    code = "invalid-message"
    #: the message type that caused the error, if known (set by the caller)
    ref: Optional[str] = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidJSON(SignalingError):
    code = "invalid-json"


class InvalidMessage(SignalingError):
    code = "invalid-message"


class UnknownType(SignalingError):
    code = "unknown-type"


class PeerNotFound(SignalingError):
    code = "peer-not-found"


class PeerBusy(SignalingError):
    code = "peer-busy"


class InvalidState(SignalingError):
    code = "invalid-state"


class RateLimited(SignalingError):
    code = "rate-limited"


class QueueFull(SignalingError):
    """The recipient is in its grace period and its queue is full: the message was not kept."""

    code = "queue-full"


class Unavailable(SignalingError):
    """The shared state of a cluster (Redis) is unreachable: nothing was done; try again."""

    code = "unavailable"


class InternalError(SignalingError):
    code = "internal-error"


class PeerIdTaken(Exception):
    """A peer with that id is already registered (e.g. on another node); not a wire error."""


#: The pairing rules' refusals, by the name the Lua scripts return:
#: name -> (exception, message).
REFUSALS = {
    "not-registered": (PeerNotFound, "you are not registered"),
    "self": (PeerNotFound, "you cannot signal yourself"),
    "no-such-peer": (PeerNotFound, "no connected peer has that id"),
    "connected-elsewhere": (InvalidState, "you are connected to another peer; send disconnect to it first"),
    "peer-busy": (PeerBusy, "that peer is connected to someone else"),
    "not-waiting": (InvalidState, "that peer is not waiting for a pong from you"),
    "not-paired": (InvalidState, "you are not connected to that peer; pair with ping/pong first"),
    "not-pointing": (InvalidState, "you are not connecting or connected to that peer"),
}

#: What the protocol says when no rule refused but the message still failed.
BINARY_FRAME = "binary frames are not accepted; send JSON as text frames"
NOT_DELIVERED = "that peer is going away; the message was not delivered"
SERVER_FAULT = "the server failed to handle this message"
CLUSTER_UNREACHABLE = "the signaling cluster's state (Redis) is unreachable; try again"
QUEUE_IS_FULL = "that peer is reconnecting and too many messages already wait for it; this one was dropped"

#: what a delivery answers when the recipient's grace queue is full (besides True and False)
QUEUE_FULL = "queue-full"


#: every error code a client may be sent (docs/protocol.rst, "Errors")
ERROR_CODES = (
    "invalid-json", "invalid-message", "unknown-type", "peer-not-found", "peer-busy", "invalid-state",
    "rate-limited", "queue-full", "unavailable", "internal-error",
)


def refusal(name: str) -> SignalingError:
    """The exception for the pairing rules' refusal ``name`` (a key of :data:`REFUSALS`)."""
    kind, message = REFUSALS[name]
    return kind(message)
