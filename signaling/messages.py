"""
Parsing, validating and building the JSON frames of the wire contract.

Pure functions, no network code.  ``parse`` turns a text frame into a
:class:`Message` or raises a :class:`~signaling.errors.SignalingError`
whose ``code`` is the wire error code (``invalid-json``, ``invalid-message``
or ``unknown-type``) and whose ``ref`` is the offending type, if one could be
read.
"""

import json
import math
from typing import Any, NamedTuple, Optional

from signaling.errors import InvalidJSON, InvalidMessage, SignalingError, UnknownType

orjson: Any
try:  # a compiled JSON library on CPython; the standard library elsewhere (PyPy)
    import orjson
except ImportError:  # pragma: no cover - exercised on PyPy
    orjson = None

#: The message types a client may send.
CLIENT_TYPES = frozenset(
    ["ping", "pong", "offer", "answer", "ice-candidate", "disconnect"]
)


class Message(NamedTuple):
    """A valid client message."""

    type: str
    to: str
    data: Any


_message = tuple.__new__  # Message(...) without its Python-level __new__: this is the hot path


def _no_constants(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite(text):
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:20]} is too large")
    return value


#: the standard library's JSON parser, refusing NaN/Infinity and numbers too large for a float
#: (for frames orjson is not given; the other wire formats parse with it too)
STRICT_JSON = json.JSONDecoder(parse_constant=_no_constants, parse_float=_finite)
_dumps_utf8 = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode
_dumps_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode
# orjson reads integers beyond 64 bits as floats; frames with 20+ digit runs
# (perhaps such an integer) are left to the standard library, which keeps them.
# Found by mapping every digit to "0" and everything else to " " and looking
# for twenty zeros: two passes in C, about 7x faster than the equivalent
# regular expression, which cost more than the JSON parse itself.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_TWENTY_DIGITS = b"0" * 20


def _has_long_digit_run(payload: bytes) -> bool:
    return _TWENTY_DIGITS in payload.translate(_DIGITS_AS_ZEROS)


def _with_ref(error: SignalingError, ref: Optional[str]) -> SignalingError:
    error.ref = ref
    return error


def loads(payload: bytes) -> Any:
    """
    The JSON value of a text frame (UTF-8 bytes): orjson's parse, or the
    standard library's (:data:`STRICT_JSON`) for what orjson would change or
    refuses: integers beyond 64 bits (orjson makes them floats), escaped
    lone surrogates.  NaN, Infinity and numbers too large for a float are
    refused by both.  Every wire format parses with it.

    :raises ValueError: (or RecursionError) if the text is not valid JSON.
    """
    try:
        if _has_long_digit_run(payload):
            raise ValueError("maybe an integer beyond 64 bits")
        return orjson.loads(payload)
    except (AttributeError, ValueError):
        # orjson is missing, or refused the text: the standard library
        # decides (it also takes integers beyond 64 bits and escaped lone
        # surrogates, and words its errors better)
        return STRICT_JSON.decode(payload.decode("utf-8"))


def parse(payload: bytes) -> Message:
    """
    Parse one text frame (UTF-8 bytes, already validated as UTF-8 by the
    WebSocket layer) into a :class:`Message`.

    :raises SignalingError: with ``code`` and ``ref`` set, if the frame is
        not a valid client message.
    """
    try:
        obj = loads(payload)
    except (ValueError, RecursionError) as e:
        raise _with_ref(InvalidJSON(f"frame is not valid JSON: {_short(e)}"), None) from None
    if not isinstance(obj, dict):
        raise _with_ref(
            InvalidMessage(
                f"a message must be a JSON object, not {_json_kind(obj)}"
            ),
            None,
        )
    kind = obj.get("type")
    if not isinstance(kind, str):
        problem = "is missing" if kind is None else f"must be a string, not {_json_kind(kind)}"
        raise _with_ref(InvalidMessage(f'field "type" {problem}'), None)
    if kind not in CLIENT_TYPES:
        raise _with_ref(
            UnknownType(
                "unknown message type; expected one of "
                + ", ".join(sorted(CLIENT_TYPES))
            ),
            kind,
        )
    to = obj.get("to")
    if not isinstance(to, str) or not to:
        if to is None:
            problem = "is missing"
        elif isinstance(to, str):
            problem = "must not be empty"
        else:
            problem = f"must be a string, not {_json_kind(to)}"
        raise _with_ref(InvalidMessage(f'field "to" {problem}'), kind)
    if "data" in obj:
        data = obj["data"]
        if not isinstance(data, dict):
            raise _with_ref(
                InvalidMessage(
                    f'field "data" must be a JSON object, not {_json_kind(data)}'
                ),
                kind,
            )
    else:
        data = {}
    return _message(Message, (kind, to, data))


def encode(obj: Any) -> bytes:
    """
    Serialize a server message to UTF-8 JSON bytes.

    Non-ASCII text is kept as UTF-8 so that relayed strings stay
    byte-for-byte what the sender wrote; a string that cannot be UTF-8
    (a lone surrogate, sent escaped) falls back to ``\\u`` escapes, which
    decode to the same value.
    """
    if orjson is not None:
        try:
            return orjson.dumps(obj)
        except TypeError:
            pass  # an integer beyond 64 bits, or a lone surrogate
    try:
        return _dumps_utf8(obj).encode("utf-8")
    except UnicodeEncodeError:
        return _dumps_ascii(obj).encode("ascii")


def welcome(peer_id: str, ice_servers: list, resume: str, resumed: bool) -> dict:
    return {"type": "welcome", "id": peer_id, "iceServers": ice_servers, "resume": resume, "resumed": resumed}


def relay(kind: str, sender: Optional[str], data: Any) -> dict:
    return {"type": kind, "from": sender, "data": data}


def error(code: str, message: str, ref: Optional[str] = None) -> dict:
    return {"type": "error", "code": code, "message": message, "ref": ref}


def peer_left(gone: str) -> dict:
    return relay("disconnect", gone, {"reason": "peer_left"})


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(e: Exception) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    text = str(e)
    return text if len(text) <= 120 else text[:117] + "..."
