"""
Tier 4: real WebRTC through the installed server: Chromium pages driven by
Playwright, and aiortc peers.  The test page is used the way a person uses it:
by filling fields and clicking.
"""

import asyncio
import os

import pytest
from live import run
from playwright.async_api import async_playwright
from rtc_peer import RtcPeer

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--disable-dev-shm-usage",
    # host candidates as IP addresses, not mDNS names (nothing resolves them here)
    "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    # a fake camera and microphone, granted without asking
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
]
WAIT_MS = 30000


def need_chromium():
    if os.path.exists(CHROMIUM):
        return
    message = f"{CHROMIUM} is missing (apt-get install chromium)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Browser:
    """One headless Chromium; closed (with all its processes) on exit."""

    async def __aenter__(self):
        need_chromium()
        self._pw = await async_playwright().start()
        self.browser = await self._pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        self.errors = []
        return self

    async def page(self, url):
        page = await self.browser.new_page(viewport={"width": 1100, "height": 780})
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        await page.goto(url)
        await page.wait_for_function(
            "() => document.getElementById('myId').textContent.length === 36", timeout=WAIT_MS
        )
        page.peer_id = await page.text_content("#myId")
        return page

    async def __aexit__(self, *exc):
        await self.browser.close()
        await self._pw.stop()


async def wait_text(page, selector, text):
    await page.wait_for_function(
        "([s, t]) => document.querySelector(s).textContent === t", arg=[selector, text],
        timeout=WAIT_MS,
    )


async def wait_chat(page, text):
    await page.wait_for_function(
        "t => document.getElementById('chatLog').textContent.includes(t)", arg=text,
        timeout=WAIT_MS,
    )


async def chat(page, text):
    await page.fill("#chatInput", text)
    await page.click("#chatSend")


def test_two_pages_call_chat_hang_up_and_peer_left(server):
    """Page A calls page B by id; they chat over the data channel; hang-up and a closed page end the call."""

    async def go():
        async with Browser() as b:
            a = await b.page(server.http + "/")
            bb = await b.page(server.http + "/test.html")
            await a.fill("#peer", bb.peer_id)
            await a.click("#call")
            for page in (a, bb):
                await wait_text(page, "#channelState", "open")
                await wait_text(page, "#pcState", "connected")
            users = server.users()
            assert (users[a.peer_id]["state"], users[a.peer_id]["targetUser"]) == ("connected", bb.peer_id)
            assert (users[bb.peer_id]["state"], users[bb.peer_id]["targetUser"]) == ("connected", a.peer_id)

            await chat(a, "hello from A")
            await wait_chat(bb, "peer: hello from A")
            await chat(bb, "hi A, B here ✓")
            await wait_chat(a, "peer: hi A, B here ✓")

            await a.click("#hangup")
            for page in (a, bb):
                await wait_text(page, "#callState", "idle")
            await bb.wait_for_selector("#log >> text=call ended: user_disconnect")
            users = server.users()
            assert users[a.peer_id]["state"] == users[bb.peer_id]["state"] == "idle"

            # call again, then B's page goes away: A is told peer_left
            await a.click("#call")
            await wait_text(a, "#channelState", "open")
            gone = bb.peer_id
            await bb.close()
            await a.wait_for_selector("#log >> text=call ended: peer_left")
            await wait_text(a, "#callState", "idle")
            assert gone not in server.users()
            assert b.errors == []

    run(go(), timeout=180)


def test_aiortc_calls_a_chromium_page(server):
    """An aiortc peer calls a Chromium test page through the server; they exchange data-channel messages."""

    async def go():
        async with Browser() as b:
            page = await b.page(server.http + "/test.html")
            peer = await RtcPeer(server.ws).start()
            try:
                await peer.call(page.peer_id)
                await wait_text(page, "#channelState", "open")
                await peer.say("hello from aiortc")
                await wait_chat(page, "peer: hello from aiortc")
                await chat(page, "hello back from Chromium")
                assert await peer.hear() == "hello back from Chromium"
                assert peer.got_candidates > 0  # Chromium trickled its candidates
                assert server.users()[peer.peer_id]["targetUser"] == page.peer_id
            finally:
                await peer.close()
            await page.wait_for_selector("#log >> text=call ended: peer_left")
            assert b.errors == []

    run(go(), timeout=180)


def test_two_aiortc_peers_with_trickled_candidates(server, monkeypatch):
    """Two aiortc peers open a data channel through the server with every candidate trickled."""
    import aioice.ice

    # loopback only (aioice leaves out 127.0.0.1 by default)
    monkeypatch.setattr(
        aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"]
    )

    async def go():
        caller = await RtcPeer(server.ws, trickle=True).start()
        callee = await RtcPeer(server.ws_on_http, trickle=True).start()
        try:
            await caller.call(callee.peer_id)
            await asyncio.wait_for(callee.channel_open.wait(), 30)
            await caller.say("ping over SCTP")
            assert await callee.hear() == "ping over SCTP"
            await callee.say("pong over SCTP")
            assert await caller.hear() == "pong over SCTP"
            assert caller.sent_candidates > 0 and callee.sent_candidates > 0
            assert callee.got_candidates == caller.sent_candidates
            offers = [m for m in callee.received if m["type"] == "offer"]
            assert "a=candidate:" not in offers[0]["data"]["sdp"]
        finally:
            await caller.close()
            await callee.close()

    run(go(), timeout=180)


def test_client_module_served(server):
    """/signaling.js is served as a JavaScript module exporting SignalingClient."""
    status, headers, body = server.get("/signaling.js")
    assert status == 200
    assert headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert b"export class SignalingClient" in body


def test_test_page_with_a_foreign_server_address(server):
    """
    Opened with ?ws= naming another host, the test page does not connect by
    itself and says why; once the user presses Connect, a call through that
    server is answered only after the user confirms it.  No page breaks its
    Content-Security-Policy.
    """

    async def go():
        async with Browser() as b:
            own = await b.page(server.http + "/test.html")
            foreign_url = f"ws://localhost:{server.ports['ws']}/"  # another host name for the page
            page = await b.browser.new_page()
            console = []
            page.on("console", lambda m: console.append(m.text))
            own.on("console", lambda m: console.append(m.text))
            dialogs = []

            async def answer(dialog):
                dialogs.append(dialog.message)
                await dialog.accept()

            page.on("dialog", lambda d: asyncio.ensure_future(answer(d)))
            await page.goto(server.http + "/test.html?ws=" + foreign_url)
            await page.wait_for_selector("#foreign", state="visible", timeout=WAIT_MS)
            assert foreign_url in await page.text_content("#foreign")
            assert await page.text_content("#status") == "closed"
            assert await page.input_value("#url") == foreign_url
            await page.wait_for_selector("#log >> text=not connecting by itself", timeout=WAIT_MS)
            assert len(server.users()) == 1  # only the own page

            await page.click("#connect")
            await page.wait_for_function(
                "() => document.getElementById('myId').textContent.length === 36", timeout=WAIT_MS
            )
            callee = await page.text_content("#myId")
            await own.fill("#peer", callee)
            await own.click("#call")
            for p in (own, page):
                await wait_text(p, "#channelState", "open")
            assert dialogs == [f"Answer a call from {own.peer_id} through {foreign_url}?"]
            assert not [m for m in console if "Content Security Policy" in m], console
            assert b.errors == []

    run(go(), timeout=180)
