"""
What ``GET /api/stats`` answers, built off the relay path.

With 10,000 users the stats document is about 1.6 MB of JSON.  Built in one
go on the reactor thread at each request (as it was: 70 ms for 5,000 users,
some 250 ms for 10,000 on a busy 2-core machine), it held every relay back
while pollers asked for it.  Here:

- :class:`Slicer` runs long jobs a slice at a time: at most
  :data:`SLICE` seconds of them per reactor turn, the rest in later turns, so
  that the reads and writes of every connection are handled in between.
- :class:`Captures` shares and paces the work: a request is answered from
  a capture of the registry begun after it arrived, or from an earlier one
  when the registry's change counter (``generation``) says nothing changed
  since; captures begin at most every :data:`INTERVAL` seconds, and
  everyone waiting for the next one shares it.  (So an answer is never
  older than its request, and polling as fast as one can costs at most one
  capture per interval.)
- :class:`StatsCache` builds the document in slices from per-user JSON
  fragments it keeps between captures (a user whose entry did not change is
  not encoded again), into a :class:`Body`: chunks of about :data:`CHUNK`
  bytes, an ETag (a hash of the content, the same for the same document),
  and its gzip form, compressed in slices when a client first asks for it.
- Pages (users in id order, ``after`` an id) and the counts (``summary``)
  are derived from the same capture.

Nothing here knows HTTP; :mod:`signaling.web` serves the bodies.
"""

import heapq
import math
import time
import zlib
from bisect import bisect_right
from collections import OrderedDict, deque
from datetime import datetime, timezone
from hashlib import blake2b
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Tuple

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.python.failure import Failure

from signaling import messages
from signaling.results import is_deferred

__all__ = ["Body", "Captures", "Slicer", "Snapshot", "StatsCache", "iso_utc", "user_entry"]

#: seconds of slicing work per reactor turn, at most (past the first MIN_STEPS steps)
SLICE = 0.0001
#: steps a turn always takes, whatever the time
MIN_STEPS = 1
#: seconds between the beginnings of two captures, at least
INTERVAL = 0.25
#: bytes per chunk of a body: what is hashed, compressed and written at once
CHUNK = 16 * 1024
#: users encoded per step (a step is a few tens of microseconds)
BATCH = 8
#: peers sorted at once (sorted runs are then merged lazily)
RUN = 128
#: the most users a page may ask for (``?limit=``)
MAX_PAGE = 1000
#: gzip: the compression level, the smallest body worth compressing, and the
#: bytes compressed a step.  Level 3: 6 ms for 10,000 users' 1.5 MB, to 288 KB
#: (level 6: 12 ms, 267 KB); a document that keeps changing is compressed
#: again at each capture.
GZIP_LEVEL = 3
GZIP_MIN = 1024
GZIP_STEP = 2048
#: zlib's memLevel: 6 emits a compressed block every 4,096 symbols (the
#: default 8: every 16,384), so that no step takes more than about 80 us
#: (200 us with 8), for 0.3% more bytes and 15% more time
GZIP_MEMLEVEL = 6
#: pages of one capture kept encoded (with their gzip form, once made)
PAGES_KEPT = 64

JSON = b"application/json"


_SECONDS: Dict[int, str] = {}  # whole second -> "2025-09-09T13:00:00." (users arrive in bursts)


def iso_utc(seconds: float) -> str:
    """Format a POSIX time as ``2025-09-09T13:00:00.000Z`` (UTC, milliseconds)."""
    if seconds < 0:
        moment = datetime.fromtimestamp(seconds, timezone.utc)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (moment.microsecond // 1000)
    # rounded to microseconds as datetime.fromtimestamp rounds (half to even), then cut to milliseconds
    fraction, whole = math.modf(seconds)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1
    second = int(whole)
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        prefix = _SECONDS[second] = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(second))
    return "%s%03dZ" % (prefix, micros // 1000)


def protocol_of(peer_id: str) -> str:
    """The wire protocol of a registered id: its prefix (``peerjs/...``), or ``native``."""
    prefix, slash, _ = peer_id.partition("/")
    return prefix if slash else "native"


def user_entry(peer, hide_ip: bool = False, topics: Optional[int] = None) -> dict:
    """
    One user of the stats document (the v1 keys, in order; then
    ``protocol``; ``node`` in a cluster; ``topics`` for a y-webrtc client
    of this process).
    """
    user = {
        "id": peer.id,
        "state": peer.state,
        "targetUser": peer.target,
        "connectedAt": iso_utc(peer.connected_at),
        "ip": None if hide_ip else peer.ip,
        "online": peer.online,
        "protocol": protocol_of(peer.id),
    }
    if peer.node is not None:  # (a cluster's registry says which node)
        user["node"] = peer.node
    if topics is not None:
        user["topics"] = topics
    return user


def _connected_at(peer) -> float:
    return peer.connected_at


def etag_of(*parts: bytes) -> bytes:
    """A strong ETag (quoted) for content made of ``parts``."""
    h = blake2b(digest_size=12)
    for part in parts:
        h.update(part)
    return b'"' + h.hexdigest().encode("ascii") + b'"'


class Body:
    """
    An encoded response body: its ``chunks`` (written one after another),
    ``length``, ``etag`` (quoted), and, once asked for, its gzip form
    (:meth:`gzipped`), whose ETag is this one with ``-gz``.
    """

    __slots__ = ("chunks", "length", "etag", "content_type", "encoding", "_gzip")

    def __init__(self, chunks, etag: bytes, content_type: bytes = JSON, encoding: Optional[bytes] = None):
        self.chunks: Tuple[bytes, ...] = tuple(chunks)
        self.length = sum(len(c) for c in self.chunks)
        self.etag = etag
        self.content_type = content_type
        self.encoding = encoding
        self._gzip: Any = None  # a Deferred while compressing, then the Body

    @classmethod
    def of(cls, data: bytes, content_type: bytes = JSON) -> "Body":
        """A body of one piece (small: hashed at once)."""
        return cls([data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""], etag_of(data), content_type)

    def data(self) -> bytes:
        return b"".join(self.chunks)

    def gzipped(self, slicer: "Slicer") -> Deferred:
        """Fires with the gzip form of this body (compressed in slices, once, shared)."""
        if self._gzip is None:
            self._gzip = _Shared(slicer.run(self._compress()))
        shared = self._gzip
        if isinstance(shared, Body):
            return succeed(shared)
        if shared.done and isinstance(shared.result, Body):
            self._gzip = shared.result
        return shared.wait()

    def _compress(self):
        z = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31, GZIP_MEMLEVEL)  # 31: a gzip header and trailer
        out: List[bytes] = []
        for chunk in self.chunks:
            view = memoryview(chunk)
            for i in range(0, len(view), GZIP_STEP):
                piece = z.compress(view[i:i + GZIP_STEP])
                if piece:
                    out.append(piece)
                yield
        out.append(z.flush())
        return Body(out, self.etag[:-1] + b'-gz"', self.content_type, b"gzip")


class _Shared:
    """One Deferred result handed to any number of waiters (each gets its own Deferred)."""

    def __init__(self, deferred: Deferred):
        self.done = False
        self.result: Any = None
        self.waiters: List[Deferred] = []
        self.deferred = deferred
        deferred.addBoth(self._fire)

    def _fire(self, result) -> None:
        self.done, self.result = True, result
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            _fire(w, result)

    def wait(self) -> Deferred:
        d: Deferred = Deferred(lambda d: self.waiters.remove(d) if d in self.waiters else None)
        if self.done:
            _fire(d, self.result)
        else:
            self.waiters.append(d)
        return d


def _fire(d: Deferred, result) -> None:
    """Fire ``d`` with ``result`` (a value or a Failure) unless it was cancelled."""
    if d.called:
        return
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)


class Slicer:
    """
    Runs jobs a slice at a time on the reactor thread.

    A job is a generator: each ``next()`` does one small step (tens of
    microseconds); it may yield a Deferred to wait for (its result is sent
    back in, or its failure thrown in); what it returns fires the Deferred
    :meth:`run` gave.  A turn runs steps of the jobs in turn (round robin)
    until it has spent ``budget`` seconds (it always takes ``min_steps``
    steps: with more than one, a small job ends in the turn it began), then
    leaves the rest for the next reactor turn (``callLater(0)``: the
    reactor polls its sockets first).

    :param clock: ``callLater`` (the reactor, or a fake clock).
    :param timer: what the budget is measured with (a fake in tests).
    :param first: called at the beginning of every turn, before any step:
        the relays' write batch (``WriteBatch.flush``), so that what the
        last poll's events sent goes out before this background work
        (a ``callLater(0)`` made before theirs would otherwise run first).
    """

    def __init__(self, clock, budget: float = SLICE, timer: Callable[[], float] = time.perf_counter,
                 min_steps: int = MIN_STEPS, first: Callable[[], None] = lambda: None):
        self.clock = clock
        self.budget = budget
        self.timer = timer
        self.min_steps = min_steps
        self.first = first
        self._ready: Deque[list] = deque()  # [job, deferred, (value or Failure) to send in]
        self._call = None
        self._in_turn = False
        #: turns run, and the most steps one turn took (for tests and curiosity)
        self.turns = 0
        self.max_steps = 0

    @property
    def busy(self) -> bool:
        return bool(self._ready) or self._call is not None

    def run(self, job: Iterator, now: bool = True) -> Deferred:
        """
        Run ``job``; it begins in this turn if nothing else is running and
        ``now`` (the caller's turn then takes one more slice), else in the next.
        """
        d: Deferred = Deferred()
        self._ready.append([job, d, None])
        if now and self._call is None and not self._in_turn:
            self._turn()
        else:
            self._schedule()
        return d

    def _schedule(self) -> None:
        if self._call is None and not self._in_turn and self._ready:
            self._call = self.clock.callLater(0, self._turn)

    def _wake(self, result, task) -> None:
        task[2] = result
        self._ready.append(task)
        self._schedule()

    def _turn(self) -> None:
        self._call = None
        self._in_turn = True
        self.turns += 1
        self.first()
        timer, ready = self.timer, self._ready
        start, steps = timer(), 0
        try:
            while ready:
                task = ready.popleft()
                job, d, value = task
                task[2] = None
                try:
                    if isinstance(value, Failure):
                        out = value.throwExceptionIntoGenerator(job)
                    else:
                        out = job.send(value)
                except StopIteration as stop:
                    d.callback(stop.value)
                except BaseException:
                    d.errback()
                else:
                    if isinstance(out, Deferred):
                        out.addBoth(self._wake, task)
                    else:
                        ready.append(task)
                steps += 1
                if steps >= self.min_steps and timer() - start >= self.budget:
                    break
        finally:
            self._in_turn = False
            self.max_steps = max(self.max_steps, steps)
            self._schedule()


class Captures:
    """
    Shared, paced captures of something costly to make (a document, counts).

    :meth:`get` fires with a capture begun after it was called, or with the
    last one if ``generation()`` (a change counter; None if unknown) is the
    same as when that one began.  A capture begins at most every
    ``interval`` seconds (counted from the beginning of the last), one at a
    time; every request waiting for the next capture shares it.

    :param capture: ``() ->`` the product, or a Deferred of it.
    :param slicer: if given, the requests that waited for a capture are
        answered through it, a few a turn (each answer is an HTTP response to
        write: a fraction of a millisecond), instead of all in one turn.
    """

    def __init__(self, clock, capture: Callable[[], Any], interval: float = INTERVAL,
                 generation: Callable[[], Any] = lambda: None, slicer: Optional["Slicer"] = None):
        self.clock = clock
        self.capture = capture
        self.interval = interval
        self.generation = generation
        self.slicer = slicer
        self.latest: Any = None
        self.latest_generation: Any = None
        self.captures = 0  # begun so far
        self._began: Optional[float] = None
        self._running: Optional[Tuple[Any, List[Deferred]]] = None
        self._waiting: List[Deferred] = []
        self._call = None

    def current(self):
        """The last capture if nothing changed since it began (by the generation), else None."""
        gen = self.generation()
        if gen is not None and self.latest is not None and self.latest_generation == gen:
            return self.latest
        return None

    def get(self) -> Deferred:
        latest = self.current()
        if latest is not None:
            return succeed(latest)
        gen = self.generation()
        d: Deferred = Deferred(self._cancel)
        if gen is not None and self._running is not None and self._running[0] == gen:
            self._running[1].append(d)  # nothing changed since the running one began
        else:
            self._waiting.append(d)
            self._schedule()
        return d

    def _cancel(self, d: Deferred) -> None:
        for waiters in (self._waiting, self._running[1] if self._running else []):
            if d in waiters:
                waiters.remove(d)

    def _schedule(self) -> None:
        if self._running is not None or self._call is not None or not self._waiting:
            return
        now = self.clock.seconds()
        wait = 0.0 if self._began is None else self._began + self.interval - now
        if wait <= 0:
            self._begin()
        else:
            self._call = self.clock.callLater(wait, self._begin)

    def _begin(self) -> None:
        self._call = None
        waiters, self._waiting = self._waiting, []
        gen = self.generation()
        self._began = self.clock.seconds()
        self._running = (gen, waiters)
        self.captures += 1
        maybeDeferred(self.capture).addBoth(self._done, gen, waiters)

    def _done(self, result, gen, waiters) -> None:
        self._running = None
        if not isinstance(result, Failure):
            self.latest, self.latest_generation = result, gen
        if self.slicer is not None and len(waiters) > 1:  # (from the next turn: this one made the capture)
            self.slicer.run(_answer(waiters, result), now=False)
        else:
            for w in waiters:
                _fire(w, result)
        self._schedule()


def _answer(waiters: List[Deferred], result):
    """Fire the waiters one step each (a slicer job)."""
    for w in waiters:
        _fire(w, result)
        yield


class Snapshot:
    """
    One capture of the registry, encoded: the v1 document (:attr:`body`),
    its counts (:attr:`counts`), and pages and the summary on demand.

    :param ids: every user's id, oldest first.
    :param made: id -> (what its entry was made of, its JSON), for every
        user (the cache's, shared: a snapshot holds no object per user of its
        own, so that dropping one costs little).
    """

    def __init__(self, generation, taken_at: float, counts: Dict[str, int], body: Body,
                 ids: List[str], made: Dict[str, Tuple[tuple, bytes]]):
        self.generation = generation
        self.taken_at = taken_at
        self.counts = counts
        self.body = body
        self.ids = ids
        self.made = made
        self._summary: Optional[Body] = None
        self._index: Optional[_Shared] = None
        self._by_id: List[str] = []
        self._pages: "OrderedDict[Tuple[str, int], Body]" = OrderedDict()

    def fragment(self, peer_id: str) -> bytes:
        """A user's entry in the document (JSON)."""
        return self.made[peer_id][1]

    @property
    def users(self) -> int:
        return self.counts["users"]

    def summary(self) -> Body:
        """``?summary``: the counts only."""
        if self._summary is None:
            c = self.counts
            self._summary = Body.of(messages.encode({
                "connectedUsers": c["users"], "idle": c["idle"], "connecting": c["connecting"],
                "connected": c["connected"], "pairs": c["pairs"], "offline": c["offline"],
            }))
        return self._summary

    def page(self, slicer: Slicer, after: str, limit: int) -> Deferred:
        """Fires with the page of at most ``limit`` users whose ids sort after ``after``."""
        if self._index is None:
            self._index = _Shared(slicer.run(self._sort_by_id()))
        return self._index.wait().addCallback(lambda _: self._page(after, limit))

    def _sort_by_id(self):
        runs = []
        for i in range(0, len(self.ids), RUN):
            runs.append(sorted(self.ids[i:i + RUN]))
            yield
        by_id = self._by_id
        for n, peer_id in enumerate(heapq.merge(*runs), 1):
            by_id.append(peer_id)
            if n % (BATCH * 4) == 0:
                yield

    def _page(self, after: str, limit: int) -> Body:
        key = (after, limit)
        body = self._pages.get(key)
        if body is not None:
            self._pages.move_to_end(key)
            return body
        by_id, made = self._by_id, self.made
        start = bisect_right(by_id, after) if after else 0
        end = start + limit
        more = end < len(by_id)
        following = messages.encode(by_id[end - 1]) if more else b"null"
        data = b"".join([
            b'{"connectedUsers":%d,"users":[' % self.users, b",".join([made[i][1] for i in by_id[start:end]]),
            b'],"next":', following, b"}",
        ])
        body = self._pages[key] = Body.of(data)
        if len(self._pages) > PAGES_KEPT:
            self._pages.popitem(last=False)
        return body


class StatsCache:
    """
    The stats of one registry, captured in slices and shared by every
    request (``/api/stats`` in all its forms, and the users by state that
    ``/metrics`` and ``/api/dashboard`` show).

    :param registry: an :class:`~signaling.registry.IRegistry`; if it has a
        ``generation`` (a counter of its changes: the in-memory registry),
        an unchanged registry is answered from the last capture at once.
    :param clock: ``seconds`` and ``callLater``.
    :param hide_ip: ``null`` instead of addresses.
    :param interval: seconds between the beginnings of two captures, at least.
    :param slicer: the :class:`Slicer` to build in (one per web app).
    :param rooms: the y-webrtc rooms of this process (``topics_of(id)`` and a
        ``generation`` of their changes), for each y-webrtc user's ``topics``.
    """

    def __init__(self, registry, clock, hide_ip: bool = False, interval: float = INTERVAL,
                 slicer: Optional[Slicer] = None, rooms=None):
        self.registry = registry
        self.rooms = rooms
        self.clock = clock
        self.hide_ip = hide_ip
        self.slicer = slicer if slicer is not None else Slicer(clock)
        self._fragments: Dict[str, Tuple[tuple, bytes]] = {}  # id -> (what it was made of, its JSON)
        self.documents = Captures(clock, self._capture_document, interval, self._generation, self.slicer)
        self.summaries = Captures(clock, self._capture_summary, interval, self._generation, self.slicer)

    def _generation(self):
        generation = getattr(self.registry, "generation", None)
        if generation is None or self.rooms is None:
            return generation
        return generation, self.rooms.generation

    def document(self) -> Deferred:
        """Fires with a :class:`Snapshot`."""
        return self.documents.get()

    def summary(self) -> Deferred:
        """Fires with the counts: ``users``, ``idle``, ``connecting``, ``connected``, ``pairs``, ``offline``."""
        snapshot = self.documents.current()
        if snapshot is not None:
            return succeed(snapshot.counts)
        return self.summaries.get()

    # -- captures ---------------------------------------------------------------

    def _peers(self):
        """
        Every peer, as a list, in slices: a cluster's registry
        (``peers_lazily``) parses each peer from Redis's reply as it is read.
        """
        lazily = getattr(self.registry, "peers_lazily", None)
        peers = lazily() if lazily is not None else self.registry.peers()
        if is_deferred(peers):
            peers = yield peers
        if isinstance(peers, list):
            return peers
        out = []
        for n, peer in enumerate(peers, 1):
            out.append(peer)
            if n % BATCH == 0:
                yield
        return out

    def _capture_document(self) -> Deferred:
        return self.slicer.run(self._build(self._generation(), self.clock.seconds()))

    def _capture_summary(self) -> Deferred:
        return self.slicer.run(self._count())

    def _count(self):
        peers = yield from self._peers()
        counts = {"idle": 0, "connecting": 0, "connected": 0}
        offline = 0
        for n, p in enumerate(peers, 1):
            counts[p.state] += 1
            offline += not p.online
            if n % (BATCH * 16) == 0:
                yield
        return _counts(len(peers), counts, offline)

    def _build(self, generation, taken_at: float):
        peers = yield from self._peers()
        # oldest first: sorted runs, merged as they are read
        runs = []
        for i in range(0, len(peers), RUN):
            runs.append(sorted(peers[i:i + RUN], key=_connected_at))
            yield
        ordered = heapq.merge(*runs, key=_connected_at) if len(runs) > 1 else iter(runs[0] if runs else ())

        hide_ip = self.hide_ip
        rooms = self.rooms
        old, new = self._fragments, {}
        ids: List[str] = []
        chunks: List[bytes] = []
        pending: List[bytes] = []
        pending_size = 0
        h = blake2b(digest_size=12)
        counts = {"idle": 0, "connecting": 0, "connected": 0}
        offline = 0
        for n, p in enumerate(ordered, 1):
            topics = rooms.topics_of(p.id) if rooms is not None and p.id.startswith("yjs/") else None
            made_of = (p.state, p.target, p.online, None if hide_ip else p.ip, p.node, p.connected_at, topics)
            cached = old.get(p.id)
            if cached is None or cached[0] != made_of:
                cached = (made_of, messages.encode(user_entry(p, hide_ip, topics)))
            new[p.id] = cached
            fragment = cached[1]
            ids.append(p.id)
            counts[p.state] += 1
            offline += not p.online
            pending.append(fragment)
            pending_size += len(fragment) + 1
            if pending_size >= CHUNK:
                chunk = (b"," if chunks else b"") + b",".join(pending)
                h.update(chunk)
                chunks.append(chunk)
                pending, pending_size = [], 0
            if n % BATCH == 0:
                yield
        if pending:
            chunk = (b"," if chunks else b"") + b",".join(pending)
            h.update(chunk)
            chunks.append(chunk)
        head = b'{"connectedUsers":%d,"users":[' % len(ids)
        h.update(head)
        self._fragments = new
        body = Body([head, *chunks, b"]}"], b'"' + h.hexdigest().encode("ascii") + b'"')
        return Snapshot(generation, taken_at, _counts(len(ids), counts, offline), body, ids, new)


def _counts(users: int, counts: Dict[str, int], offline: int) -> Dict[str, int]:
    return {"users": users, **counts, "pairs": counts["connected"] // 2, "offline": offline}


def parse_query(args: Dict[bytes, List[bytes]]):
    """
    The form of ``/api/stats`` a query asks for: ``("document",)``,
    ``("summary",)`` or ``("page", after, limit)``; raises ValueError with
    the reason for a 400.  Parameters it does not know are ignored.
    """

    def one(name: bytes) -> Optional[str]:
        values = args.get(name)
        if values is None:
            return None
        if len(values) != 1:
            raise ValueError(f"{name.decode()} is given more than once")
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{name.decode()} is not UTF-8") from None

    summary, limit, after = one(b"summary"), one(b"limit"), one(b"after")
    if summary is not None:
        if limit is not None or after is not None:
            raise ValueError("summary takes no limit or after")
        return ("summary",)
    if limit is None and after is None:
        return ("document",)
    if limit is None:
        count = MAX_PAGE
    elif not (limit.isascii() and limit.isdigit()):
        raise ValueError(f"limit must be a whole number from 1 to {MAX_PAGE}")
    else:
        count = int(limit)
        if not 1 <= count <= MAX_PAGE:
            raise ValueError(f"limit must be a whole number from 1 to {MAX_PAGE}")
    return ("page", after or "", count)
