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
from live import TIMEOUT, connect, recv, run

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
