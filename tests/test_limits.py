"""Tier 1: the pure pieces of hardening: safe text, address keys and normalization, counters, log budgets."""

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from signaling.admission import client_address, normal_ip
from signaling.limits import ConnectionCounts, LogBudget, address_key
from signaling.safetext import MAX_CHARS, SafeLogger, safe, txaio_off

pytestmark = pytest.mark.pure

# -- safe text -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("offer", "offer"),
        ("évé 漢字 ok", "évé 漢字 ok"),
        ("a\r\nfake line", "a\\x0d\\x0afake line"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("tab\there", "tab\\x09here"),
        ("\x85\x9b", "\\x85\\x9b"),  # C1 controls (NEL, CSI)
        ("abc\u202edcba\u2066x\u2069", "abc\\u202edcba\\u2066x\\u2069"),  # BiDi overrides and isolates
        ("\u200f\u061c\u200b", "\\u200f\\u061c\\u200b"),  # marks, zero-width space
        ("line\u2028sep", "line\\u2028sep"),
        ("lone \ud800", "lone \\ud800"),
        (b"by\xfftes\n", "by\\xfftes\\x0a"),
        (None, None),
        (429, "429"),
    ],
)
def test_safe_escapes_what_is_not_printable(raw, shown):
    """Control characters, CR/LF, ESC, C1, BiDi and other format characters are escaped; text stays text."""
    assert safe(raw) == shown


def test_safe_truncates_and_says_so():
    """Past the documented length the text is cut, with how much was left out; a cut escape cannot be completed."""
    assert safe("x" * MAX_CHARS) == "x" * MAX_CHARS
    assert safe("x" * 200_000) == "x" * MAX_CHARS + f"...(+{200_000 - MAX_CHARS} chars)"
    assert safe("\n" * 300, limit=3) == "\\x0a\\x0a\\x0a...(+297 chars)"


def test_safe_logger_makes_fields_safe():
    """A wrapped logger (Autobahn's txaio one) logs text fields made safe, others as they are; off levels stay free."""
    import txaio

    txaio.use_twisted()
    inner = txaio.make_logger()
    inner.set_log_level("info")
    log = SafeLogger(inner, off=txaio_off())
    with capturedLogs() as events:
        log.info("failing handshake ('{reason}') code {code}", reason="bad\r\nX-Evil: 1\x1b", code=400)
    assert events[0]["reason"] == "bad\\x0d\\x0aX-Evil: 1\\x1b" and events[0]["code"] == 400
    assert formatEvent(events[0]) == "failing handshake ('bad\\x0d\\x0aX-Evil: 1\\x1b') code 400"
    with capturedLogs() as events:
        log.debug("off: {x}", x="nothing")
    assert events == []


# -- addresses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, normal",
    [
        ("203.0.113.9", "203.0.113.9"),
        (" 203.0.113.9 ", "203.0.113.9"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        ("2001:DB8:0:0::1", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("fe80::1%\x1b[31m anything", "fe80::1"),
        ("203.0.113.9:443", None),
        ("not-an-ip", None),
        ("", None),
    ],
)
def test_normal_ip(text, normal):
    """Addresses are compared in one form: zones dropped, IPv4-mapped as IPv4, IPv6 compressed; junk is None."""
    assert normal_ip(text) == normal


PROXY = ("127.0.0.1",)


@pytest.mark.parametrize(
    "header, expected",
    [
        ("fe80::1%evil", "fe80::1"),
        ("::ffff:198.51.100.4", "198.51.100.4"),
        ("198.51.100.4\r\n", "198.51.100.4"),
        ("198.51.100.4, \x1b[2J", "127.0.0.1"),  # junk nearest: only the socket is believed
        ("127.0.0.1, 127.0.0.1", "127.0.0.1"),  # all hops are trusted proxies
    ],
)
def test_forwarded_addresses_normalized(header, expected):
    """X-Forwarded-For from a trusted proxy is normalized; an invalid nearest hop falls back to the proxy."""
    import ipaddress

    proxies = (ipaddress.ip_network("127.0.0.1/32"),)
    assert client_address("127.0.0.1", header, proxies) == expected


def test_address_keys():
    """IPv4 addresses count alone; IPv6 ones by their /64 (or the chosen prefix); other peers as given."""
    assert address_key("203.0.113.9") == "203.0.113.9"
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert address_key("2001:db8:1:3::1") != address_key("2001:db8:1:2::1")
    assert address_key("2001:db8:1:2::1", 128) == "2001:db8:1:2::1"
    assert address_key("2001:db8:1:2::1", 48) == "2001:db8:1::/48"
    assert address_key("UNIXAddress(None)") == "UNIXAddress(None)"


def test_connection_counts():
    """Counts refuse past the total or the per-key cap without counting, and free slots on removal."""
    counts = ConnectionCounts(max_total=3, max_per_key=2)
    assert counts.add("a") is None and counts.add("a") is None
    assert counts.add("a") == "address"
    assert counts.add(None) is None  # a trusted proxy's connection: total only, for now
    assert counts.add_key("b") is True
    assert counts.add("c") == "total"
    assert (counts.total, counts.per_key) == (3, {"a": 2, "b": 1})
    counts.remove("a")
    counts.remove("b")
    assert (counts.total, counts.per_key) == (1, {"a": 1})


def test_log_budget_aggregates_a_flood():
    """A budget lets a few lines through per interval, counts the rest by kind, and reports them once at its end."""
    clock = Clock()
    reports = []
    budget = LogBudget(clock, reports.append, lines=2, interval=10)
    allowed = [budget.allow("rate-limited") for _ in range(1000)]
    assert allowed[:2] == [True, True] and not any(allowed[2:])
    budget.allow("invalid-json")
    assert reports == []
    clock.advance(10)
    assert reports == ["998 rate-limited, 1 invalid-json"]
    assert budget.allow("x") is True  # a new interval
    for _ in range(3):
        budget.allow("x")
    budget.close()
    assert reports[-1] == "2 x" and clock.getDelayedCalls() == []


def test_unix_socket_clients():
    """A UNIX socket's clients are "unix", not limited per address, and believed only with --trusted-proxy=unix."""
    import ipaddress

    from twisted.internet.address import UNIXAddress

    from signaling.admission import host_of

    assert host_of(UNIXAddress(None)) == host_of(UNIXAddress(b"/run/s.sock")) == "unix"
    assert address_key("unix") is None
    assert client_address("unix", "203.0.113.9", ()) == "unix"
    assert client_address("unix", "203.0.113.9", ("unix",)) == "203.0.113.9"
    assert client_address("10.0.0.1", "203.0.113.9", ("unix", ipaddress.ip_network("10.0.0.0/8"))) == "203.0.113.9"
