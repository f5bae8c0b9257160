"""
Tier 4: /dashboard in Chromium: its numbers, charts, users table and the
per-node view change as real peers connect, pair and relay; a filter over
10,000 users draws only the rows in view; a screenshot for the docs.
"""

import os

import pytest
from live import ServerProcess, connect, pair, recv, run, send
from test_webrtc import WAIT_MS, Browser

pytestmark = pytest.mark.browser


async def number(page, element_id):
    text = (await page.text_content(f"#{element_id}")).replace(",", "")
    return int(text) if text.isdigit() else None


async def wait_number(page, element_id, expected):
    await page.wait_for_function(
        "([id, n]) => document.getElementById(id).textContent.replace(/,/g, '') === String(n)",
        arg=[element_id, expected], timeout=WAIT_MS,
    )


def test_dashboard_follows_the_traffic(tmp_path):
    server = ServerProcess().start()

    async def go():
        async with Browser() as br:
            page = await br.browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("pageerror", lambda e: br.errors.append(str(e)))
            console = []
            page.on("console", lambda m: console.append(m.text))
            await page.goto(server.http + "/dashboard")
            await page.wait_for_selector("#status >> text=live", timeout=WAIT_MS)
            await wait_number(page, "users", 0)

            peers = [await connect(server.ws) for _ in range(6)]
            await wait_number(page, "connections", 6)
            await wait_number(page, "users", 6)
            await pair(peers[0], peers[1])
            await pair(peers[2], peers[3])
            await wait_number(page, "pairs", 2)
            await wait_number(page, "connected", 4)
            for n in range(60):  # relays/s and the relay chart move (within the default burst)
                await send(peers[0], {"type": "ice-candidate", "to": peers[1].peer_id, "data": {"n": n}})
                await recv(peers[1])
            await page.wait_for_function(
                "() => Number(document.getElementById('relays').textContent.replace(/,/g, '')) >= 64",
                timeout=WAIT_MS)
            await page.wait_for_function(
                "() => window.dashboard.history.some((h) => h.relayRate > 0)", timeout=WAIT_MS)
            await send(peers[5], {"type": "offer", "to": peers[0].peer_id})  # invalid-state: an error
            await recv(peers[5])
            await page.wait_for_function(
                "() => window.dashboard.history.some((h) => h.errorRate > 0)", timeout=WAIT_MS)
            assert int(await page.get_attribute("#chartUsers", "data-points")) >= 2

            # the users table and its filter
            await page.wait_for_function(
                "() => document.getElementById('usersTotal').textContent === '6'", timeout=WAIT_MS)
            await page.fill("#filter", peers[4].peer_id[:13])
            await page.wait_for_function(
                "() => document.querySelectorAll('#usersRows .row').length === 1", timeout=WAIT_MS)
            assert peers[4].peer_id in await page.text_content("#usersRows")
            await page.fill("#filter", "connected")
            await wait_number(page, "usersShown", 4)
            await page.fill("#filter", "")

            # a peer that loses its socket shows in grace
            peers[5].transport.abort()
            await wait_number(page, "offline", 1)
            await page.screenshot(path=os.path.join(os.environ.get("SIGNALING_SCREENSHOT_DIR") or str(tmp_path),
                                                    "dashboard.png"), full_page=True)
            for p in peers[:5]:
                await p.close()
            await wait_number(page, "connections", 0)
            assert br.errors == []
            assert not [m for m in console if "Content Security Policy" in m], console

    try:
        run(go(), timeout=180)
    finally:
        server.stop()


def test_users_table_with_ten_thousand_users(server):
    """10,000 users: the filter finds the right ones, and only the rows in view are in the page."""

    async def go():
        async with Browser() as br:
            page = await br.browser.new_page()
            page.on("pageerror", lambda e: br.errors.append(str(e)))
            await page.goto(server.http + "/dashboard")
            await page.wait_for_selector("#status >> text=live", timeout=WAIT_MS)
            await page.evaluate("""() => {
              window.dashboardPollUsers = false;
              const users = [];
              for (let i = 0; i < 10000; i++) {
                users.push({id: "user-" + String(i).padStart(5, "0"), state: i % 3 ? "idle" : "connected",
                            targetUser: null, ip: "10.0." + (i % 250) + "." + (i % 7), online: i % 10 !== 0,
                            connectedAt: "2026-11-29T12:00:00.000Z", node: "n" + (i % 4)});
              }
              window.dashboard.setUsers(users);
            }""")
            assert await page.text_content("#usersTotal") == "10,000"
            rows = await page.evaluate("() => document.querySelectorAll('#usersRows .row').length")
            assert 0 < rows < 60
            await page.fill("#filter", "user-012")
            await wait_number(page, "usersShown", 100)
            await page.fill("#filter", "connected n1")
            expected = sum(1 for i in range(10000) if i % 3 == 0 and i % 4 == 1)
            await wait_number(page, "usersShown", expected)
            assert await page.evaluate("() => window.dashboard.users().length") == expected
            # scrolled to the end, the rows in the page are the last ones (and still only a few)
            await page.evaluate("() => { const box = document.getElementById('usersBox'); "
                                "box.scrollTop = box.scrollHeight; }")
            last_id = await page.evaluate("() => window.dashboard.users().at(-1).id")
            await page.wait_for_function(
                "id => document.querySelector('#usersRows .row:last-child span').textContent === id",
                arg=last_id, timeout=WAIT_MS)
            assert await page.evaluate("() => document.querySelectorAll('#usersRows .row').length") < 60
            assert br.errors == []

    run(go(), timeout=120)


def test_dashboard_behind_the_stats_token(tmp_path):
    token_file = tmp_path / "stats-token"
    token_file.write_text("dashboard-token-0123456789")
    server = ServerProcess(f"--stats-token-file={token_file}").start()

    async def go():
        a = await connect(server.ws)
        async with Browser() as br:
            page = await br.browser.new_page()
            await page.goto(server.http + "/dashboard")
            await page.wait_for_selector("#auth", state="visible", timeout=WAIT_MS)
            assert "token" in await page.text_content("#status")
            await page.fill("#token", "dashboard-token-0123456789")
            await page.click("#auth button")
            await page.wait_for_selector("#status >> text=live", timeout=WAIT_MS)
            await wait_number(page, "users", 1)
            other = await br.browser.new_page()
            await other.goto(server.http + "/dashboard#token=dashboard-token-0123456789")
            await other.wait_for_selector("#status >> text=live", timeout=WAIT_MS)
        await a.close()

    try:
        run(go(), timeout=120)
    finally:
        server.stop()


def test_dashboard_and_metrics_of_a_cluster():
    """With --redis: the per-node view lists every node with its users; /metrics has Redis up and its latency."""
    from redis_server import RedisServer
    from test_metrics import families, value
    from test_metrics_live import get

    redis = RedisServer().start()
    nodes = [ServerProcess(f"--redis={redis.url}", f"--node-id=node{i}") for i in (1, 2)]
    try:
        for node in nodes:
            node.start()
            node.wait_for_line(r"redis: connected")

        async def go():
            a = await connect(nodes[0].ws)
            b = await connect(nodes[1].ws)
            c = await connect(nodes[1].ws)
            await pair(a, b)
            async with Browser() as br:
                page = await br.browser.new_page(viewport={"width": 1280, "height": 1000})
                page.on("pageerror", lambda e: br.errors.append(str(e)))
                await page.goto(nodes[0].http + "/dashboard")
                await page.wait_for_selector("#nodesPanel", state="visible", timeout=WAIT_MS)
                await page.wait_for_function(
                    "() => document.getElementById('nodes').rows.length === 2", timeout=WAIT_MS)
                rows = await page.evaluate(
                    "() => [...document.getElementById('nodes').rows]"
                    ".map((r) => [...r.cells].map((c) => c.textContent))")
                assert rows == [["node1 (this page's)", "1", "1", "0", "1"], ["node2", "2", "2", "0", "1"]]
                await wait_number(page, "users", 3)
                assert await page.text_content("#redisState") == "connected"
                assert br.errors == []
            fams = families(get(nodes[0].http + "/metrics")[2])
            assert value(fams, "signaling_redis_up") == 1
            assert value(fams, "signaling_redis_seconds_count") > 0
            assert value(fams, "signaling_users", state="connected") == 2  # the cluster's
            assert value(fams, "signaling_connections", protocol="native") == 1  # this node's
            assert value(fams, "signaling_info", registry="redis", node="node1") == 1
            for ws in (a, b, c):
                await ws.close()

        run(go(), timeout=120)
    finally:
        for node in nodes:
            node.stop()
        redis.cleanup()
