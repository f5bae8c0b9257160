"""
Tiers 1 and 2: writing the log (signaling.logs).  The text log's lines are
formatted exactly as Twisted's text observer formats them, and a reactor
turn's lines go out in one write, none lost.
"""

import io
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import (
    FileLogObserver,
    LogLevel,
    LogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.failure import Failure

from signaling import _compat
from signaling.logs import TurnWriter, classic_line, json_log_observer_factory, write_lines_per_turn

pytestmark = pytest.mark.pure


def twisted_line(event):
    """What twistd's text observer writes for ``event``."""
    out = io.StringIO()
    textFileLogObserver(out)(event)
    return out.getvalue() or None


class Thing:
    attr = "an attribute"

    def __str__(self):
        return "a thing\nover two lines"


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
formats = st.lists(
    st.one_of(
        texts.map(lambda t: t.replace("{", "{{").replace("}", "}}")),
        st.sampled_from(["{peer}", "{ip}", "{n}", "{n:5d}", "{peer!r}", "{thing}", "{thing.attr}", "{missing}",
                         "{call()}", "{0}", "{}", "{", "}", "{n!x}", "{thing.nope}", "{items[0]}"]),
    ),
    max_size=6,
).map("".join)


@settings(max_examples=500, deadline=None)
@given(
    fmt=formats,
    peer=texts,
    n=st.integers(-10**6, 10**6),
    when=st.one_of(st.none(), st.floats(0, 4e9), st.integers(0, 4 * 10**9).map(lambda s: s + 0.9999996)),
    system=st.one_of(st.none(), texts),
    namespace=st.one_of(st.none(), texts),
    level=st.one_of(st.none(), st.sampled_from(list(LogLevel.iterconstants()))),
)
def test_classic_line_is_what_twisted_writes(fmt, peer, n, when, system, namespace, level):
    """Any event of a format and its fields: character for character the line Twisted's text observer writes."""
    event = {"log_format": fmt, "peer": peer, "ip": "127.0.0.1", "n": n, "thing": Thing(), "items": [peer],
             "call": lambda: "called", "log_time": when}
    if system is not None:
        event["log_system"] = system
    if namespace is not None:
        event["log_namespace"] = namespace
    if level is not None:
        event["log_level"] = level
    assert classic_line(dict(event)) == twisted_line(dict(event))


def test_classic_line_leaves_failures_and_odd_events_to_twisted():
    """A failure's traceback, a format that is not text, no format: as Twisted writes them."""
    failure = Failure(ZeroDivisionError("division by zero"))
    now = time.time()
    for event in (
        {"log_format": "it failed: {why}", "why": "x", "log_failure": failure, "log_time": now},
        {"log_format": b"bytes {x}", "x": 1, "log_time": now},
        {"log_time": now, "message": ("legacy",)},
        {"log_format": "", "log_time": now},
        {"log_format": "{x}", "x": "", "log_time": now},
    ):
        assert classic_line(dict(event)) == twisted_line(dict(event))


def test_twistds_text_observer_is_recognized():
    """Only the observer textFileLogObserver makes with its RFC 3339 timestamps is formatted the fast way."""
    assert _compat.default_text_format(textFileLogObserver(io.StringIO()))
    assert not _compat.default_text_format(textFileLogObserver(io.StringIO(), timeFormat="%H:%M"))
    assert not _compat.default_text_format(jsonFileLogObserver(io.StringIO()))
    assert not _compat.default_text_format(FileLogObserver(io.StringIO(), lambda e: "x\n"))


class Out:
    """A file that counts its writes and flushes."""

    def __init__(self):
        self.writes = []
        self.flushes = 0

    def write(self, data):
        self.writes.append(data)

    def flush(self):
        self.flushes += 1


class Reactor(Clock):
    running = True


def test_a_turns_lines_go_out_in_one_write_at_its_end():
    clock = Reactor()
    out = Out()
    writer = TurnWriter(out, clock)
    for n in range(3):
        writer.write(f"line {n}\n")
        writer.flush()
    assert out.writes == [] and len(clock.getDelayedCalls()) == 1
    clock.advance(0)
    assert out.writes == ["line 0\nline 1\nline 2\n"] and out.flushes == 1
    writer.write(b"bytes\n")  # (a bytes file, as FileLogObserver writes to one)
    writer.flush()
    clock.advance(0)
    assert out.writes[-1] == b"bytes\n"


def test_lines_are_written_at_once_when_no_turn_will_end_or_too_many_wait():
    clock = Reactor()
    out = Out()
    writer = TurnWriter(out, clock, limit=100)
    writer.write("x" * 60)
    writer.write("y" * 60)  # (past the limit: written now)
    assert out.writes == ["x" * 60 + "y" * 60]
    clock.running = False  # (the reactor stopped: twistd's last lines)
    writer.write("Main loop terminated.\n")
    writer.flush()
    assert out.writes[-1] == "Main loop terminated.\n" and not clock.getDelayedCalls()


def test_the_observers_of_twistd_and_twist_are_set_up_and_keep_every_line():
    """write_lines_per_turn: text and JSON observers write a turn's lines at its end, and flush_all the rest."""
    clock = Reactor()
    text, data = io.StringIO(), io.StringIO()
    publisher = LogPublisher(textFileLogObserver(text), json_log_observer_factory(lines=True)(data))
    flush_all = write_lines_per_turn(clock, publisher)
    now = time.time()
    event = {"log_format": "peer {peer} connected", "peer": "p1", "log_time": now, "log_namespace": "n",
             "log_level": LogLevel.info}
    publisher(dict(event))
    assert text.getvalue() == "" and data.getvalue() == ""
    clock.advance(0)
    assert text.getvalue() == twisted_line(dict(event))
    assert '"peer":"p1"' in data.getvalue().replace(" ", "")
    publisher(dict(event, peer="p2"))
    flush_all()
    assert text.getvalue().count("connected") == 2 and data.getvalue().count("peer p2 connected") == 1
    assert write_lines_per_turn(clock, publisher)() is None  # (set up twice: nothing is wrapped again)
