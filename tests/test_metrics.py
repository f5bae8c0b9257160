"""
Tier 1: the metrics (signaling.metrics), counted in memory with a fake
clock and read back through prometheus_client's own parser.
(tests/test_metrics_live.py: the installed server's /metrics.)
"""

import re

import pytest
from memory import Harness
from prometheus_client.parser import text_string_to_metric_families

from signaling import errors
from signaling.metrics import Histogram, ServerMetrics

pytestmark = pytest.mark.memory


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, name, **labels):
    """The value of one sample of a family (counters' samples end in _total)."""
    for family in fams.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError((name, labels))


def scrape(h):
    metrics = ServerMetrics(h.factory, h.registry, h.clock)
    d = metrics.refresh()
    assert d.called
    return metrics, families(metrics.exposition().decode("utf-8"))


def test_relays_errors_and_users_are_counted():
    """Relays by type and bytes, errors by code, connects, users by state and pairs."""
    h = Harness()
    a, b, c = h.connect(), h.connect(), h.connect()
    h.pair(a, b)
    h.send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "v=0"}})
    h.send(b, {"type": "answer", "to": a.peer_id, "data": {"sdp": "v=0"}})
    for _ in range(3):
        h.send(a, {"type": "ice-candidate", "to": b.peer_id, "data": {"candidate": "x"}})
    h.send(c, {"type": "offer", "to": a.peer_id})  # not paired: invalid-state
    h.send(c, {"type": "ping", "to": "nobody"})  # peer-not-found
    c.sendMessage(b"{not json")
    h.flush()
    _, fams = scrape(h)
    assert value(fams, "signaling_relays_total", type="ping") == 1
    assert value(fams, "signaling_relays_total", type="pong") == 1
    assert value(fams, "signaling_relays_total", type="offer") == 1
    assert value(fams, "signaling_relays_total", type="ice-candidate") == 3
    assert value(fams, "signaling_relayed_bytes_total") > 100
    assert value(fams, "signaling_errors_total", code="invalid-state") == 1
    assert value(fams, "signaling_errors_total", code="peer-not-found") == 1
    assert value(fams, "signaling_errors_total", code="invalid-json") == 1
    assert value(fams, "signaling_connects_total") == 3
    assert value(fams, "signaling_users", state="connected") == 2
    assert value(fams, "signaling_users", state="idle") == 1
    assert value(fams, "signaling_pairs") == 1
    assert value(fams, "signaling_connections", protocol="native") == 3
    assert value(fams, "signaling_relay_seconds_count") == 1  # (the first relay, then one in Counts.SAMPLE)
    assert value(fams, "signaling_info", registry="memory") == 1
    assert "process_cpu_seconds_total" in {s.name for f in fams.values() for s in f.samples}


@pytest.mark.parametrize("how, reason", [
    ("close", "closed"), ("cut", "lost"), ("too_big", "too_big"), ("shutdown", "shutdown"),
])
def test_disconnects_by_reason_and_grace(how, reason):
    """Each way a WebSocket ends is counted under its reason; a lost one also starts a grace period."""
    h = Harness(max_message_size=65536)
    a = h.connect()
    if how == "close":
        a.sendClose(1000)
    elif how == "cut":
        a.transport.abortConnection()
    elif how == "too_big":
        a.sendMessage(b"x" * 70000)
    else:
        h.factory.shutdown(5)
    h.flush()
    h.clock.advance(10)  # (past the close timeout: a peer refused for a too big message is not read again)
    h.flush()
    _, fams = scrape(h)
    assert value(fams, "signaling_disconnects_total", reason=reason) == 1
    others = sum(s.value for s in fams["signaling_disconnects"].samples if s.labels["reason"] != reason)
    assert others == 0
    lost = how in ("cut", "shutdown")  # no close frame from the peer: it may resume
    assert value(fams, "signaling_grace_started_total") == (1 if lost else 0)
    assert value(fams, "signaling_users_offline") == (1 if lost else 0)


def test_resumes_and_expiry_are_counted():
    h = Harness()
    a, b = h.connect(), h.connect()
    token = h.factory.resume_token(a.peer_id)
    a.transport.abortConnection()
    b.transport.abortConnection()
    h.flush()
    h.connect(handshake=False, url=f"ws://127.0.0.1:8080/?resume={token}")
    h.clock.advance(15)
    h.flush()
    _, fams = scrape(h)
    assert value(fams, "signaling_resumes_total", outcome="resumed") == 1
    assert value(fams, "signaling_grace_expired_total") == 1
    assert value(fams, "signaling_grace_started_total") == 2


def test_handshake_refusals_by_status():
    from test_hardening import refusal

    h = Harness(max_connections_per_ip=1)
    h.connect()
    assert refusal(h) == 429
    _, fams = scrape(h)
    assert value(fams, "signaling_handshake_refusals_total", status="429") == 1


def test_labels_never_carry_ids_or_addresses():
    """No label value is a peer id or an address, whatever the traffic."""
    h = Harness()
    peers = [h.connect(host=f"10.1.2.{n}") for n in range(5)]
    h.pair(peers[0], peers[1])
    h.send(peers[2], {"type": "ping", "to": "someone-else"})
    _, fams = scrape(h)
    ids = {p.peer_id for p in peers}
    for family in fams.values():
        for sample in family.samples:
            for label in sample.labels.values():
                assert label not in ids and not re.match(r"\d+\.\d+\.\d+\.\d+$", label), (sample, label)


def test_error_codes_are_the_contracts():
    """The error-code label takes exactly the codes the protocol documents (and the code raises)."""
    doc = open("docs/protocol.rst", encoding="utf-8").read()
    table = doc[doc.index("\nErrors\n"):doc.index("\nClose codes the server sends\n")]
    documented = set(re.findall(r"^``([a-z-]+)``\s{2,}", table, re.M))
    assert set(errors.ERROR_CODES) == documented
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.SignalingError)]
    raised = {cls.code for cls in classes}
    assert raised <= set(errors.ERROR_CODES)


def test_histogram():
    hist = Histogram((0.001, 0.01))
    for v in (0.0005, 0.002, 0.003, 0.5):
        hist.observe(v)
    assert hist.buckets() == [("0.001", 1), ("0.01", 3), ("+Inf", 4)]
    assert hist.count == 4 and hist.quantile(0.5) == 0.01 and hist.quantile(1.0) == float("inf")
    assert Histogram().quantile(0.5) is None


def test_one_relay_in_sample_is_timed():
    """The relay latency histogram times the first relay and then one in Counts.SAMPLE."""
    from signaling.metrics import Counts

    h = Harness(rate=0)
    a, b = h.connect(), h.connect()
    h.pair(a, b)  # 2 relays
    for _ in range(3 * Counts.SAMPLE - 2):
        a.send_json({"type": "ice-candidate", "to": b.peer_id, "data": {}})
    h.flush()
    _, fams = scrape(h)
    assert value(fams, "signaling_relays_total", type="ice-candidate") == 3 * Counts.SAMPLE - 2
    assert value(fams, "signaling_relay_seconds_count") == 3


def test_other_wire_formats_by_protocol_in_metrics_and_stats():
    """
    PeerJS and y-webrtc connections are counted under their own protocol (and
    the native ones no more), with their own families; each user of the stats
    says its protocol, and a y-webrtc user of this process its topic count.
    """
    import json

    from signaling.peerjs_protocol import serve_peerjs
    from signaling.stats import StatsCache
    from signaling.yjs_protocol import install

    h = Harness()
    serve_peerjs(h.factory)
    install(h.factory)
    native = h.connect()
    pj = h.connect(handshake=False, url="ws://127.0.0.1:8080/peerjs?key=peerjs&id=alice&token=t1")
    assert [m["type"] for m in pj.take()] == ["OPEN"]
    pj.send_json({"type": "OFFER", "dst": "bob", "payload": {"sdp": "x"}})  # bob is not here yet: held
    y1 = h.connect(handshake=False, url="ws://127.0.0.1:8080/yjs")
    y2 = h.connect(handshake=False, url="ws://127.0.0.1:8080/yjs")
    h.send(y1, {"type": "subscribe", "topics": ["room-a", "room-b"]})
    h.send(y2, {"type": "subscribe", "topics": ["room-a", 7]})  # 7: an invalid topic, refused
    h.send(y1, {"type": "publish", "topic": "room-a", "data": 1})
    metrics = ServerMetrics(h.factory, h.registry, h.clock, stats=StatsCache(h.registry, h.clock, rooms=h.factory.yjs))
    metrics.refresh()
    h.clock.advance(1)
    fams = families(metrics.exposition().decode("utf-8"))
    assert value(fams, "signaling_connections", protocol="native") == 1
    assert value(fams, "signaling_connections", protocol="peerjs") == 1
    assert value(fams, "signaling_connections", protocol="yjs") == 2
    assert value(fams, "signaling_peerjs_held_total", outcome="held") == 1
    assert value(fams, "signaling_yjs_publishes_total") == 1
    assert value(fams, "signaling_yjs_delivered_total") == 2
    assert value(fams, "signaling_yjs_refused_total", reason="invalid-topic") == 1
    assert value(fams, "signaling_yjs_topics") == 2 and value(fams, "signaling_yjs_subscriptions") == 3

    d = metrics.stats.document()
    h.clock.advance(1)
    users = {u["id"]: u for u in json.loads(d.result.body.data())["users"]}
    assert users[native.peer_id]["protocol"] == "native" and "topics" not in users[native.peer_id]
    assert users["peerjs/alice"]["protocol"] == "peerjs"
    yjs = sorted((u["protocol"], u["topics"]) for u in users.values() if u["id"].startswith("yjs/"))
    assert yjs == [("yjs", 1), ("yjs", 2)]

    h.send(y2, {"type": "unsubscribe", "topics": ["room-a"]})  # (a change the stats must see)
    d = metrics.stats.document()
    h.clock.advance(1)
    users = json.loads(d.result.body.data())["users"]
    assert sorted(u["topics"] for u in users if u["protocol"] == "yjs") == [0, 2]
    for c in (pj, y1, y2):
        c.sendClose(1000)
    h.flush()
    h.clock.advance(1)
    fams = families(metrics.exposition().decode("utf-8"))
    assert value(fams, "signaling_connections", protocol="peerjs") == 0
    assert value(fams, "signaling_connections", protocol="yjs") == 0
    assert value(fams, "signaling_connections", protocol="native") == 1


def test_open_descriptors_are_counted_exactly():
    """process_open_fds: opening descriptors raises the count by as many (by stat on Linux 6.2+, else listed)."""
    import os
    import sys

    from signaling.metrics import count_open_fds, open_fds_by_stat

    if not sys.platform.startswith("linux"):
        pytest.skip("/proc is Linux's")
    before = count_open_fds()
    fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(37)]
    try:
        assert count_open_fds() == before + 37
        by_stat = open_fds_by_stat()
        if by_stat is not None:  # (the listing counts its own descriptor on the directory too)
            assert by_stat == len(os.listdir("/proc/self/fd")) - 1 == before + 37
    finally:
        for fd in fds:
            os.close(fd)
    assert count_open_fds() == before
    assert open_fds_by_stat("/nonexistent") is None
