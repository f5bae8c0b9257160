"""
Tier 3: PeerJS's surface of the installed server over real loopback
sockets (the ``websockets`` library as the client): both ports, GET
/<key>/id, and the native protocol everywhere else on the WebSocket port.
"""

import asyncio
import json
import urllib.request

import pytest
import websockets
from live import TIMEOUT, ServerProcess, connect, recv, run

pytestmark = pytest.mark.live


async def peerjs_client(base, peer, token="tok", key="peerjs"):
    ws = await asyncio.wait_for(
        websockets.connect(f"{base}peerjs?key={key}&id={peer}&token={token}&version=1.5.5", max_size=None,
                           ping_interval=None), TIMEOUT)
    return ws


async def frame(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


def test_both_ports_serve_peerjs_and_relay_between_them(server):
    """/peerjs on the HTTP port and on the WebSocket port: OPEN, and relays between clients on either."""
    http_base = f"ws://127.0.0.1:{server.ports['http']}/"

    async def go():
        a = await peerjs_client(http_base, "live-a")
        b = await peerjs_client(server.ws, "live-b")
        assert await frame(a) == await frame(b) == {"type": "OPEN"}
        await a.send(json.dumps({"type": "OFFER", "dst": "live-b", "payload": {"sdp": "v=0", "connectionId": "x"}}))
        assert await frame(b) == {"type": "OFFER", "src": "live-a", "dst": "live-b",
                                  "payload": {"sdp": "v=0", "connectionId": "x"}}
        await b.send(json.dumps({"type": "HEARTBEAT"}))
        await b.send(json.dumps({"type": "ANSWER", "dst": "live-a", "payload": {"n": 1}}))
        assert await frame(a) == {"type": "ANSWER", "src": "live-b", "dst": "live-a", "payload": {"n": 1}}
        taken = await peerjs_client(server.ws, "live-a", token="other")
        assert await frame(taken) == {"type": "ID-TAKEN", "payload": {"msg": "ID is taken"}}
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(taken.recv(), TIMEOUT)
        assert taken.close_code == 1008
        users = server.users()
        assert {"peerjs/live-a", "peerjs/live-b"} <= set(users)
        for ws in (a, b):
            await ws.close()

    run(go())


def test_native_everywhere_else_on_the_websocket_port(server):
    """Every other path of the WebSocket port is the native protocol (a welcome), /peerjs/x included."""

    async def go():
        for path in ("", "anything", "peerjs/x", "ws"):
            ws = await connect(server.ws + path)
            assert "/" not in ws.peer_id
            await ws.close()
        ws = await connect(server.ws)
        await ws.send(json.dumps({"type": "ping", "to": "peerjs/live-a"}))
        assert (await recv(ws))["code"] == "peer-not-found"
        await ws.close()

    run(go())


def test_get_id_over_http(server):
    """GET /peerjs/id?ts=...&version=...: a fresh uuid4 as text, for any origin (CORS), never cached."""
    request = urllib.request.Request(server.http + "/peerjs/id?ts=1757422800000.5&version=1.5.5",
                                     headers={"Origin": "https://app.example"})
    ids = set()
    for _ in range(2):
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert response.headers["Access-Control-Allow-Origin"] == "*"
            assert response.headers["Cache-Control"] == "no-store"
            ids.add(response.read().decode())
    assert len(ids) == 2 and all(len(i) == 36 for i in ids)


@pytest.mark.cluster
def test_the_same_client_comes_back_to_any_node():
    """
    Two nodes: the same id and token moves from node 1 to node 2 (the older
    socket is closed with 4409); another token gets ID-TAKEN on either node;
    after its socket is lost on node 2 the client takes its session back on
    node 1, with what was sent to it meanwhile; messages for an id that
    connects to the other node later wait for it there.
    """
    from redis_server import RedisServer

    redis = RedisServer().start()
    nodes = []
    try:
        for name in ("n1", "n2"):
            nodes.append(ServerProcess(f"--redis={redis.url}", f"--node-id={name}", "--node-timeout=2").start())
        for node in nodes:
            node.wait_for_line(r"redis: connected")
        n1, n2 = nodes

        async def go():
            a = await peerjs_client(n1.ws, "roamer", token="mine")
            b = await peerjs_client(n2.ws, "other-b")
            assert await frame(a) == await frame(b) == {"type": "OPEN"}
            a2 = await peerjs_client(n2.ws, "roamer", token="mine")
            assert await frame(a2) == {"type": "OPEN"}
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(a.recv(), TIMEOUT)
            assert a.close_code == 4409
            for node in (n1, n2):
                thief = await peerjs_client(node.ws, "roamer", token="not-mine")
                assert (await frame(thief))["type"] == "ID-TAKEN"
            await b.send(json.dumps({"type": "OFFER", "dst": "roamer", "payload": {"n": 1}}))
            assert await frame(a2) == {"type": "OFFER", "src": "other-b", "dst": "roamer", "payload": {"n": 1}}

            since = len(n2.lines)
            a2.transport.abort()  # lost: no close frame
            await asyncio.to_thread(n2.wait_for_line, r"peer peerjs/roamer \(127.0.0.1\) lost its connection", 20,
                                    since)
            await b.send(json.dumps({"type": "CANDIDATE", "dst": "roamer", "payload": {"n": 2}}))
            await b.send(json.dumps({"type": "HEARTBEAT"}))
            a3 = await peerjs_client(n1.ws, "roamer", token="mine")
            assert await frame(a3) == {"type": "OPEN"}
            assert await frame(a3) == {"type": "CANDIDATE", "src": "other-b", "dst": "roamer", "payload": {"n": 2}}
            users = n2.users()
            assert users["peerjs/roamer"]["node"] == "n1" and users["peerjs/roamer"]["online"]

            await a3.send(json.dumps({"type": "OFFER", "dst": "late", "payload": {"n": 3}}))
            await asyncio.to_thread(n1.wait_for_line, r"OFFER from peerjs/roamer held for peerjs/late")
            late = await peerjs_client(n2.ws, "late")
            assert await frame(late) == {"type": "OPEN"}
            assert await frame(late) == {"type": "OFFER", "src": "roamer", "dst": "late", "payload": {"n": 3}}
            for ws in (a3, b, late):
                await ws.close()

        run(go())
    finally:
        for node in nodes:
            node.stop()
        redis.cleanup()
