"""
Tier 3: the installed server as a real ``twistd -n signaling`` process, driven
over loopback sockets by another WebSocket library (``websockets``).
"""

import asyncio
import json
import signal
import socket
import struct
import subprocess
import uuid

import pytest
from live import ServerProcess, closed_code, connect, pair, recv, recv_raw, run, send, sync

pytestmark = pytest.mark.live


def test_welcome_is_uuid4_and_user_appears_idle(server):
    """A new connection is welcomed with a fresh uuid4 and listed idle in stats with its address."""

    async def go():
        a = await connect(server.ws)
        b = await connect(server.ws)
        assert a.peer_id != b.peer_id
        assert uuid.UUID(a.peer_id).version == 4
        user = server.users()[a.peer_id]
        assert set(user) == {"id", "state", "targetUser", "connectedAt", "ip", "online", "protocol"}
        assert user["protocol"] == "native"
        assert (user["state"], user["targetUser"], user["ip"]) == ("idle", None, "127.0.0.1")
        await a.close()
        await b.close()

    run(go())


def test_whole_contract_across_both_ports(server):
    """Pairing, every relayed type and disconnect work between a peer on the WebSocket port and one on /ws."""

    async def go():
        a = await connect(server.ws)
        b = await connect(server.ws_on_http)
        A, B = a.peer_id, b.peer_id

        await send(a, {"type": "ping", "to": B, "data": {"test": True}})
        assert await recv(b) == {"type": "ping", "from": A, "data": {"test": True}}
        users = server.users()
        assert (users[A]["state"], users[A]["targetUser"]) == ("connecting", B)
        assert (users[B]["state"], users[B]["targetUser"]) == ("idle", None)

        await send(b, {"type": "pong", "to": A, "data": {"received": True}})
        assert await recv(a) == {"type": "pong", "from": B, "data": {"received": True}}
        users = server.users()
        assert (users[A]["state"], users[A]["targetUser"]) == ("connected", B)
        assert (users[B]["state"], users[B]["targetUser"]) == ("connected", A)

        offer = {"type": "offer", "sdp": "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n"}
        await send(a, {"type": "offer", "to": B, "data": offer})
        assert await recv(b) == {"type": "offer", "from": A, "data": offer}
        answer = {"type": "answer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"}
        await send(b, {"type": "answer", "to": A, "data": answer})
        assert await recv(a) == {"type": "answer", "from": B, "data": answer}
        for sender, receiver, to in [(a, b, B), (b, a, A)]:
            cand = {"candidate": "candidate:1 1 UDP 2113667326 127.0.0.1 54400 typ host",
                    "sdpMLineIndex": 0, "sdpMid": "0"}
            await send(sender, {"type": "ice-candidate", "to": to, "data": cand})
            assert await recv(receiver) == {"type": "ice-candidate", "from": sender.peer_id, "data": cand}

        # liveness ping/pong between partners changes nothing
        await send(b, {"type": "ping", "to": A})
        assert (await recv(a))["type"] == "ping"
        await send(a, {"type": "pong", "to": B})
        assert (await recv(b))["type"] == "pong"
        assert server.users()[A]["state"] == "connected"

        await send(a, {"type": "disconnect", "to": B, "data": {"reason": "user_disconnect"}})
        assert await recv(b) == {"type": "disconnect", "from": A, "data": {"reason": "user_disconnect"}}
        users = server.users()
        assert (users[A]["state"], users[A]["targetUser"]) == ("idle", None)
        assert (users[B]["state"], users[B]["targetUser"]) == ("idle", None)
        assert await sync(a) == [] and await sync(b) == []
        await a.close()
        await b.close()

    run(go())


def test_relay_is_byte_for_byte_for_non_ascii_sdp(server):
    """SDP with non-ASCII text reaches the partner as the same UTF-8 bytes and the same JSON value."""

    async def go():
        a = await connect(server.ws)
        b = await connect(server.ws)
        await pair(a, b)
        sdp = "v=0\r\ns=Sitzung ünïcødé 漢字 🎉\r\na=x-note:\"quoted\" \\ back\r\n" * 50
        data = {"type": "offer", "sdp": sdp, "n": [1, 2.5, None, True], "deep": {"k": "ж"}}
        await a.send(json.dumps({"type": "offer", "to": b.peer_id, "data": data}, ensure_ascii=False))
        raw = await recv_raw(b)
        assert json.loads(raw) == {"type": "offer", "from": a.peer_id, "data": data}
        assert json.dumps(sdp, ensure_ascii=False) in raw
        await a.close()
        await b.close()

    run(go())


def test_large_sdp_within_the_default_limit(server):
    """A 200 KiB offer (above 64 KiB) is relayed intact under the default size limit."""

    async def go():
        a = await connect(server.ws)
        b = await connect(server.ws)
        await pair(a, b)
        sdp = ("a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host\r\n" * 4000)[:200 * 1024]
        await send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": sdp}})
        assert (await recv(b))["data"]["sdp"] == sdp
        await a.close()
        await b.close()

    run(go())


def test_every_error_code_and_socket_stays_usable(server):
    """Each kind of bad input gets its documented error, and the same socket then works normally."""

    async def go():
        a = await connect(server.ws)
        b = await connect(server.ws)
        c = await connect(server.ws)
        A, B = a.peer_id, b.peer_id
        cases = [
            ("{broken", "invalid-json", None),
            ("", "invalid-json", None),
            ("NaN", "invalid-json", None),
            ("[]", "invalid-message", None),
            ("42", "invalid-message", None),
            (json.dumps({"to": B}), "invalid-message", None),
            (json.dumps({"type": 1, "to": B}), "invalid-message", None),
            (json.dumps({"type": "ping"}), "invalid-message", "ping"),
            (json.dumps({"type": "ping", "to": ""}), "invalid-message", "ping"),
            (json.dumps({"type": "ping", "to": ["x"]}), "invalid-message", "ping"),
            (json.dumps({"type": "offer", "to": B, "data": "v=0"}), "invalid-message", "offer"),
            (json.dumps({"type": "subscribe", "to": B}), "unknown-type", "subscribe"),
            (json.dumps({"type": "welcome", "to": B}), "unknown-type", "welcome"),
            (json.dumps({"type": "ping", "to": str(uuid.uuid4())}), "peer-not-found", "ping"),
            (json.dumps({"type": "ping", "to": A}), "peer-not-found", "ping"),
            (json.dumps({"type": "offer", "to": B}), "invalid-state", "offer"),
            (json.dumps({"type": "answer", "to": B}), "invalid-state", "answer"),
            (json.dumps({"type": "ice-candidate", "to": B}), "invalid-state", "ice-candidate"),
            (json.dumps({"type": "pong", "to": B}), "invalid-state", "pong"),
            (json.dumps({"type": "disconnect", "to": B}), "invalid-state", "disconnect"),
        ]
        for frame, code, ref in cases:
            await a.send(frame)
            err = await recv(a)
            assert err["type"] == "error", (frame, err)
            assert (err["code"], err["ref"]) == (code, ref), (frame, err)
            assert isinstance(err["message"], str) and len(err["message"]) > 5
        await a.send(b"\x00\x01binary")
        err = await recv(a)
        assert (err["code"], err["ref"]) == ("invalid-message", None)

        # peer-busy: b and c are paired, a pings b
        await send(b, {"type": "ping", "to": c.peer_id})
        await recv(c)
        await send(c, {"type": "pong", "to": B})
        await recv(b)
        await send(a, {"type": "ping", "to": B})
        err = await recv(a)
        assert (err["code"], err["ref"]) == ("peer-busy", "ping")
        # invalid-state: b, connected to c, pings a
        await send(b, {"type": "ping", "to": A})
        err = await recv(b)
        assert (err["code"], err["ref"]) == ("invalid-state", "ping")

        # after all that, a still works: it pairs with a newcomer
        d = await connect(server.ws)
        await send(a, {"type": "ping", "to": d.peer_id})
        assert await recv(d) == {"type": "ping", "from": A, "data": {}}
        await send(d, {"type": "pong", "to": A})
        assert (await recv(a))["type"] == "pong"
        assert server.users()[A]["state"] == "connected"
        assert await sync(b) == [] and await sync(c) == []
        for ws in (a, b, c, d):
            await ws.close()

    run(go())


def test_peer_left_on_clean_close_and_stats_recover(server):
    """A clean close tells the partner peer_left, and stats go back to the earlier count."""

    async def go():
        before = server.stats()["connectedUsers"]
        a = await connect(server.ws)
        b = await connect(server.ws_on_http)
        c = await connect(server.ws)
        assert server.stats()["connectedUsers"] == before + 3
        await send(c, {"type": "ping", "to": a.peer_id})  # c is connecting to a
        await recv(a)
        await pair(a, b)
        gone = a.peer_id
        await a.close()
        left = {"type": "disconnect", "from": gone, "data": {"reason": "peer_left"}}
        assert await recv(b) == left
        assert await recv(c) == left
        users = server.users()
        assert gone not in users
        assert users[b.peer_id]["state"] == users[c.peer_id]["state"] == "idle"
        await b.close()
        await c.close()
        assert server.stats()["connectedUsers"] == before

    run(go())


def reset(ws):
    """Close a client's TCP connection with linger 0: the kernel sends RST, no close frame."""
    sock = ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.transport.abort()


def test_tcp_reset_keeps_the_session_and_resume_brings_the_queue(server):
    """
    A peer whose TCP connection is reset keeps its id, state and partner
    (shown offline; the partner is not told); offers sent to it meanwhile
    arrive in order after it reconnects with ?resume=, and the pair goes on.
    """

    async def go():
        a = await connect(server.ws)
        b = await connect(server.ws)
        await pair(a, b)
        A, B = a.peer_id, b.peer_id
        since = len(server.lines)
        reset(a)
        await asyncio.to_thread(server.wait_for_line, rf"peer {A} .* lost its connection .*: in grace for 15.0s",
                                since=since)
        me = server.users()[A]
        assert (me["online"], me["state"], me["targetUser"]) == (False, "connected", B)
        for n in range(3):
            await send(b, {"type": "offer", "to": A, "data": {"sdp": f"offer {n}"}})
        assert await sync(b) == []  # queued: no error, and no peer_left
        again = await connect(f"{server.ws}?resume={a.welcome['resume']}")
        assert (again.welcome["id"], again.welcome["resumed"]) == (A, True)
        for n in range(3):
            assert await recv(again) == {"type": "offer", "from": B, "data": {"sdp": f"offer {n}"}}
        me = server.users()[A]
        assert (me["online"], me["state"], me["targetUser"]) == (True, "connected", B)
        await send(again, {"type": "answer", "to": B, "data": {"sdp": "answer"}})
        assert await recv(b) == {"type": "answer", "from": A, "data": {"sdp": "answer"}}
        await again.close()  # a close frame from the peer: over at once
        assert await recv(b) == {"type": "disconnect", "from": A, "data": {"reason": "peer_left"}}
        assert A not in server.users()
        assert server.users()[B]["state"] == "idle"
        await b.close()

    run(go())


def test_restart_gives_the_ids_back():
    """
    After SIGTERM and a new start on the same ports (same working
    directory, so the same resume secret by default), peers reconnecting
    with their tokens get their ids back, idle, and can pair again.
    """
    first = ServerProcess().start()
    second = None
    try:

        async def before():
            a = await connect(first.ws)
            b = await connect(first.ws_on_http)
            await pair(a, b)
            first.signal(signal.SIGTERM)
            assert await closed_code(a) == await closed_code(b) == 1001
            return a.peer_id, a.welcome["resume"], b.peer_id, b.welcome["resume"]

        A, token_a, B, token_b = run(before())
        assert first.wait() in (0, -signal.SIGTERM)  # (twistd ends by the signal it stopped for)
        assert "created the secret that signs them" in first.output()
        second = first.restarted().start()

        async def after():
            a = await connect(f"{second.ws}?resume={token_a}")
            b = await connect(f"{second.ws_on_http}?resume={token_b}")
            assert (a.welcome["id"], a.welcome["resumed"]) == (A, False)
            assert (b.welcome["id"], b.welcome["resumed"]) == (B, False)
            assert {u["id"]: u["state"] for u in second.stats()["users"]} == {A: "idle", B: "idle"}
            await pair(a, b)
            await a.close()
            await b.close()

        run(after())
    finally:
        if second is not None:
            second.stop()
        first.stop()


def test_burst_of_500_connections_all_welcomed(server):
    """500 connections opened at once are all welcomed with distinct ids, and the listen backlog is set."""
    for port in server.ports.values():
        out = subprocess.run(
            ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
        ).stdout.split()
        # for a listening socket, ss's Send-Q column is the backlog
        assert int(out[2]) >= 1024 or int(out[2]) == int(
            open("/proc/sys/net/core/somaxconn").read()
        ), out

    async def go():
        before = server.stats()["connectedUsers"]
        clients = await asyncio.gather(*(connect(server.ws) for _ in range(500)))
        assert len({c.peer_id for c in clients}) == 500
        assert server.stats()["connectedUsers"] == before + 500
        await asyncio.gather(*(c.close() for c in clients))
        assert server.stats()["connectedUsers"] == before

    run(go())


def test_test_page_and_root(server):
    """The test page is served as HTML and / redirects to it."""
    status, headers, body = server.get("/test.html")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert b"ice-candidate" in body
    status, headers, body = server.get("/")  # urllib follows the redirect
    assert status == 200 and b"ice-candidate" in body


def test_logs_connects_relays_and_errors(server):
    """The log records connects, relays with type/from/to/size, transitions and errors, never SDP bodies."""

    async def go():
        a = await connect(server.ws)
        b = await connect(server.ws)
        await pair(a, b)
        await send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "v=0 LOG-SECRET"}})
        await recv(b)
        await a.send("{bad")
        await recv(a)
        await a.close()
        await recv(b)
        await b.close()
        return a.peer_id, b.peer_id

    A, B = run(go())
    server.wait_for_line(rf"peer {A} connected from 127\.0\.0\.1")
    server.wait_for_line(rf"relay offer {A} -> {B} \(\d+ bytes\)")
    server.wait_for_line(rf"peer {A} connecting -> connected \(target {B}\)")
    server.wait_for_line(rf"error invalid-json to {A}")
    server.wait_for_line(rf"peer {A} disconnected from 127\.0\.0\.1")
    server.wait_for_line(rf"peer_left {A} -> {B}")
    assert "LOG-SECRET" not in server.output()


@pytest.fixture(scope="module")
def tight_server():
    """A server with small limits and a fast keepalive, to test the limits."""
    proc = ServerProcess(
        "--max-message-size=65536", "--rate=5", "--burst=5", "--flood-strikes=10",
        "--ping-interval=0.5", "--ping-timeout=0.5", "--resume-grace=2",
    ).start()
    yield proc
    proc.stop()


def test_oversized_message_closes_1009(tight_server):
    """A message above --max-message-size closes the socket with 1009 and the partner gets peer_left."""

    async def go():
        a = await connect(tight_server.ws)
        b = await connect(tight_server.ws)
        await pair(a, b)
        await send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "x" * 70000}})
        assert await closed_code(a) == 1009
        assert await recv(b) == {"type": "disconnect", "from": a.peer_id, "data": {"reason": "peer_left"}}
        await b.close()

    run(go())


def test_rate_limit_and_flood_close(tight_server):
    """Past the burst a peer gets rate-limited errors; one that keeps flooding is closed with 1008."""

    async def go():
        a = await connect(tight_server.ws)
        other = await connect(tight_server.ws)
        for _ in range(5):
            await send(a, {"type": "ping", "to": other.peer_id})
        await send(a, {"type": "ping", "to": other.peer_id})
        err = await recv(a)
        assert (err["code"], err["ref"]) == ("rate-limited", None)
        for _ in range(20):
            await a.send("{}")
        codes = []
        try:
            while True:
                codes.append((await recv(a))["code"])
        except Exception:
            pass
        # (a token may refill mid-flood, so one "{}" can be parsed and refused)
        assert "rate-limited" in codes and set(codes) <= {"rate-limited", "invalid-message"}
        assert a.close_code == 1008
        assert a.peer_id not in tight_server.users()
        # the other peer was not affected
        assert [m["type"] for m in await sync(other)] == ["ping"] * 5
        await other.close()

    run(go())


def test_grace_period_ends_with_peer_left(tight_server):
    """A peer reset and not back within the grace period (2 s here) is removed; its partner is told then."""

    async def go():
        a = await connect(tight_server.ws)
        b = await connect(tight_server.ws)
        await pair(a, b)
        lost = asyncio.get_running_loop().time()
        reset(a)
        assert await recv(b) == {"type": "disconnect", "from": a.peer_id, "data": {"reason": "peer_left"}}
        assert asyncio.get_running_loop().time() - lost >= 1.9
        assert a.peer_id not in tight_server.users()
        await b.close()

    run(go())


def test_keepalive_timeout_drops_silent_peer(tight_server):
    """
    A peer that stops answering WebSocket pings is dropped; it stays offline
    in its grace period (2 s here), then its partner is told peer_left.
    """

    async def go():
        a = await connect(tight_server.ws)
        b = await connect(tight_server.ws, ping_interval=None)
        await pair(a, b)
        since = len(tight_server.lines)
        a.transport.pause_reading()  # a goes silent: it never sees the server's pings
        # b must keep answering the server's pings meanwhile: wait off the loop
        await asyncio.to_thread(
            tight_server.wait_for_line, rf"peer {a.peer_id} .* lost its connection .*: in grace for 2.0s", since=since
        )
        assert (await asyncio.to_thread(tight_server.users))[a.peer_id]["online"] is False
        assert await recv(b) == {"type": "disconnect", "from": a.peer_id, "data": {"reason": "peer_left"}}
        assert a.peer_id not in tight_server.users()
        a.transport.abort()
        await b.close()

    run(go())
