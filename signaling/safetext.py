"""
Client-controlled text made safe to log and to echo in error replies.

A peer chooses its message ``type``, its ``Origin`` and other headers, and
(through a trusted proxy) part of ``X-Forwarded-For``.  Written raw, such a
string could forge log lines (CR, LF), drive a terminal (ESC), reorder what
an operator reads (BiDi controls) or fill the disk (a 200 KB ``type``).
:func:`safe` keeps at most :data:`MAX_CHARS` characters and escapes every
character that is not printable, so that the text and the JSON logs carry
the same harmless value.
"""

from typing import Optional

#: characters of a client-controlled string kept in logs and error replies
MAX_CHARS = 100


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe(value, limit: int = MAX_CHARS) -> Optional[str]:
    """
    ``value`` (text, bytes or anything printable) cut to ``limit``
    characters, with every non-printable character (controls, CR, LF, ESC,
    BiDi and other format characters, separators, lone surrogates) written
    as a ``\\x..``/``\\u..`` escape; a cut is marked with how much was left
    out.  ``None`` stays ``None``.
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        text = bytes(value).decode("utf-8", "backslashreplace")
    else:
        text = value if isinstance(value, str) else str(value)
    extra = len(text) - limit
    if extra > 0:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else _escape(ch) for ch in text)
    if extra > 0:
        text += f"...(+{extra} chars)"
    return text


def _safe_fields(kwargs: dict) -> dict:
    for key, value in kwargs.items():
        if isinstance(value, (str, bytes)):
            kwargs[key] = safe(value)
    return kwargs


def _level(name):
    def log(self, *args, **kwargs):
        method = getattr(self._inner, name)
        if method is self._off:
            return None  # a level that is off: nothing to make safe
        return method(*args, **_safe_fields(kwargs))

    log.__name__ = name
    return log


class SafeLogger:
    """
    Another library's logger (Autobahn's, a txaio ``Logger``) whose every
    text field passes through :func:`safe` before it is logged: its lines
    may quote what a client sent.  Levels that are off stay nearly free.

    :param off: what the logger's methods are for a level that is off
        (txaio's shared no-op), if it has such a thing.
    """

    __slots__ = ("_inner", "_off")

    def __init__(self, inner, off=None):
        self._inner = inner
        self._off = off

    critical = _level("critical")
    error = _level("error")
    warn = _level("warn")
    info = _level("info")
    debug = _level("debug")
    trace = _level("trace")
    failure = _level("failure")

    def __getattr__(self, name):
        return getattr(self._inner, name)


def txaio_off():
    """txaio's no-op, which a txaio Logger's methods are for levels that are off."""
    import txaio

    probe = txaio.make_logger()
    probe.set_log_level("none")
    return probe.debug
