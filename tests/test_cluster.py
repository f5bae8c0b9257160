"""
Tier 3: several nodes acting as one server through a real Redis: the
installed server started twice or three times with --redis, peers on
different nodes, races, a node killed with SIGKILL, Redis restarted.
"""

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest
import websockets
from live import ServerProcess, closed_code, connect, pair, recv, run, send, sync
from redis_server import RedisServer

pytestmark = pytest.mark.cluster

NODE_TIMEOUT = "2"
#: the grace period of a peer whose socket (or node) was lost, short here
GRACE = "2"


def start_node(redis, name):
    return ServerProcess(
        f"--redis={redis.url}", f"--node-id={name}", f"--node-timeout={NODE_TIMEOUT}", f"--resume-grace={GRACE}"
    ).start()


def removal_bound():
    """
    The longest a dead node's peer may take to be removed: the node found
    silent (the node timeout, plus one heartbeat interval), then its grace
    period, ended by a reaper's run at most one more interval later; plus
    slack for process scheduling on 2 busy cores.
    """
    timeout = float(NODE_TIMEOUT)
    interval = max(0.2, timeout / 3)
    return timeout + interval + float(GRACE) + interval + 3.0


def wait_for_any(nodes, pattern, timeout=20.0):
    """Wait until one of ``nodes`` logs a line matching ``pattern``; return it."""
    deadline = time.monotonic() + timeout
    while True:
        for node in nodes:
            try:
                return node.wait_for_line(pattern, timeout=0.1)
            except AssertionError:
                if time.monotonic() > deadline:
                    raise


def resume_url(node, ws):
    return f"{node.ws}?resume={ws.welcome['resume']}"


@pytest.fixture
def cluster():
    redis = RedisServer().start()
    nodes = []
    try:
        nodes.extend(start_node(redis, f"n{i}") for i in (1, 2))
        for node in nodes:
            node.wait_for_line(r"redis: connected")
        yield redis, nodes
    finally:
        for node in nodes:
            node.stop()
        redis.cleanup()


def users(node):
    return node.users()


async def refused(url):
    """Open a WebSocket expecting a refused handshake; return the HTTP status and reason."""
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        await connect(url)
    response = e.value.response
    return response.status_code, response.reason_phrase


def assert_consistent(all_users):
    """Partners are symmetric and no targetUser dangles."""
    for user in all_users.values():
        if user["state"] == "idle":
            assert user["targetUser"] is None
        else:
            assert user["targetUser"] in all_users, user
        if user["state"] == "connected":
            partner = all_users[user["targetUser"]]
            assert partner["state"] == "connected" and partner["targetUser"] == user["id"], (user, partner)


def test_contract_across_nodes(cluster):
    """Peers on different nodes pair, relay every type, get errors, disconnect and see peer_left; stats agree."""
    _, (n1, n2) = cluster

    async def go():
        a = await connect(n1.ws)
        b = await connect(n2.ws_on_http)
        c = await connect(n2.ws)
        A, B = a.peer_id, b.peer_id
        await send(a, {"type": "offer", "to": B, "data": {}})
        assert (await recv(a))["code"] == "invalid-state"
        await send(a, {"type": "answer", "to": "nobody", "data": {}})
        assert (await recv(a))["code"] == "peer-not-found"
        await pair(a, b)
        s1, s2 = users(n1), users(n2)
        assert s1 == s2
        assert (s1[A]["node"], s1[B]["node"], s1[c.peer_id]["node"]) == ("n1", "n2", "n2")
        assert (s1[A]["state"], s1[A]["targetUser"]) == ("connected", B)
        sdp = "v=0\r\ns=ünï 漢字\r\n"
        for kind, x, y in [("offer", a, b), ("answer", b, a), ("ice-candidate", a, b), ("ice-candidate", b, a)]:
            data = {"sdp": sdp, "kind": kind}
            await send(x, {"type": kind, "to": y.peer_id, "data": data})
            assert await recv(y) == {"type": kind, "from": x.peer_id, "data": data}
        await send(c, {"type": "ping", "to": A})
        assert (await recv(c))["code"] == "peer-busy"
        await send(c, {"type": "ping", "to": "nobody"})
        assert (await recv(c))["code"] == "peer-not-found"
        await send(b, {"type": "disconnect", "to": A, "data": {"reason": "bye"}})
        assert await recv(a) == {"type": "disconnect", "from": B, "data": {"reason": "bye"}}
        assert users(n2)[A]["state"] == "idle"
        await pair(c, a)  # c on n2 pairs with a on n1
        gone = a.peer_id
        await a.close()
        assert await recv(c) == {"type": "disconnect", "from": gone, "data": {"reason": "peer_left"}}
        for node in (n1, n2):
            assert gone not in users(node)
            assert users(node)[c.peer_id]["state"] == "idle"
        assert await sync(b) == []
        await b.close()
        await c.close()
        assert n1.stats()["connectedUsers"] == n2.stats()["connectedUsers"] == 0

    run(go())


def test_races_stay_consistent(cluster):
    """Crossing pings, two pingers for one peer, and a disconnect crossing a pong never leave an inconsistent pair."""
    _, (n1, n2) = cluster

    async def go():
        for _ in range(15):
            a = await connect(n1.ws)
            b = await connect(n2.ws)
            c = await connect(n1.ws)
            # crossing pings, then both pong at once
            await asyncio.gather(send(a, {"type": "ping", "to": b.peer_id}), send(b, {"type": "ping", "to": a.peer_id}))
            await asyncio.gather(recv(a), recv(b))
            await asyncio.gather(send(a, {"type": "pong", "to": b.peer_id}), send(b, {"type": "pong", "to": a.peer_id}))
            # both pongs handled (each connection's operations run in order) before the stats are read;
            # each peer gets the other's pong (relayed through Redis: maybe after its own round trip)
            for ws, before in zip((a, b), await asyncio.gather(sync(a), sync(b))):
                assert [m["type"] for m in before] in ([], ["pong"]), before
                if not before:
                    assert (await recv(ws))["type"] == "pong"
            everyone = users(n1)
            assert everyone[a.peer_id]["state"] == everyone[b.peer_id]["state"] == "connected"
            assert_consistent(everyone)
            # a disconnect crossing a pong; c and a race to ping b
            await send(a, {"type": "disconnect", "to": b.peer_id})
            await asyncio.gather(send(c, {"type": "ping", "to": b.peer_id}), send(a, {"type": "ping", "to": b.peer_id}))
            await asyncio.gather(
                send(b, {"type": "pong", "to": a.peer_id}), send(a, {"type": "disconnect", "to": b.peer_id}),
                send(b, {"type": "pong", "to": c.peer_id}),
            )
            for ws in (a, b, c):
                await sync(ws)
            everyone = users(n2)
            assert_consistent(everyone)
            assert users(n1) == everyone
            connected = [u for u in everyone.values() if u["state"] == "connected"]
            assert len(connected) in (0, 2)
            for ws in (a, b, c):
                await ws.close()
        assert n1.stats()["connectedUsers"] == 0

    run(go())


def test_killed_node_is_removed_and_partners_told(cluster):
    """
    A node killed with SIGKILL has its peers put in grace once it is found
    silent (shown offline, partners not told), then removed when their grace
    ends; partners elsewhere then get peer_left.
    """
    redis, (n1, n2) = cluster
    n3 = start_node(redis, "n3")
    try:
        n3.wait_for_line(r"redis: connected")

        async def go():
            a = await connect(n1.ws)
            doomed = await connect(n3.ws)
            lonely = await connect(n3.ws)
            watcher = await connect(n2.ws)
            await pair(a, doomed)
            await send(watcher, {"type": "ping", "to": lonely.peer_id})
            await recv(lonely)
            assert set(users(n2)) == {a.peer_id, doomed.peer_id, lonely.peer_id, watcher.peer_id}
            n3.proc.send_signal(signal.SIGKILL)
            n3.wait()
            killed = asyncio.get_running_loop().time()
            # found silent by n1 or n2, whichever reaps first: its peers go offline
            await asyncio.to_thread(wait_for_any, (n1, n2), r"redis: 2 peers of nodes silent .* in grace for 2.0s")
            everyone = users(n2)
            assert (everyone[doomed.peer_id]["online"], everyone[lonely.peer_id]["online"]) == (False, False)
            assert everyone[a.peer_id]["state"] == "connected"  # nobody told yet
            left_a = await asyncio.wait_for(recv(a), removal_bound() + 5)
            left_w = await recv(watcher)
            took = asyncio.get_running_loop().time() - killed
            assert took >= float(GRACE), f"peer_left after {took:.1f}s, within the grace period"
            assert took <= removal_bound(), f"peer_left after {took:.1f}s"
            assert left_a == {"type": "disconnect", "from": doomed.peer_id, "data": {"reason": "peer_left"}}
            assert left_w == {"type": "disconnect", "from": lonely.peer_id, "data": {"reason": "peer_left"}}
            for node in (n1, n2):
                assert set(users(node)) == {a.peer_id, watcher.peer_id}
                assert users(node)[a.peer_id]["state"] == "idle"
            doomed.transport.abort()
            lonely.transport.abort()
            await a.close()
            await watcher.close()

        run(go())
    finally:
        n3.stop()


def health(node):
    try:
        with urllib.request.urlopen(node.http + "/api/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_redis_restart(cluster):
    """
    With Redis gone, nodes stay up, report it, refuse to claim delivery and
    refuse newcomers (503: nobody could reach them); when it returns,
    signalling resumes.
    """
    redis, (n1, n2) = cluster

    async def go():
        a = await connect(n1.ws)
        b = await connect(n2.ws)
        await pair(a, b)
        status, doc = health(n1)
        assert status == 200
        assert (doc["status"], doc["registry"], doc["redis"], doc["node"]) == ("ok", "redis", "connected", "n1")

        redis.stop()
        n1.wait_for_line(r"redis: unreachable")
        n2.wait_for_line(r"redis: unreachable")
        status, doc = health(n1)
        assert status == 503 and doc["status"] == "degraded" and doc["redis"] == "disconnected"
        await send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "lost?"}})
        err = await recv(a)
        assert (err["type"], err["code"], err["ref"]) == ("error", "unavailable", "offer")
        # a newcomer is refused at the handshake: it could not be registered
        assert await refused(n1.ws) == (503, "cluster state unavailable (disconnected); try again")

        redis.start()
        n1.wait_for_line(r"redis: connected; node n1 re-registered 1 peers")
        n2.wait_for_line(r"redis: connected; node n2 re-registered 1 peers")
        assert health(n2)[0] == 200
        c = await connect(n1.ws)
        everyone = users(n1)
        assert set(everyone) == {a.peer_id, b.peer_id, c.peer_id}
        assert users(n2) == everyone
        assert all(u["state"] == "idle" for u in everyone.values())  # Redis lost the pairing state
        # signalling resumes across nodes without restarting them
        await pair(c, b)
        await send(b, {"type": "offer", "to": c.peer_id, "data": {"sdp": "back"}})
        assert (await recv(c))["data"] == {"sdp": "back"}
        for ws in (a, b, c):
            await ws.close()

    run(go())


def test_health_of_a_starting_node_is_never_degraded(cluster):
    """
    From its first answer on, a starting node's /api/health says "starting"
    (503) until it is registered, then "ok": never "degraded" or
    "disconnected" while Redis is fine.
    """
    redis, _ = cluster
    node = start_node(redis, "n3")
    try:
        seen = []
        deadline = time.monotonic() + 20
        while True:  # (each turn is a round trip to the node)
            status, doc = health(node)
            seen.append((status, doc["status"], doc["redis"]))
            if status == 200:
                break
            assert time.monotonic() < deadline, seen
        assert set(seen) <= {(503, "starting", "starting"), (200, "ok", "connected")}, set(seen)
        for _ in range(20):
            assert health(node)[0] == 200
    finally:
        node.stop()


def test_node_shutdown_in_cluster_mode(cluster):
    """
    SIGTERM on one node closes its peers with 1001; they resume on another
    node with their id, state and partner, and what was sent to them
    meanwhile; their partners are never told peer_left.
    """
    _, (n1, n2) = cluster

    async def go():
        a = await connect(n1.ws)
        b = await connect(n2.ws)
        await pair(a, b)
        n1.signal(signal.SIGTERM)
        assert await closed_code(a) == 1001
        n1.wait()
        assert users(n2)[a.peer_id]["online"] is False
        for n in range(3):
            await send(b, {"type": "offer", "to": a.peer_id, "data": {"n": n}})
        assert await sync(b) == []  # queued for a: no error, and no peer_left
        again = await connect(resume_url(n2, a))
        assert (again.welcome["id"], again.welcome["resumed"]) == (a.peer_id, True)
        assert [await recv(again) for _ in range(3)] == [
            {"type": "offer", "from": b.peer_id, "data": {"n": n}} for n in range(3)
        ]
        me = users(n2)[a.peer_id]
        assert (me["node"], me["online"], me["state"], me["targetUser"]) == ("n2", True, "connected", b.peer_id)
        await send(again, {"type": "answer", "to": b.peer_id, "data": {"sdp": "after"}})
        assert await recv(b) == {"type": "answer", "from": a.peer_id, "data": {"sdp": "after"}}
        await again.close()
        assert await recv(b) == {"type": "disconnect", "from": a.peer_id, "data": {"reason": "peer_left"}}
        await b.close()

    run(go())


def test_resume_on_another_node_after_a_cut_socket(cluster):
    """
    A socket cut without a close frame: the peer stays (offline) with its
    partner, relays to it are queued in order, and it resumes on the other
    node; one that does not resume is removed after the grace period and its
    partner told.
    """
    _, (n1, n2) = cluster

    async def go():
        a = await connect(n1.ws)
        b = await connect(n2.ws)
        c = await connect(n1.ws)
        d = await connect(n2.ws)
        await pair(a, b)
        await pair(c, d)
        since = len(n1.lines)
        a.transport.abort()
        c.transport.abort()
        await asyncio.to_thread(n1.wait_for_line, rf"peer {c.peer_id} .* in grace for 2.0s", since=since)
        await asyncio.to_thread(n1.wait_for_line, rf"peer {a.peer_id} .* in grace for 2.0s", since=since)
        for n in range(5):
            await send(b, {"type": "ice-candidate", "to": a.peer_id, "data": {"n": n}})
        assert await sync(b) == []
        again = await connect(resume_url(n2, a))
        assert (again.welcome["id"], again.welcome["resumed"]) == (a.peer_id, True)
        assert [(await recv(again))["data"]["n"] for _ in range(5)] == list(range(5))
        assert users(n1)[a.peer_id]["state"] == "connected"
        # c does not come back: d is told once c's grace period is over
        assert await asyncio.wait_for(recv(d), 10) == {
            "type": "disconnect", "from": c.peer_id, "data": {"reason": "peer_left"}
        }
        assert c.peer_id not in users(n2)
        await asyncio.to_thread(n1.wait_for_line, rf"peer {c.peer_id} did not resume within 2.0s")
        # a resume token outliving its session gets the same id back, idle
        late = await connect(resume_url(n1, c))
        assert (late.welcome["id"], late.welcome["resumed"]) == (c.peer_id, False)
        assert users(n2)[c.peer_id]["state"] == "idle"
        # a forged token gets a fresh id
        forged = await connect(f"{n2.ws}?resume={again.welcome['resume'][:-2]}xx")
        assert forged.welcome["resumed"] is False and forged.welcome["id"] not in (a.peer_id, c.peer_id)
        for ws in (again, b, d, late, forged):
            await ws.close()

    run(go())


def test_resume_while_the_old_socket_is_still_open(cluster):
    """
    A peer that reconnects before its old socket was found dead (a network
    change) takes its session over, on the same node or another: the old
    socket is closed with 4409, the partner hears nothing, and the old
    socket's end does not end the session.
    """
    _, (n1, n2) = cluster

    async def go():
        a = await connect(n1.ws)
        b = await connect(n2.ws)
        await pair(a, b)
        same_node = await connect(resume_url(n1, a))
        assert (same_node.welcome["id"], same_node.welcome["resumed"]) == (a.peer_id, True)
        assert await closed_code(a) == 4409
        other_node = await connect(resume_url(n2, a))
        assert (other_node.welcome["id"], other_node.welcome["resumed"]) == (a.peer_id, True)
        assert await closed_code(same_node) == 4409
        await send(b, {"type": "offer", "to": a.peer_id, "data": {"n": 1}})
        assert await recv(other_node) == {"type": "offer", "from": b.peer_id, "data": {"n": 1}}
        assert await sync(b) == []  # no peer_left
        me = users(n1)[a.peer_id]
        assert (me["node"], me["online"], me["state"], me["targetUser"]) == ("n2", True, "connected", b.peer_id)
        await other_node.close()
        assert await recv(b) == {"type": "disconnect", "from": a.peer_id, "data": {"reason": "peer_left"}}
        await b.close()

    run(go())


def test_two_processes_share_one_port(cluster):
    """With --reuse-port, two nodes listen on the same port; peers landing on either pair and relay."""
    from redis_server import free_port

    redis, _ = cluster
    port = free_port()
    nodes = [
        ServerProcess(f"--redis={redis.url}", f"--node-id=shared{i}", "--reuse-port",
                      ws=f"tcp:{port}:interface=127.0.0.1").start()
        for i in (1, 2)
    ]
    try:
        for node in nodes:
            node.wait_for_line(r"redis: connected")
        assert nodes[0].ports["ws"] == nodes[1].ports["ws"] == port

        async def go():
            peers = [await connect(f"ws://127.0.0.1:{port}/") for _ in range(40)]
            everyone = users(nodes[0])
            # the kernel spreads connections by a hash of their addresses: with 40,
            # all on one node has a probability of 2**-39
            assert {everyone[p.peer_id]["node"] for p in peers} == {"shared1", "shared2"}
            a, b = peers[0], peers[-1]
            await pair(a, b)
            await send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "shared"}})
            assert (await recv(b))["data"] == {"sdp": "shared"}
            for p in peers:
                await p.close()

        run(go())
    finally:
        for node in nodes:
            node.stop()


#: how many times each kill point is tried (raise it by hand to hunt for rarer windows)
KILL_ROUNDS = int(os.environ.get("SIGNALING_KILL_ROUNDS", "2"))


@pytest.mark.parametrize("point", ["starting", "welcomed", "paired"])
def test_node_killed_while_starting(cluster, point):
    """
    A third node is started and, as soon as it welcomes its first peer
    (which must be reachable at once), killed with SIGKILL: before that
    peer is pinged back, with a ping from another node's peer pending, or
    just after the two paired.  Each time the partner on the first node gets
    peer_left within the node timeout plus one heartbeat interval, plus the
    grace period (see removal_bound), and no node's stats keep the dead peer.
    Killed while still starting, the node leaves nothing behind.
    """
    redis, (n1, n2) = cluster
    bound = removal_bound()

    async def first_welcome(node):
        """Connect until welcomed: while starting, the node refuses with 503 and a reason, nothing else."""
        deadline = asyncio.get_running_loop().time() + 20
        while True:
            try:
                return await connect(node.ws)
            except websockets.exceptions.InvalidStatus as e:
                refusal = (e.response.status_code, e.response.reason_phrase)
                assert refusal == (503, "cluster state unavailable (starting); try again"), refusal
            assert asyncio.get_running_loop().time() < deadline, "the node never admitted a peer"

    async def one_round(name):
        before = set(users(n1))
        n3 = start_node(redis, name)
        try:
            if point == "starting":
                n3.proc.send_signal(signal.SIGKILL)  # at once: as a rule, before it registered
                n3.wait()
                for node in (n1, n2):
                    assert set(users(node)) == before
                return
            a = await connect(n1.ws)
            c = await first_welcome(n3)
            await send(a, {"type": "ping", "to": c.peer_id})
            assert (await recv(c)) == {"type": "ping", "from": a.peer_id, "data": {}}  # reachable at once
            if point == "paired":
                await send(c, {"type": "pong", "to": a.peer_id})
                assert (await recv(a))["type"] == "pong"
            assert users(n2)[a.peer_id]["targetUser"] == c.peer_id
            n3.proc.send_signal(signal.SIGKILL)
            killed = asyncio.get_running_loop().time()
            left = await asyncio.wait_for(recv(a), bound + 5)
            took = asyncio.get_running_loop().time() - killed
            assert left == {"type": "disconnect", "from": c.peer_id, "data": {"reason": "peer_left"}}
            assert took <= bound, f"peer_left after {took:.1f}s"
            for node in (n1, n2):
                assert c.peer_id not in users(node)
                assert users(node)[a.peer_id]["state"] == "idle"
            c.transport.abort()
            await a.close()
        finally:
            n3.stop()

    async def go():
        for i in range(KILL_ROUNDS):
            await one_round(f"dying-{point}-{i}")

    run(go(), timeout=60 * KILL_ROUNDS)
