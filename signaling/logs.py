"""
Writing the log.

The JSON log (``twist --log-format=json``): each event as Twisted writes it
(``log_format``, ``log_level``, ``log_namespace``, ``log_time`` and the
event's fields) plus ``log_text``, the message rendered as the text log
shows it, so that a log pipeline needs no Twisted to read it.  Records are
RFC 7464 JSON text sequences (each starts with the 0x1E record separator)
as Twisted writes them, or plain JSON lines with ``--json-lines``.

The cost of a line (:func:`write_lines_per_turn`): Twisted's file observer
formats every event with ``string.Formatter`` and a time zone looked up
for its timestamp, and writes and flushes each line on its own (a
``write()`` per line; with ``PYTHONUNBUFFERED``, as under many service
managers, that is also what each ``write`` does).  At a few thousand
connects a second, the "connected" line cost more than a third of a
connect.  Here the observers ``twistd`` and ``twist`` log to keep their
files, formats and options; the lines of one reactor turn go out in one
write at its end, and the text log's lines are formatted the same way,
character for character, with the timestamp text kept for the second it
names.
"""

from typing import Any, Callable, Dict, List, Optional

from twisted.logger import FileLogObserver, formatEvent, globalLogPublisher, jsonFileLogObserver
from twisted.logger._format import formatEventAsClassicLogText, formatTime, timeFormatRFC3339

from signaling import _compat


def json_log_observer_factory(lines: bool):
    """A ``fileLogObserverFactory`` for ``twist``: JSON events with ``log_text``."""

    def factory(out_file):
        write = jsonFileLogObserver(out_file, recordSeparator="" if lines else "\x1e")

        def observe(event):
            # (a copy: the other observers of this event must not see the key)
            write(dict(event, log_text=formatEvent(event)))

        observe.file_observer = write  # (see write_lines_per_turn)
        return observe

    return factory


def is_json_observer_factory(factory) -> bool:
    """Whether ``factory`` is what ``twist --log-format=json`` (or its default off a tty) chose."""
    return factory is jsonFileLogObserver


# -- lines written once a reactor turn -------------------------------------------------------


class TurnWriter:
    """
    A log file whose ``flush`` waits for the end of the reactor turn: what
    was written meanwhile goes out in one ``write`` and one ``flush`` of
    the file underneath.  :meth:`flush_now` writes what waits at once (at
    shutdown; when a turn's lines pass ``limit`` characters).

    :param out: the file (text or bytes, as its writer gives it).
    :param clock: ``callLater`` (the reactor).
    """

    def __init__(self, out, clock, limit: int = 1 << 16):
        self.out = out
        self._clock = clock
        self._parts: List[Any] = []
        self._size = 0
        self._limit = limit
        self._pending = None

    def write(self, data) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= self._limit:
            self.flush_now()

    def flush(self) -> None:
        if not getattr(self._clock, "running", True):  # (no turn will end: the reactor stopped, or has not begun)
            self.flush_now()
        elif self._pending is None and self._parts:
            self._pending = self._clock.callLater(0, self._end_of_turn)

    def _end_of_turn(self) -> None:
        self._pending = None
        self.flush_now()

    def flush_now(self) -> None:
        parts, self._parts, self._size = self._parts, [], 0
        if parts:
            self.out.write(parts[0][:0].join(parts))  # ("" or b"": the writer's own type)
            self.out.flush()

    def __getattr__(self, name):  # (anything else, e.g. a LogFile's rotate(): the file's own)
        return getattr(self.out, name)


# -- the text log's lines, formatted faster --------------------------------------------------

_stamps: Dict[int, str] = {}  # a second -> its RFC 3339 text (the last few seconds)


def _stamp(when: Optional[float]) -> str:
    """``formatTime(when)`` (RFC 3339, local time), kept for the second it names."""
    if when is None:
        return "-"
    second = int(when)
    if not 0 <= when - second < 0.999999:  # (fromtimestamp may round up into the next second)
        return formatTime(when, timeFormatRFC3339)
    text = _stamps.get(second)
    if text is None:
        if len(_stamps) > 8:
            _stamps.clear()
        text = _stamps[second] = formatTime(second, timeFormatRFC3339)
    return text


def classic_line(event: dict) -> Optional[str]:
    """
    ``formatEventAsClassicLogText(event)`` with RFC 3339 timestamps (what
    ``textFileLogObserver`` writes), for the events every line of this
    server is: a format string and its fields.  Anything else (a failure, a
    flattened event, a format the fast way cannot render the same) is
    Twisted's to format.
    """
    text = None
    fmt = event.get("log_format")
    if type(fmt) is str and "log_failure" not in event and "log_flattened" not in event:
        try:
            text = fmt.format_map(event)
        except Exception:
            text = None  # (a missing key, a call "key()", ...: Twisted decides how it reads)
    if text is None:
        return formatEventAsClassicLogText(event, formatTime=lambda when: formatTime(when, timeFormatRFC3339))
    if not text:
        return None
    system = event.get("log_system", None)
    if system is None:
        level = event.get("log_level", None)
        system = "{}#{}".format(event.get("log_namespace", "-"), "-" if level is None else level.name)
    else:
        try:
            system = str(system)
        except Exception:
            system = "UNFORMATTABLE"
    line = "".join((_stamp(event.get("log_time", None)), " [", system, "] ", text))
    return line.replace("\n", "\n\t") + "\n"


def write_lines_per_turn(clock, publisher=globalLogPublisher) -> Callable[[], None]:
    """
    Make the file observers ``publisher`` sends events to (``twistd``'s and
    ``twist``'s, text or JSON) write a reactor turn's lines at once, and
    the text ones format as :func:`classic_line` does.  Returns what
    writes every line still waiting (call it before the reactor stops).
    """
    writers = []
    for observer in _compat.log_observers(publisher):
        observer = getattr(observer, "file_observer", observer)  # (the JSON log's, below)
        if not isinstance(observer, FileLogObserver):
            continue
        out = _compat.observer_file(observer)
        if out is None or isinstance(out, TurnWriter):
            continue
        if _compat.default_text_format(observer):
            observer.formatEvent = classic_line
        writer = TurnWriter(out, clock)
        _compat.set_observer_file(observer, writer)
        writers.append(writer)

    def flush_all() -> None:
        for writer in writers:
            writer.flush_now()

    return flush_all
