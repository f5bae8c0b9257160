"""
The JSON log (``twist --log-format=json``): each event as Twisted writes it
(``log_format``, ``log_level``, ``log_namespace``, ``log_time`` and the
event's fields) plus ``log_text``, the message rendered as the text log
shows it, so that a log pipeline needs no Twisted to read it.  Records are
RFC 7464 JSON text sequences (each starts with the 0x1E record separator)
as Twisted writes them, or plain JSON lines with ``--json-lines``.
"""

from twisted.logger import formatEvent, jsonFileLogObserver


def json_log_observer_factory(lines: bool):
    """A ``fileLogObserverFactory`` for ``twist``: JSON events with ``log_text``."""

    def factory(out_file):
        write = jsonFileLogObserver(out_file, recordSeparator="" if lines else "\x1e")

        def observe(event):
            # (a copy: the other observers of this event must not see the key)
            write(dict(event, log_text=formatEvent(event)))

        return observe

    return factory


def is_json_observer_factory(factory) -> bool:
    """Whether ``factory`` is what ``twist --log-format=json`` (or its default off a tty) chose."""
    return factory is jsonFileLogObserver
