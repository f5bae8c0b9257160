"""
Tier 4: the real y-webrtc client (npm ``y-webrtc`` 10.3.0 and ``yjs``,
unchanged, bundled by esbuild) in Chromium, with our server as its only
signaling server: pages in separate browser contexts (no BroadcastChannel
between them) find each other through /yjs, connect over WebRTC and sync a
Y.Text typed into an editor.
"""

import asyncio

import pytest
import websockets
from live import ServerProcess, run
from redis_server import RedisServer
from test_webrtc import WAIT_MS, Browser
from yjs_pages import PageServer, _bundle_once, open_page

from signaling.tokens import make_token

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def pages():
    server = PageServer(_bundle_once())
    yield server
    server.close()


def yjs_url(server):
    return server.ws_on_http.replace("/ws", "/yjs")


async def shows(page, text):
    """Wait until the page's editor shows ``text``."""
    await page.wait_for_function("t => document.getElementById('editor').value === t", arg=text, timeout=WAIT_MS)


async def peers(page, count):
    await page.wait_for_function("n => window.peers >= n", arg=count, timeout=WAIT_MS)


async def type_into(page, text):
    await page.click("#editor")
    await page.keyboard.press("End")
    await page.keyboard.type(text)


def test_two_contexts_sync_a_text_through_our_server(server, pages):
    """Two pages in room r, each in its own context, connect through /yjs only; what one types the other shows."""

    async def go():
        async with Browser() as br:
            a = await open_page(br, pages, yjs_url(server), "r")
            b = await open_page(br, pages, yjs_url(server), "r")
            await peers(a, 1)
            await peers(b, 1)
            await type_into(a, "hello from A")
            await shows(b, "hello from A")
            await type_into(b, ", and B")
            await shows(a, "hello from A, and B")
            # (the signaling went through our server: its publishes reached both pages)
            await asyncio.to_thread(server.wait_for_line, r"publish from yjs/\S+ to 2 subscribers")
            users = [u["id"] for u in server.stats()["users"]]
            assert sum(u.startswith("yjs/") for u in users) >= 2
            assert br.errors == []

    run(go())


def test_a_room_password_and_a_late_joiner(server, pages):
    """
    With a room password (signaling messages encrypted by the clients), two
    pages sync; a third page that joins later gets the whole document.
    """

    async def go():
        async with Browser() as br:
            a = await open_page(br, pages, yjs_url(server), "secret-room", password="p4ss")
            b = await open_page(br, pages, yjs_url(server), "secret-room", password="p4ss")
            await peers(a, 1)
            await type_into(a, "encrypted signaling")
            await shows(b, "encrypted signaling")
            await type_into(b, "!")
            late = await open_page(br, pages, yjs_url(server), "secret-room", password="p4ss")
            await peers(late, 1)
            await shows(late, "encrypted signaling!")
            await type_into(late, " +late")
            await shows(a, "encrypted signaling! +late")
            await shows(b, "encrypted signaling! +late")
            assert br.errors == []

    run(go())


def test_an_invalid_frame_leaves_the_other_clients_connected(server, pages):
    """
    A client that sends garbage to /yjs (until it is closed with 1008) gets
    errors; the pages in the same room stay connected to the server and keep
    syncing.
    """

    async def go():
        async with Browser() as br:
            a = await open_page(br, pages, yjs_url(server), "busy")
            b = await open_page(br, pages, yjs_url(server), "busy")
            await peers(a, 1)
            async with websockets.connect(yjs_url(server)) as bad:
                await bad.send('{"type":"subscribe","topics":["busy"]}')
                for _ in range(25):
                    await bad.send("{definitely not json")
                try:
                    while True:
                        await asyncio.wait_for(bad.recv(), 15)
                except websockets.ConnectionClosed:
                    pass
                assert bad.close_code == 1008
            for page in (a, b):
                assert await page.evaluate("() => window.signalingConnected()")
            await type_into(a, "still here")
            await shows(b, "still here")
            # and the signaling path still works: a new page finds them through the server
            c = await open_page(br, pages, yjs_url(server), "busy")
            await peers(c, 1)
            await shows(c, "still here")
            assert br.errors == []

    run(go())


def test_a_topic_restricted_token_is_refused_another_room(tmp_path, pages):
    """
    With access tokens, a token for room r works in r; the same token in
    room s is refused (subscribe and publish), so the page there never finds
    the page that may use s.
    """
    secret = tmp_path / "secret"
    secret.write_bytes(b"a secret of at least 16 bytes")
    server = ServerProcess(f"--token-secret-file={secret}").start()
    key = secret.read_bytes()
    only_r = make_token(key, 600, topics=["r"])
    only_s = make_token(key, 600, topic_prefix="s")

    async def go():
        async with Browser() as br:
            url = yjs_url(server)
            a = await open_page(br, pages, f"{url}?token={only_r}", "r")
            b = await open_page(br, pages, f"{url}?token={only_r}", "r")
            await peers(a, 1)
            await type_into(a, "allowed")
            await shows(b, "allowed")
            s1 = await open_page(br, pages, f"{url}?token={only_s}", "s")
            await type_into(s1, "only for s")
            since = len(server.lines)
            s2 = await open_page(br, pages, f"{url}?token={only_r}", "s")  # r's token in room s
            await asyncio.to_thread(server.wait_for_line, r"error topic-not-allowed to yjs/\S+: .*\(ref subscribe\)",
                                    20, since)
            await asyncio.to_thread(server.wait_for_line, r"error topic-not-allowed to yjs/\S+: .*\(ref publish\)",
                                    20, since)
            # refused: it is in no topic, so nothing published to s can reach it; and s1 got nothing from it
            assert await s2.evaluate("() => window.peers") == 0
            assert await s1.evaluate("() => window.peers") == 0
            assert await s2.evaluate("() => window.text.toString()") == ""
            assert br.errors == []

    try:
        run(go())
    finally:
        server.stop()


@pytest.mark.cluster
def test_pages_on_two_nodes_of_a_cluster(pages):
    """A page on each of two nodes (one Redis) finds the other through the cluster and syncs."""
    redis = RedisServer().start()
    nodes = []
    try:
        for name in ("n1", "n2"):
            nodes.append(ServerProcess(f"--redis={redis.url}", f"--node-id={name}").start())
        for node in nodes:
            node.wait_for_line(r"redis: connected")

        async def go():
            async with Browser() as br:
                a = await open_page(br, pages, yjs_url(nodes[0]), "shared")
                b = await open_page(br, pages, yjs_url(nodes[1]), "shared")
                await peers(a, 1)
                await peers(b, 1)
                await type_into(a, "across nodes")
                await shows(b, "across nodes")
                late = await open_page(br, pages, yjs_url(nodes[1]), "shared")
                await shows(late, "across nodes")
                assert br.errors == []

        run(go())
    finally:
        for node in nodes:
            node.stop()
        redis.cleanup()
