"""
Tier 3: y-webrtc's protocol at /yjs on the installed server, over real
loopback sockets (``websockets`` clients): one process on both ports, and
two nodes of a Redis cluster.
"""

import asyncio
import json

import pytest
import websockets
from live import TIMEOUT, ServerProcess, run
from redis_server import RedisServer

NODE_TIMEOUT = "2"


async def yjs(url, *topics):
    """A y-webrtc-like client at ``url``, subscribed to ``topics`` (and synced: a ping answered)."""
    ws = await asyncio.wait_for(websockets.connect(url, max_size=None, ping_interval=None), TIMEOUT)
    if topics:
        await ws.send(json.dumps({"type": "subscribe", "topics": list(topics)}))
    await round_trip(ws)
    return ws


async def round_trip(ws):
    """Ping and return every frame that arrived before the pong (frames to one socket keep their order)."""
    await ws.send('{"type":"ping"}')
    before = []
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
        if msg == {"type": "pong"}:
            return before
        before.append(msg)


async def frame(ws):
    """The next frame (what another node sends arrives on its own time: waited for, not synced with a ping)."""
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def publish(ws, topic, **data):
    await ws.send(json.dumps({"type": "publish", "topic": topic, **data}))


@pytest.mark.live
def test_yjs_on_both_ports(server):
    """/yjs answers on the HTTP port and on the WebSocket port: one set of topics; stats list the clients."""

    async def go():
        a = await yjs(server.ws_on_http.replace("/ws", "/yjs"), "room")
        b = await yjs(server.ws + "yjs", "room")
        await publish(a, "room", data={"type": "announce", "from": "a"})
        expected = {"type": "publish", "topic": "room", "data": {"type": "announce", "from": "a"}, "clients": 2}
        assert await round_trip(a) == [expected] and await round_trip(b) == [expected]
        ids = [u["id"] for u in server.stats()["users"]]
        assert sum(i.startswith("yjs/") for i in ids) == 2
        # a bad frame: answered (y-webrtc ignores it), nobody else disturbed
        await a.send("{not json")
        assert [m["code"] for m in await round_trip(a)] == ["invalid-json"]
        await publish(b, "room", n=1)
        sent = [{"type": "publish", "topic": "room", "n": 1, "clients": 2}]
        assert await round_trip(b) == sent  # (b's publish is done: a's copy was written before b's pong)
        assert await round_trip(a) == sent
        await a.close()
        await b.close()

    run(go())


@pytest.fixture
def two_nodes():
    redis = RedisServer().start()
    nodes = []
    try:
        for name in ("n1", "n2"):
            nodes.append(ServerProcess(f"--redis={redis.url}", f"--node-id={name}",
                                       f"--node-timeout={NODE_TIMEOUT}").start())
        for node in nodes:
            node.wait_for_line(r"redis: connected")
        yield redis, nodes
    finally:
        for node in nodes:
            node.stop()
        redis.cleanup()


def redis_client(redis):
    import redis as redis_py

    return redis_py.Redis(port=redis.port, decode_responses=True)


@pytest.mark.cluster
def test_topics_span_the_nodes_with_cluster_wide_counts(two_nodes):
    """
    Subscribers on two nodes get each other's publishes, with clients
    counting the subscribers on both; a topic's channel and counts exist
    only while some node has subscribers.
    """
    redis, (n1, n2) = two_nodes
    r = redis_client(redis)

    async def go():
        a = await yjs(n1.ws + "yjs", "room", "only-n1")
        b = await yjs(n2.ws + "yjs", "room")
        c = await yjs(n2.ws + "yjs", "room")
        assert r.hgetall("signaling:yjs:n:room") == {"n1": "1", "n2": "2"}
        await publish(a, "room", data="from a")
        sent = {"type": "publish", "topic": "room", "data": "from a", "clients": 3}
        assert await round_trip(a) == [sent]
        for ws in (b, c):
            assert await frame(ws) == sent
        await publish(b, "room", data="from b")
        assert await frame(a) == dict(sent, data="from b")
        assert await frame(b) == await frame(c) == dict(sent, data="from b")
        await publish(a, "only-n1")  # nobody elsewhere: not published to Redis at all
        assert await round_trip(a) == [{"type": "publish", "topic": "only-n1", "clients": 1}]
        assert await round_trip(b) == []
        # unsubscribe and leave: counts follow, empty topics are freed everywhere
        await b.send(json.dumps({"type": "unsubscribe", "topics": ["room"]}))
        await round_trip(b)
        await publish(c, "room")
        assert await frame(a) == {"type": "publish", "topic": "room", "clients": 2}
        assert await round_trip(c) == [{"type": "publish", "topic": "room", "clients": 2}]
        assert await round_trip(b) == []
        await c.close()
        await a.close()
        await b.close()

    run(go())

    async def settled():
        # the counts of closed sockets are written after their close: each
        # check follows a round trip to both nodes (bounded)
        probes = [await yjs(n1.ws + "yjs"), await yjs(n2.ws + "yjs")]
        for _ in range(100):
            if not r.keys("signaling:yjs:n:*") and not r.pubsub_channels("signaling:yjs:t:*"):
                break
            for ws in probes:
                await round_trip(ws)

    run(settled())
    assert r.keys("signaling:yjs:n:*") == [] and r.pubsub_channels("signaling:yjs:t:*") == []
    assert r.smembers("signaling:yjs:of:n1") == set() == r.smembers("signaling:yjs:of:n2")


@pytest.mark.cluster
def test_a_dead_nodes_counts_are_forgotten(two_nodes):
    """A node killed with SIGKILL stops counting in clients once it has been silent past the node timeout."""
    import signal

    redis, (n1, n2) = two_nodes

    async def go():
        a = await yjs(n1.ws + "yjs", "room")
        b = await yjs(n2.ws + "yjs", "room")
        await publish(a, "room")
        assert (await round_trip(a))[0]["clients"] == 2
        await round_trip(b)
        n2.signal(signal.SIGKILL)
        await asyncio.to_thread(n1.wait_for_line, r"forgot the y-webrtc topic counts of silent nodes: n2", 30)
        await publish(a, "room")
        assert (await round_trip(a))[0]["clients"] == 1

    run(go())


@pytest.mark.cluster
def test_topics_come_back_after_a_redis_restart(two_nodes):
    """
    Without Redis each node still serves its own subscribers (clients
    counting only them); once Redis is back, the nodes write their counts
    and listen on their topics again, and publishes cross nodes as before.
    """
    redis, (n1, n2) = two_nodes

    async def go():
        a = await yjs(n1.ws + "yjs", "room")
        b = await yjs(n2.ws + "yjs", "room")
        a2 = await yjs(n1.ws + "yjs", "room")
        redis.stop()
        for node in (n1, n2):
            await asyncio.to_thread(node.wait_for_line, r"redis: unreachable")
        since = [len(n1.lines), len(n2.lines)]
        await publish(a, "room", n=1)
        local = {"type": "publish", "topic": "room", "n": 1, "clients": 2}
        assert await round_trip(a) == [local] and await round_trip(a2) == [local]
        assert await round_trip(b) == []
        redis.start()
        for node, line in zip((n1, n2), since):
            await asyncio.to_thread(node.wait_for_line, r"wrote its y-webrtc topic counts \(1 topics\)", 30, line)
        await publish(b, "room", n=2)
        crossed = {"type": "publish", "topic": "room", "n": 2, "clients": 3}
        assert await frame(a) == await frame(a2) == crossed
        assert await round_trip(b) == [crossed]
        for ws in (a, a2, b):
            await ws.close()

    run(go())
