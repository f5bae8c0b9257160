"""
Tiers 1 and 2: the stats off the relay path (signaling.stats) with fake
clocks: builds in slices, shared and paced captures, ETags, gzip, pages and
the summary form, and the routes that serve them through StubTreq.
(tests/test_stats_live.py: the installed server over real sockets.)
"""

import gzip
import json

import pytest
import treq
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from signaling import stats
from signaling.limits import Pacer
from signaling.registry import Registry
from signaling.stats import (
    INTERVAL,
    MAX_PAGE,
    Body,
    Captures,
    Slicer,
    StatsCache,
    iso_utc,
    parse_query,
)
from signaling.web import SignalingWeb, accepts_gzip, not_modified, stats_document

pytestmark = pytest.mark.memory

T0 = 1_757_422_800.5  # 2025-09-09T13:00:00.500Z


class Ticks:
    """A fake timer for the slicer's budget: every reading is ``tick`` seconds after the last."""

    def __init__(self, tick):
        self.tick = tick
        self.now = 0.0
        self.readings = 0

    def __call__(self):
        self.readings += 1
        self.now += self.tick
        return self.now


def registry_of(n, clock=None, pairs=0, offline=()):
    clock = clock or Clock()
    if clock.seconds() == 0:
        clock.advance(T0)
    registry = Registry(clock)
    for i in range(n):
        registry.add(f"user-{(i * 7919) % n:05d}", f"10.0.{i % 250}.{i % 7}")  # ids not in arrival order
        clock.advance(0.001)
    ids = [p.id for p in registry.peers()]
    for i in range(pairs):
        registry.ping(ids[2 * i], ids[2 * i + 1])
        registry.pong(ids[2 * i + 1], ids[2 * i])
    for peer_id in offline:
        registry.set_online(peer_id, False)
    return registry, clock


def result_of(d, clock=None, turns=10000):
    """The result of ``d``, advancing ``clock`` a reactor turn at a time until it fires."""
    out = []
    d.addBoth(out.append)
    for _ in range(turns):
        if out or clock is None:
            break
        clock.advance(0)
    assert out, "did not fire"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def turn_by_turn(clock, d):
    """Fire ``d`` advancing ``clock`` one reactor turn at a time (only calls due now); return the turns."""
    out, turns = [], 0
    d.addBoth(out.append)
    while not out:
        calls = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
        assert calls, "nothing scheduled and not done"
        turns += 1
        # one turn: run what is due now, not what those calls schedule for the next turn
        for call in sorted(calls, key=lambda c: c.getTime()):
            if call.active():
                clock.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)
    return out[0], turns


# -- the slicer ----------------------------------------------------------------------


def counting_job(n, log):
    for i in range(n):
        log.append(i)
        yield
    return n


def test_small_job_ends_in_the_turn_it_begins():
    """A job of fewer steps than min_steps needs no later reactor turn."""
    clock = Clock()
    slicer = Slicer(clock, budget=0.0, timer=Ticks(1.0), min_steps=8)
    log = []
    d = slicer.run(counting_job(5, log))
    assert d.called and d.result == 5 and log == [0, 1, 2, 3, 4]
    assert clock.getDelayedCalls() == [] and slicer.turns == 1


TICK = 2.0 ** -12  # (binary fractions: the budget arithmetic is exact)


def test_long_job_is_sliced_by_its_time_budget():
    """Each turn stops once its budget is spent (4 ticks: 5 steps), and the rest waits for the next turn."""
    clock = Clock()
    slicer = Slicer(clock, budget=4 * TICK, timer=Ticks(TICK), min_steps=2)
    log = []
    d = slicer.run(counting_job(100, log))
    assert not d.called and len(log) == 5  # the timer is read from the 2nd step on: 4 ticks after 5 steps
    result, turns = turn_by_turn(clock, d)
    assert result == 100 and log == list(range(100))
    assert slicer.turns == 21 and turns == 20 and slicer.max_steps == 5  # 101 steps (the last returns)


def test_min_steps_are_taken_whatever_the_time():
    """A turn always takes min_steps steps, even with the budget spent at once."""
    clock = Clock()
    slicer = Slicer(clock, budget=0.0, timer=Ticks(1.0), min_steps=3)
    log = []
    d = slicer.run(counting_job(10, log))
    assert len(log) == 3
    turn_by_turn(clock, d)
    assert slicer.max_steps == 3 and slicer.turns == 4


def test_jobs_share_a_turns_budget_in_turn():
    """Two jobs take steps alternately, within one budget per turn (not one budget each)."""
    clock = Clock()
    slicer = Slicer(clock, budget=3 * TICK, timer=Ticks(TICK), min_steps=1)
    log = []

    def job(name, n):
        for i in range(n):
            log.append((name, i))
            yield
        return name

    da = slicer.run(job("a", 6))  # its first turn at once: 3 steps (then 3 ticks had passed)
    db = slicer.run(job("b", 6))  # waits for the turn scheduled
    assert [name for name, _ in log] == ["a"] * 3
    del log[:]
    result, turns = turn_by_turn(clock, db)
    assert da.result == "a" and result == "b"
    # 11 steps left (a: 3 more and its return; b: 6 and its return), 3 a turn, in turn
    assert [name for name, _ in log[:4]] == ["a", "b", "a", "b"] and slicer.max_steps == 3 and turns == 4


def test_a_job_waits_on_a_deferred_and_gets_its_result_or_failure():
    """A job that yields a Deferred is resumed with its result; a failure is raised inside it."""
    clock = Clock()
    slicer = Slicer(clock)
    later = Deferred()

    def job():
        value = yield later
        try:
            yield fail(ValueError("boom"))
        except ValueError as e:
            return (value, str(e))

    d = slicer.run(job())
    assert not d.called and not slicer.busy
    later.callback(41)
    assert result_of(d, clock) == (41, "boom")


def test_a_job_that_raises_fails_its_deferred():
    """An exception in a job fails the Deferred run() returned, and the slicer goes on with other jobs."""
    clock = Clock()
    slicer = Slicer(clock)

    def bad():
        yield
        raise RuntimeError("bad job")

    d = slicer.run(bad())
    with pytest.raises(RuntimeError, match="bad job"):
        result_of(d, clock)
    assert result_of(slicer.run(counting_job(3, [])), clock) == 3


# -- captures: shared and paced ------------------------------------------------------------


class Source:
    """A capture that answers when told to (``finish``), counting how often it began."""

    def __init__(self):
        self.begun = 0
        self.pending = []
        self.generation = 0

    def capture(self):
        self.begun += 1
        d = Deferred()
        self.pending.append(d)
        return d

    def finish(self, value):
        self.pending.pop(0).callback(value)


def test_requests_during_a_capture_share_the_next_one():
    """A request that arrives during a capture waits for the next (begun after it), shared by all who wait."""
    clock = Clock()
    src = Source()
    captures = Captures(clock, src.capture, interval=0.25)  # no generation: every request wants a new capture
    first = captures.get()
    assert src.begun == 1
    second, third = captures.get(), captures.get()
    src.finish("one")
    assert first.result == "one" and not second.called
    assert src.begun == 1  # the next one waits for the interval since the first began
    clock.advance(0.25)
    assert src.begun == 2
    src.finish("two")
    assert second.result == third.result == "two"


def test_captures_begin_at_most_every_interval():
    """However often it is asked, a capture begins at most once per interval (counted from the last beginning)."""
    clock = Clock()
    made = []
    captures = Captures(clock, lambda: made.append(clock.seconds()) or len(made), interval=0.25)
    for _ in range(200):  # a request every 10 ms for 2 s
        captures.get()
        clock.advance(0.01)
    clock.advance(1)
    gaps = [b - a for a, b in zip(made, made[1:])]
    assert len(made) == 9 and min(gaps) >= 0.25 - 1e-9


def test_an_unchanged_generation_is_answered_from_the_last_capture():
    """With a generation that did not move, the last capture is the answer, at once; a change means a new one."""
    clock = Clock()
    src = Source()
    captures = Captures(clock, src.capture, interval=0.25, generation=lambda: src.generation)
    d = captures.get()
    src.finish("g0")
    assert d.result == "g0"
    for _ in range(5):
        assert captures.get().result == "g0"
    assert src.begun == 1
    src.generation += 1
    d = captures.get()
    assert not d.called
    clock.advance(0.25)
    src.finish("g1")
    assert d.result == "g1" and src.begun == 2


def test_waiters_are_answered_a_few_a_turn():
    """With a slicer, the requests that waited for a capture are answered over several turns, not in one."""
    clock = Clock()
    src = Source()
    slicer = Slicer(clock, budget=1 * TICK, timer=Ticks(TICK), min_steps=1)  # one step a turn
    captures = Captures(clock, src.capture, interval=0.25, slicer=slicer)
    first = captures.get()
    waiting = [captures.get() for _ in range(3)]
    src.finish("one")
    clock.advance(0.25)
    src.finish("two")
    assert first.result == "one" and [d.called for d in waiting] == [False, False, False]  # (the next turn)
    for n in (1, 2, 3):
        one_turn(clock)
        assert sum(d.called for d in waiting) == n
    assert {d.result for d in waiting} == {"two"}


def test_joining_a_running_capture_when_nothing_changed():
    """While a capture runs and the generation has not moved since it began, a request joins it."""
    clock = Clock()
    src = Source()
    captures = Captures(clock, src.capture, interval=0.25, generation=lambda: src.generation)
    a = captures.get()
    b = captures.get()
    src.finish("x")
    assert a.result == b.result == "x" and src.begun == 1


def test_a_cancelled_request_leaves_the_others_waiting():
    """Cancelling one waiting request (its client went away) fires nothing wrong for the others."""
    clock = Clock()
    src = Source()
    captures = Captures(clock, src.capture, interval=0.25)
    a, b = captures.get(), captures.get()
    b.cancel()
    b.addErrback(lambda f: None)
    src.finish("a")
    assert a.result == "a"
    clock.advance(0.25)
    assert src.begun == 1  # (nobody waits any more: no capture for b)
    c = captures.get()
    src.finish("c")
    assert c.result == "c"


def test_a_failed_capture_fails_its_waiters_and_the_next_may_succeed():
    """A capture that fails fails those waiting for it; the last good capture is not replaced."""
    clock = Clock()
    results = [fail(ConnectionError("redis down")), succeed("ok")]
    captures = Captures(clock, lambda: results.pop(0), interval=0.25)
    d = captures.get()
    with pytest.raises(ConnectionError):
        result_of(d)
    assert captures.latest is None
    clock.advance(0.25)
    assert result_of(captures.get()) == "ok"


# -- the stats document ------------------------------------------------------------


def build(cache, clock):
    return result_of(cache.document(), clock)


def test_document_is_the_v1_document():
    """
    The built document is the v1 one (its keys first, in order, and values),
    oldest first, with its counts; each user also says its wire protocol.
    """
    registry, clock = registry_of(300, pairs=40, offline=["user-00003"])
    cache = StatsCache(registry, clock)
    snapshot = build(cache, clock)
    doc = json.loads(snapshot.body.data())
    assert doc == stats_document(registry.peers())
    assert list(doc) == ["connectedUsers", "users"]
    assert [list(u) for u in doc["users"][:1]] == [
        ["id", "state", "targetUser", "connectedAt", "ip", "online", "protocol"]]
    assert {u["protocol"] for u in doc["users"]} == {"native"}
    assert doc["connectedUsers"] == 300 and doc["users"][0]["connectedAt"] == "2025-09-09T13:00:00.500Z"
    assert snapshot.counts == registry.summary() == {
        "users": 300, "idle": 220, "connecting": 0, "connected": 80, "pairs": 40, "offline": 1}
    assert snapshot.body.length == len(snapshot.body.data())


def test_document_of_a_big_registry_is_built_over_many_turns_each_bounded():
    """10,000 users: the build spans many reactor turns, none more than its budget of steps (16 users a step)."""
    registry, clock = registry_of(10000)
    cache = StatsCache(registry, clock, slicer=Slicer(clock, budget=4 * TICK, timer=Ticks(TICK), min_steps=1))
    d = cache.document()
    snapshot, turns = turn_by_turn(clock, d)
    assert turns >= 10000 // (4 * stats.BATCH)  # 4 steps a turn (then 4 ticks had passed), 16 users a step
    assert cache.slicer.max_steps == 4
    assert json.loads(snapshot.body.data())["connectedUsers"] == 10000
    assert len(snapshot.body.chunks) > 10 and max(len(c) for c in snapshot.body.chunks) < 2 * stats.CHUNK


def test_document_build_with_real_time_spans_several_turns():
    """With the real clock as the budget's timer, building 10,000 users still takes several reactor turns."""
    registry, clock = registry_of(10000)
    cache = StatsCache(registry, clock)
    d = cache.document()
    assert not d.called
    _, turns = turn_by_turn(clock, d)
    assert turns >= 2


def test_unchanged_users_are_not_encoded_again():
    """A new capture reuses the JSON of every user that did not change, and encodes the ones that did."""
    registry, clock = registry_of(100)
    cache = StatsCache(registry, clock)
    first = build(cache, clock)
    ids = [p.id for p in registry.peers()]
    registry.ping(ids[0], ids[1])
    clock.advance(INTERVAL)
    second = build(cache, clock)
    before, after = first.fragment, second.fragment
    assert before(ids[2]) is after(ids[2])  # the same bytes object
    assert before(ids[0]) != after(ids[0]) and json.loads(after(ids[0]))["state"] == "connecting"
    assert before(ids[1]) is after(ids[1])  # (pinged, still idle)


def test_etag_is_the_contents():
    """The same document has the same ETag whichever capture made it; any change gives another."""
    registry, clock = registry_of(50)
    cache = StatsCache(registry, clock)
    first = build(cache, clock)
    registry.generation += 1  # (a capture again, with nothing changed)
    clock.advance(INTERVAL)
    again = build(cache, clock)
    assert again is not first and again.body.etag == first.body.etag
    registry.set_online("user-00001", False)
    clock.advance(INTERVAL)
    changed = build(cache, clock)
    assert changed.body.etag != first.body.etag


def test_an_unchanged_registry_is_answered_at_once():
    """With the registry unchanged (its generation), every request gets the last capture, building nothing."""
    registry, clock = registry_of(50)
    cache = StatsCache(registry, clock)
    first = build(cache, clock)
    for _ in range(10):
        assert cache.document().result is first
    assert cache.documents.captures == 1


def test_a_request_after_a_change_sees_the_change():
    """An answer is never older than its request: after a change the next answer shows it (within an interval)."""
    registry, clock = registry_of(10)
    cache = StatsCache(registry, clock)
    build(cache, clock)
    registry.add("newcomer", "10.1.1.1")
    d = cache.document()
    assert not d.called  # (the last capture began less than an interval ago)
    clock.advance(INTERVAL)
    assert "newcomer" in result_of(d, clock).ids


def test_gzip_form_round_trips_and_is_compressed_in_slices():
    """The gzip form decompresses to the document, is made once (shared), over several turns for a big one."""
    registry, clock = registry_of(3000)
    slicer = Slicer(clock, budget=4 * TICK, timer=Ticks(TICK), min_steps=1)
    cache = StatsCache(registry, clock, slicer=slicer)
    snapshot = result_of(cache.document(), clock)
    a, b = snapshot.body.gzipped(slicer), snapshot.body.gzipped(slicer)
    turns_before = slicer.turns
    gz, _ = turn_by_turn(clock, a)
    assert slicer.turns - turns_before >= 2
    assert result_of(b) is gz and snapshot.body.gzipped(slicer).result is gz
    assert gzip.decompress(gz.data()) == snapshot.body.data()
    assert gz.encoding == b"gzip" and gz.etag == snapshot.body.etag[:-1] + b'-gz"'
    assert gz.length < snapshot.body.length / 3


def test_summary_counts():
    """The summary form is the counts only."""
    registry, clock = registry_of(20, pairs=3, offline=["user-00002"])
    registry.ping("user-00010", "user-00011")
    snapshot = build(StatsCache(registry, clock), clock)
    assert json.loads(snapshot.summary().data()) == {
        "connectedUsers": 20, "idle": 13, "connecting": 1, "connected": 6, "pairs": 3, "offline": 1}


def test_summary_for_metrics_without_a_document():
    """StatsCache.summary counts in slices when there is no current document, and uses the document's if there is."""
    registry, clock = registry_of(5000, pairs=10)
    cache = StatsCache(registry, clock)
    counts = result_of(cache.summary(), clock)
    assert counts == registry.summary()
    snapshot = build(cache, clock)
    assert cache.summary().result is snapshot.counts


def pages(snapshot, slicer, clock, limit):
    """Every page, following next."""
    out, after = [], ""
    while True:
        page = json.loads(result_of(snapshot.page(slicer, after, limit), clock).data())
        out.append(page)
        if page["next"] is None:
            return out
        after = page["next"]


def test_pages_cover_every_user_once_in_id_order():
    """Following next from the first page lists every user once, by id; the last page's next is null."""
    registry, clock = registry_of(2345)
    cache = StatsCache(registry, clock)
    snapshot = build(cache, clock)
    got = pages(snapshot, cache.slicer, clock, 1000)
    assert [len(p["users"]) for p in got] == [1000, 1000, 345]
    assert all(p["connectedUsers"] == 2345 for p in got)
    ids = [u["id"] for p in got for u in p["users"]]
    assert ids == sorted(p.id for p in registry.peers())
    full = {u["id"]: u for u in json.loads(snapshot.body.data())["users"]}
    assert all(full[u["id"]] == u for p in got for u in p["users"])
    assert got[0]["next"] == ids[999] and got[-1]["next"] is None


def test_page_edges():
    """After an unknown id: from where it would sort; after the last: empty; a page ending on the last: next null."""
    registry, clock = registry_of(30)
    cache = StatsCache(registry, clock)
    snapshot = build(cache, clock)

    def page(after, limit):
        return json.loads(result_of(snapshot.page(cache.slicer, after, limit), clock).data())

    assert [u["id"] for u in page("user-00010x", 3)["users"]] == ["user-00011", "user-00012", "user-00013"]
    assert page("user-00029", 5) == {"connectedUsers": 30, "users": [], "next": None}
    assert page("zzz", 5)["users"] == []
    assert page("user-00024", 5)["next"] is None  # the 5 last: nothing follows
    assert page("user-00023", 5)["next"] == "user-00028"
    assert page("", 1)["users"][0]["id"] == "user-00000"
    empty = build(StatsCache(Registry(clock), clock), clock)
    assert json.loads(result_of(empty.page(cache.slicer, "", 10)).data()) == {
        "connectedUsers": 0, "users": [], "next": None}


def test_hide_ip_in_every_form():
    """With hide_ip the addresses are null in the document and in pages."""
    registry, clock = registry_of(5)
    cache = StatsCache(registry, clock, hide_ip=True)
    snapshot = build(cache, clock)
    assert all(u["ip"] is None for u in json.loads(snapshot.body.data())["users"])
    assert all(u["ip"] is None for u in json.loads(result_of(snapshot.page(cache.slicer, "", 5)).data())["users"])


def test_cluster_nodes_in_the_document():
    """A peer with a node (a cluster's registry) has the node key, last."""
    from signaling.registry import Peer

    class Peers:
        def peers(self):
            p = Peer("a", "10.0.0.1", T0, node="n1")
            return succeed([p])

    clock = Clock()
    snapshot = build(StatsCache(Peers(), clock), clock)
    [user] = json.loads(snapshot.body.data())["users"]
    assert list(user)[-1] == "node" and user["node"] == "n1"


@pytest.mark.parametrize("seconds", [0, 1_757_422_800, 1_757_422_800.0789, 1_757_422_800.9995,
                                     1_757_422_800.9999996, 1_757_422_801.0005, 1e9 + 0.0015])
def test_iso_utc_is_datetimes(seconds):
    """iso_utc (with its cache of whole seconds) formats as datetime does, rounding included."""
    from datetime import datetime, timezone

    moment = datetime.fromtimestamp(seconds, timezone.utc)
    assert iso_utc(seconds) == moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)


# -- queries and headers ---------------------------------------------------------------


@pytest.mark.parametrize("query, form", [
    ({}, ("document",)),
    ({b"summary": [b""]}, ("summary",)),
    ({b"summary": [b"1"]}, ("summary",)),
    ({b"limit": [b"10"]}, ("page", "", 10)),
    ({b"limit": [b"1000"], b"after": [b"x"]}, ("page", "x", 1000)),
    ({b"after": [b"user-1"]}, ("page", "user-1", MAX_PAGE)),
    ({b"after": [b""], b"limit": [b"1"]}, ("page", "", 1)),
    ({b"_": [b"1700000000"]}, ("document",)),  # (a cache buster: ignored)
])
def test_query_forms(query, form):
    """No query: the document; summary: the counts; limit and/or after: a page."""
    assert parse_query(query) == form


@pytest.mark.parametrize("query, message", [
    ({b"limit": [b"0"]}, "limit must be a whole number from 1 to 1000"),
    ({b"limit": [b"-1"]}, "limit must be a whole number from 1 to 1000"),
    ({b"limit": [b"1001"]}, "limit must be a whole number from 1 to 1000"),
    ({b"limit": [b"99999999999999999999999"]}, "limit must be a whole number from 1 to 1000"),
    ({b"limit": [b"ten"]}, "limit must be a whole number from 1 to 1000"),
    ({b"limit": [b"1.5"]}, "limit must be a whole number from 1 to 1000"),
    ({b"limit": [b""]}, "limit must be a whole number from 1 to 1000"),
    ({b"limit": ["\u0663".encode()]}, "limit must be a whole number from 1 to 1000"),  # (an Arabic-Indic 3)
    ({b"limit": [b"5", b"6"]}, "limit is given more than once"),
    ({b"after": [b"\xff"]}, "after is not UTF-8"),
    ({b"summary": [b""], b"limit": [b"5"]}, "summary takes no limit or after"),
])
def test_bad_queries(query, message):
    """Bad limits, repeated parameters and mixed forms are refused with a reason."""
    with pytest.raises(ValueError) as e:
        parse_query(query)
    assert str(e.value) == message


@pytest.mark.parametrize("header, expected", [
    (b"gzip", True), (b"gzip, deflate, br", True), (b"deflate, gzip;q=0.5", True), (b"x-gzip", True),
    (b"*", True), (b"GZIP", True), (b"", False), (b"identity", False), (b"br", False),
    (b"gzip;q=0", False), (b"gzip;q=0.0, *", False), (b"*;q=0", False), (b"gzip;q=nonsense", False),
    (b"br, *;q=0.1", True),
])
def test_accept_encoding(header, expected):
    """gzip is used when Accept-Encoding names it (or *) with a quality above 0."""
    assert accepts_gzip(header) is expected


def test_if_none_match():
    """If-None-Match matches the tag, its weak form, a list holding it, the gzip form's tag, or *."""
    tag = b'"abc"'
    for header in (b'"abc"', b'W/"abc"', b'"x", "abc"', b'"abc-gz"', b"*", b' "y" ,W/"abc-gz"'):
        assert not_modified(header, tag), header
    for header in (b"", b'"abcd"', b"abc", b'"ab"'):
        assert not not_modified(header, tag), header


def test_pacer_gives_turns_per_key():
    """The pacer answers a burst at once, then one request per 1/rate, first come first served, per key."""
    clock = Clock()
    pacer = Pacer(clock, rate=10, burst=3)
    assert [pacer.delay("a") for _ in range(3)] == [0, 0, 0]
    assert [round(pacer.delay("a"), 6) for _ in range(3)] == [0.1, 0.2, 0.3]
    assert pacer.delay("b") == 0  # another address: its own turns
    clock.advance(10)
    assert [pacer.delay("a") for _ in range(3)] == [0, 0, 0]
    assert Pacer(clock, rate=0, burst=1).delay("a") == 0


# -- the routes ----------------------------------------------------------------------


class Fetch:
    """
    Requests through treq's in-memory agent (no sockets, and no gzip added or
    undone behind the test's back), advancing the web app's fake clock until
    each answer is complete.
    """

    def __init__(self, web, clock):
        self.agent = RequestTraversalAgent(web.resource())
        self.clock = clock

    def __call__(self, path, method="GET", headers=None, turns=1000):
        out = []
        d = self.agent.request(method.encode(), b"http://localhost" + path.encode(),
                               Headers({k: [v] for k, v in (headers or {}).items()}))
        d.addCallback(lambda response: treq.content(response).addCallback(lambda body: (response, body)))
        d.addBoth(out.append)
        for _ in range(turns):
            self.agent.flush()
            if out:
                break
            calls = self.clock.getDelayedCalls()
            self.clock.advance(max(0.0, min(c.getTime() for c in calls) - self.clock.seconds()) if calls else 0)
        assert out and isinstance(out[0], tuple), out
        return out[0]


@pytest.fixture
def served():
    registry, clock = registry_of(2500, pairs=5)
    web = SignalingWeb(registry, clock=clock)
    return registry, clock, web, Fetch(web, clock)


def header(response, name):
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def test_route_document_with_etag_and_conditional(served):
    """The document comes with an ETag; If-None-Match with it gives 304 and no body; a change, 200 again."""
    registry, clock, web, fetch = served
    response, body = fetch("/api/stats")
    assert response.code == 200 and json.loads(body) == stats_document(registry.peers())
    etag = header(response, "etag")
    assert etag.startswith('"') and response.length == len(body)  # (the client takes Content-Length out)
    assert header(response, "vary") == "Origin, Accept-Encoding"
    assert header(response, "cache-control") == "no-store"
    response, body = fetch("/api/stats", headers={"If-None-Match": etag})
    assert (response.code, body, header(response, "etag")) == (304, b"", etag)
    registry.remove("user-00001")
    response, body = fetch("/api/stats", headers={"If-None-Match": etag})
    assert response.code == 200 and header(response, "etag") != etag
    assert "user-00001" not in {u["id"] for u in json.loads(body)["users"]}


def test_route_gzip(served):
    """Accept-Encoding: gzip gets the gzip form (Content-Encoding, its own ETag); without it, identity."""
    registry, clock, web, fetch = served
    response, body = fetch("/api/stats", headers={"Accept-Encoding": "gzip, deflate"})
    assert header(response, "content-encoding") == "gzip" and response.length == len(body)
    assert json.loads(gzip.decompress(body)) == stats_document(registry.peers())
    gz_tag = header(response, "etag")
    assert gz_tag.endswith('-gz"')
    response, _ = fetch("/api/stats", headers={"Accept-Encoding": "gzip", "If-None-Match": gz_tag})
    assert response.code == 304 and header(response, "etag") == gz_tag
    response, plain = fetch("/api/stats", headers={"If-None-Match": gz_tag})  # the same content: 304 too
    assert response.code == 304
    response, plain = fetch("/api/stats", headers={"Accept-Encoding": "identity"})
    assert header(response, "content-encoding") is None and gzip.decompress(body) == plain


def test_route_small_bodies_are_not_compressed():
    """A body under GZIP_MIN bytes goes as it is, even to a client that takes gzip."""
    registry, clock = registry_of(2)
    fetch = Fetch(SignalingWeb(registry, clock=clock), clock)
    response, body = fetch("/api/stats?summary", headers={"Accept-Encoding": "gzip"})
    assert header(response, "content-encoding") is None and json.loads(body)["connectedUsers"] == 2


def test_route_head(served):
    """HEAD answers the headers of GET (length, ETag, type) and no body."""
    _, _, _, fetch = served
    get, body = fetch("/api/stats")
    head, nothing = fetch("/api/stats", method="HEAD")
    assert head.code == 200 and nothing == b"" and header(head, "content-length") == str(len(body))
    for name in ("etag", "content-type", "vary"):
        assert header(head, name) == header(get, name), name


def test_route_summary_and_pages(served):
    """?summary is the counts; ?limit&after pages, in id order, with next."""
    registry, _, _, fetch = served
    response, body = fetch("/api/stats?summary")
    assert json.loads(body) == {"connectedUsers": 2500, "idle": 2490, "connecting": 0, "connected": 10,
                                "pairs": 5, "offline": 0}
    seen, after = [], ""
    while True:
        response, body = fetch(f"/api/stats?limit=700&after={after}")
        page = json.loads(body)
        assert response.code == 200 and page["connectedUsers"] == 2500 and header(response, "etag")
        seen += [u["id"] for u in page["users"]]
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == sorted(p.id for p in registry.peers())


@pytest.mark.parametrize("query", ["limit=0", "limit=-5", "limit=1001", "limit=abc", "limit=2.5",
                                   "limit=1&limit=2", "summary&after=x"])
def test_route_bad_query_is_400(served, query):
    """A bad query is answered 400 with the reason as JSON."""
    _, _, _, fetch = served
    response, body = fetch("/api/stats?" + query)
    assert response.code == 400 and header(response, "content-type") == "application/json"
    assert json.loads(body)["error"]


def test_route_stats_unavailable_is_503():
    """A registry that cannot list its peers (Redis unreachable) gives 503 with the reason."""

    class Broken:
        def peers(self):
            return fail(ConnectionError("redis is unreachable"))

    clock = Clock()
    response, body = Fetch(SignalingWeb(Broken(), clock=clock), clock)("/api/stats")
    assert response.code == 503 and "redis is unreachable" in json.loads(body)["error"]


def test_route_requests_after_a_change_need_one_capture(served):
    """Every form of request after a change is answered from one new capture."""
    registry, clock, web, fetch = served
    fetch("/api/stats")
    registry.add("new-1", "10.9.9.9")
    for _ in range(5):
        fetch("/api/stats?summary")
        fetch("/api/stats", headers={"Accept-Encoding": "gzip"})
    assert web.stats_cache.documents.captures == 2


def test_route_pacing_per_address():
    """Past the burst, an address's requests wait their turn (not refused); every one is answered."""
    registry, clock = registry_of(3)
    web = SignalingWeb(registry, clock=clock, stats_rate=2, stats_burst=2)
    fetch = Fetch(web, clock)
    start = clock.seconds()
    codes = [fetch("/api/stats")[0].code for _ in range(4)]
    assert codes == [200] * 4
    assert clock.seconds() - start == pytest.approx(1.0)  # the 3rd at +0.5 s, the 4th at +1 s


def test_route_metrics_and_dashboard_conditional_and_gzip():
    """/metrics and /api/dashboard carry ETags, answer 304 to their own and take gzip; fds are counted rarely."""
    from memory import Harness

    from signaling.metrics import FD_INTERVAL, ServerMetrics

    h = Harness()
    for _ in range(3):
        h.connect()
    counted = []
    metrics = ServerMetrics(h.factory, h.registry, h.clock, count_fds=lambda: counted.append(1) or succeed(42))
    web = SignalingWeb(h.registry, clock=h.clock, metrics=metrics, stats_rate=0)
    fetch = Fetch(web, h.clock)
    response, body = fetch("/api/dashboard")
    assert response.code == 200 and json.loads(body)["users"]["users"] == 3
    etag = header(response, "etag")
    response, body = fetch("/api/dashboard", headers={"If-None-Match": etag})
    assert response.code == 200 and header(response, "etag") != etag  # a new capture: its time moved
    assert metrics.dashboards.captures == 2
    response, body = fetch("/api/dashboard", headers={"Accept-Encoding": "gzip"})
    assert len(body) < stats.GZIP_MIN and header(response, "content-encoding") is None  # (too small to compress)
    response, body = fetch("/metrics", headers={"Accept-Encoding": "gzip"})
    assert header(response, "content-encoding") == "gzip"
    assert b'signaling_users{state="idle"} 3.0' in gzip.decompress(body)
    assert counted == []  # (counted once at start; FD_INTERVAL has not passed)
    h.clock.advance(FD_INTERVAL)
    response, body = fetch("/metrics")
    assert counted == [1] and b"process_open_fds 42.0" in body
    fetch("/metrics")
    assert counted == [1]


def test_exposition_is_made_a_few_families_a_step():
    """The exposition is built in the slicer, a few metric families a step, the same text as at once."""
    from memory import Harness

    from signaling.metrics import FAMILIES_PER_STEP, ServerMetrics

    h = Harness()
    h.connect()
    metrics = ServerMetrics(h.factory, h.registry, h.clock)
    slicer = metrics.stats.slicer
    slicer.budget, slicer.timer, slicer.min_steps = 1 * TICK, Ticks(TICK), 1  # one step a turn
    d = metrics.exposition_body()
    body, turns = turn_by_turn(h.clock, d)
    from test_metrics import families

    sliced, whole = families(body.data().decode()), families(metrics.exposition().decode())
    assert len(whole) > 20 and turns >= 1 + len(whole) / FAMILIES_PER_STEP  # (the summary, then the families)
    assert list(sliced) == list(whole)  # every family, in the same order
    for name in sliced:
        if name.startswith("signaling_"):  # (the process's own figures move between the two)
            assert sliced[name] == whole[name], name


def test_metrics_requests_waiting_together_share_one_capture():
    """Requests that arrive while the exposition is fresh wait for the next capture, and all share it."""
    from memory import Harness

    from signaling.metrics import ServerMetrics

    h = Harness()
    metrics = ServerMetrics(h.factory, h.registry, h.clock)
    first = result_of(metrics.exposition_body(), h.clock)
    waiting = [metrics.exposition_body() for _ in range(5)]
    assert not any(d.called for d in waiting)
    h.clock.advance(INTERVAL)
    bodies = [result_of(d, h.clock) for d in waiting]
    assert all(b is bodies[0] for b in bodies) and bodies[0] is not first
    assert metrics.expositions.captures == 2


def test_body_of_small_data():
    """Body.of splits data in chunks and tags it by its content."""
    body = Body.of(b"x" * (stats.CHUNK * 2 + 5))
    assert [len(c) for c in body.chunks] == [stats.CHUNK, stats.CHUNK, 5]
    assert body.etag == Body.of(body.data()).etag != Body.of(b"y").etag
    assert Body.of(b"").chunks == (b"",) and Body.of(b"").length == 0


def test_hide_ip_is_kept_with_metrics_of_their_own():
    """A web app that hides addresses never serves the stats of metrics that do not."""
    from memory import Harness

    from signaling.metrics import ServerMetrics

    h = Harness()
    h.connect()
    web = SignalingWeb(h.registry, clock=h.clock, hide_ip=True, metrics=ServerMetrics(h.factory, h.registry, h.clock))
    _, body = Fetch(web, h.clock)("/api/stats")
    [user] = json.loads(body)["users"]
    assert user["ip"] is None


def test_lazily_parsed_peers_are_read_in_slices():
    """A registry with peers_lazily (the cluster's) has its peers read 16 a step, not all in the first turn."""
    from signaling.registry import Peer

    parsed = []

    class Lazy:
        def peers_lazily(self):
            def each():
                for i in range(320):
                    parsed.append(i)
                    yield Peer(f"p{i:03d}", "10.0.0.1", T0 + i, node="n1")

            return succeed(each())

        def peers(self):
            raise AssertionError("peers_lazily is used instead")

    clock = Clock()
    slicer = Slicer(clock, budget=4 * TICK, timer=Ticks(TICK), min_steps=1)
    d = StatsCache(Lazy(), clock, slicer=slicer).document()
    assert len(parsed) == 3 * stats.BATCH  # the first turn: 4 steps (the first waits for the reply)
    snapshot, _ = turn_by_turn(clock, d)
    assert snapshot.counts["users"] == 320 and slicer.max_steps == 4


def one_turn(clock):
    """Run what is due now on ``clock`` (not what that schedules for the next turn)."""
    calls = sorted((c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()), key=lambda c: c.getTime())
    for call in calls:
        if call.active():
            clock.calls.remove(call)
            call.called = 1
            call.func(*call.args, **call.kw)
    return bool(calls)


class Written:
    """A request as _Chunks sees it: what was written in which turn, and whether it finished."""

    def __init__(self, turn):
        self.turn = turn  # [the current turn's number]
        self.turns = {}  # turn -> bytes written
        self.finished = False
        self.producer = None

    def notifyFinish(self):
        return Deferred()

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        self.turns[self.turn[0]] = self.turns.get(self.turn[0], 0) + len(data)

    def finish(self):
        self.finished = True


def test_bodies_are_written_within_a_budget_per_turn():
    """Two large bodies at once: at most the turn's budget (one chunk over at most) is written per turn, in all."""
    from signaling.web import WriteBudget, _Chunks

    clock = Clock()
    turn = [0]
    budget = WriteBudget(clock, per_turn=64 * 1024)
    body = Body.of(b"x" * (600 * 1024))
    a, b = Written(turn), Written(turn)
    _Chunks(a, body.chunks, budget).start()
    _Chunks(b, body.chunks, budget).start()
    while not (a.finished and b.finished):
        turn[0] += 1
        assert one_turn(clock), "stuck"
    for n in range(turn[0] + 1):
        assert a.turns.get(n, 0) + b.turns.get(n, 0) <= 64 * 1024 + stats.CHUNK, n
    assert sum(a.turns.values()) == sum(b.turns.values()) == 600 * 1024
    assert turn[0] >= 2 * 600 // 80 and a.producer is None and b.producer is None
    # the first turn was a's alone (b began after it); from then on they take chunks in turn
    assert a.turns[0] == 64 * 1024 and 0 not in b.turns
    assert all(a.turns[n] == b.turns[n] == 32 * 1024 for n in range(1, 15))


def test_a_paused_body_waits_for_its_connection():
    """A body whose connection's buffer is full (paused) writes nothing more until resumed."""
    from signaling.web import WriteBudget, _Chunks

    clock = Clock()
    request = Written([0])
    chunks = _Chunks(request, Body.of(b"y" * (100 * 1024)).chunks, WriteBudget(clock, per_turn=10 ** 9))
    chunks.pauseProducing()
    chunks.start()
    assert request.turns == {}
    chunks.resumeProducing()
    assert sum(request.turns.values()) == 100 * 1024 and request.finished


class _HeldPeer:
    """What the write batch writes to: its frames go into a shared log."""

    def __init__(self, log):
        self.log = log

    def write_held(self, data):
        self.log.append(data)


@pytest.mark.parametrize("work", ["slicer", "write budget"])
def test_relays_held_in_a_turn_go_out_before_background_work(work):
    """
    Background work scheduled before a poll (a slice, a turn of body
    writes) lets the relays that poll's events held go out first: its
    ``first`` hook flushes the write batch, although the batch's own
    end-of-turn call was made later and would run after it.
    """
    from signaling.web import WriteBudget
    from signaling.writes import WriteBatch

    clock = Clock()
    log = []
    batch = WriteBatch(clock)
    if work == "slicer":
        slicer = Slicer(clock, first=batch.flush)
        d = slicer.run(counting_job(3, log), now=False)  # (its turn: a callLater(0), made first)
    else:
        budget = WriteBudget(clock, first=batch.flush)

        class Producer:
            def budget_left(self):
                log.append("body")
                return False

        budget.wait(Producer())
    batch.open()  # the poll's events: a relay held until the end of the turn
    batch.hold(_HeldPeer(log), b"relay")
    clock.advance(0)
    assert log[0] == b"relay" and len(log) > 1
    assert log.count(b"relay") == 1  # (the batch's own call later finds nothing left)
    if work == "slicer":
        turn_by_turn(clock, d)
        assert log == [b"relay", 0, 1, 2]
