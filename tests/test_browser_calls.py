"""
Tier 4: the test page and signaling.js as people use them, in Chromium:
video calls with a fake camera and microphone, a server restarted in the
middle of a call, calls that time out or are declined, errors in the call
panel, the token field.
"""

import asyncio
import os
import signal

import pytest
from live import ServerProcess, run
from test_webrtc import WAIT_MS, Browser, chat, wait_chat, wait_text

pytestmark = pytest.mark.browser

#: keeps window.framesDecoded up to date: the frames the page has decoded
#: from its partner's camera (getStats(), inbound-rtp video)
WATCH_FRAMES = """() => {
  window.framesDecoded = 0;
  setInterval(async () => {
    const pc = window.signalingClient && window.signalingClient.pc;
    if (!pc) return;
    (await pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") window.framesDecoded = r.framesDecoded || 0;
    });
  }, 100);
}"""


async def frames_above(page, count):
    """Wait until the page has decoded more than ``count`` video frames; return how many."""
    await page.wait_for_function(f"() => window.framesDecoded > {count}", timeout=WAIT_MS)
    return await page.evaluate("() => window.framesDecoded")


async def log_has(page, text):
    await page.wait_for_selector(f"#log >> text={text}", timeout=WAIT_MS)


async def video_call(a, b):
    """Page a calls page b with camera and microphone; both see the other's video."""
    for page in (a, b):
        await page.check("#media")
    await a.fill("#peer", b.peer_id)
    await a.click("#call")
    for page in (a, b):
        await wait_text(page, "#channelState", "open")
        await wait_text(page, "#pcState", "connected")
        await page.wait_for_function("() => document.getElementById('remoteVideo').videoWidth > 0", timeout=WAIT_MS)


def test_video_call_survives_a_server_restart(tmp_path):
    """
    Two pages in a video call (fake devices); the server is stopped (SIGTERM)
    and started again on the same ports.  The media never stops (the
    callee's framesDecoded keeps rising, before, during and after), the pages
    show reconnecting then resumed, the call is paired again on the new
    server by itself, and chat and hang-up work after the restart.
    """
    server = ServerProcess().start()
    restarted = None

    async def go():
        nonlocal restarted
        async with Browser() as br:
            a = await br.page(server.http + "/test.html")
            b = await br.page(server.http + "/test.html")
            await video_call(a, b)
            for page in (a, b):
                await page.evaluate(WATCH_FRAMES)
            before = await frames_above(b, 10)
            assert await frames_above(a, 10) > 10  # both directions

            server.signal(signal.SIGTERM)
            for page in (a, b):
                await log_has(page, "reconnecting: attempt 1")
            await asyncio.to_thread(server.wait)
            during = await frames_above(b, before + 20)  # no server at all: the call goes on

            restarted = server.restarted().start()
            for page in (a, b):
                await page.wait_for_selector("#resumeState >> text=resumed", timeout=WAIT_MS)
                await wait_text(page, "#status", "open")
            assert await a.text_content("#myId") == a.peer_id and await b.text_content("#myId") == b.peer_id
            await asyncio.to_thread(restarted.wait_for_line, rf"peer {b.peer_id} idle -> connected")
            users = restarted.users()
            assert (users[a.peer_id]["state"], users[a.peer_id]["targetUser"]) == ("connected", b.peer_id)
            assert (users[b.peer_id]["state"], users[b.peer_id]["targetUser"]) == ("connected", a.peer_id)
            assert await frames_above(b, during + 20) > during
            for page in (a, b):
                assert await page.text_content("#pcState") == "connected"
                await page.wait_for_selector("#resumeState >> text=call paired again", timeout=WAIT_MS)

            await chat(a, "after the restart")
            await wait_chat(b, "peer: after the restart")
            # (the README's picture: set SIGNALING_SCREENSHOT_DIR=docs to renew it)
            shots = os.environ.get("SIGNALING_SCREENSHOT_DIR") or str(tmp_path)
            await b.screenshot(path=os.path.join(shots, "test-page-video-call.png"), full_page=True)
            await a.click("#hangup")  # through the restarted server
            await log_has(b, "call ended: user_disconnect")
            assert br.errors == []

    try:
        run(go(), timeout=240)
    finally:
        if restarted is not None:
            restarted.stop()
        server.stop()


def test_timed_out_call_returns_both_sides_to_idle(server):
    """
    A call the callee does not answer (auto-answer off, nobody clicks)
    times out: the caller's panel says so, the server is told (disconnect),
    both pages are idle again, and the next call between them works.
    """

    async def go():
        async with Browser() as br:
            a = await br.page(server.http + "/test.html")
            b = await br.page(server.http + "/test.html")
            await b.uncheck("#autoAnswer")
            await a.evaluate("() => { window.signalingClient.pongTimeout = 2000; }")
            await a.fill("#peer", b.peer_id)
            await a.click("#call")
            await b.wait_for_selector("#ringing", state="visible", timeout=WAIT_MS)
            assert await b.text_content("#caller") == a.peer_id
            await a.wait_for_selector("#callError >> text=timeout: no answer from", timeout=WAIT_MS)
            for page in (a, b):
                await wait_text(page, "#callState", "idle")
            await b.wait_for_selector("#ringing", state="hidden", timeout=WAIT_MS)
            await asyncio.to_thread(server.wait_for_line, rf"peer {a.peer_id} connecting -> idle")
            assert server.users()[a.peer_id]["state"] == "idle"
            assert await a.is_enabled("#call") and not await a.is_enabled("#hangup")

            await a.click("#call")  # and again, answered this time
            await b.wait_for_selector("#ringing", state="visible", timeout=WAIT_MS)
            await b.click("#accept")
            for page in (a, b):
                await wait_text(page, "#channelState", "open")
            assert await a.text_content("#callError") == ""
            await a.click("#hangup")
            await wait_text(b, "#callState", "idle")
            assert br.errors == []

    run(go(), timeout=180)


def test_accept_decline_and_errors_in_the_call_panel(server):
    """
    With auto-answer off an incoming call shows Accept / Decline: Decline
    tells the caller (its panel says declined) and leaves both idle; Accept
    makes the call.  A busy or unknown peer is reported in the call panel.
    """

    async def go():
        async with Browser() as br:
            a = await br.page(server.http + "/test.html")
            b = await br.page(server.http + "/test.html")
            c = await br.page(server.http + "/test.html")
            await b.uncheck("#autoAnswer")
            await a.fill("#peer", b.peer_id)
            await a.click("#call")
            await b.wait_for_selector("#ringing", state="visible", timeout=WAIT_MS)
            await b.click("#decline")
            await a.wait_for_selector("#callError >> text=declined", timeout=WAIT_MS)
            for page in (a, b):
                await wait_text(page, "#callState", "idle")
            await asyncio.to_thread(server.wait_for_line, rf"peer {a.peer_id} connected -> idle")
            users = server.users()
            assert users[a.peer_id]["state"] == users[b.peer_id]["state"] == "idle"

            await a.click("#call")
            await b.wait_for_selector("#ringing", state="visible", timeout=WAIT_MS)
            await b.click("#accept")
            for page in (a, b):
                await wait_text(page, "#channelState", "open")
            await chat(b, "accepted")
            await wait_chat(a, "peer: accepted")

            await c.fill("#peer", a.peer_id)
            await c.click("#call")
            await c.wait_for_selector("#callError >> text=peer-busy", timeout=WAIT_MS)
            await wait_text(c, "#callState", "idle")
            await c.fill("#peer", "nobody-by-that-name")
            await c.click("#call")
            await c.wait_for_selector("#callError >> text=peer-not-found", timeout=WAIT_MS)
            assert br.errors == []

    run(go(), timeout=180)


def test_token_field_and_parameter(tmp_path):
    """
    Against a server that needs access tokens, the page says so instead of a
    bare close code; with a token typed in, or given as ?token=, it connects.
    """
    from signaling.tokens import make_token

    secret = tmp_path / "secret"
    secret.write_bytes(b"a secret of at least 16 bytes")
    server = ServerProcess(f"--token-secret-file={secret}").start()
    token = make_token(secret.read_bytes(), 600)

    async def go():
        async with Browser() as br:
            page = await br.browser.new_page()
            page.on("pageerror", lambda e: br.errors.append(str(e)))
            await page.goto(server.http + "/test.html")
            await page.wait_for_selector("#connectError", state="visible", timeout=WAIT_MS)
            assert "requires an access token" in await page.text_content("#connectError")
            await page.fill("#token", "not-a-token")
            await page.click("#connect")
            await page.wait_for_selector("#connectError >> text=refused the token", timeout=WAIT_MS)
            await page.fill("#token", token)
            await page.click("#connect")
            await wait_text(page, "#status", "open")
            assert len(await page.text_content("#myId")) == 36
            assert await page.is_hidden("#connectError")

            other = await br.browser.new_page()
            await other.goto(f"{server.http}/test.html?token={token}")
            await wait_text(other, "#status", "open")
            assert await other.input_value("#token") == token
            help_text = await other.text_content(".help")
            assert "?ws=" in help_text and "?token=" in help_text
            assert br.errors == []

    try:
        run(go(), timeout=120)
    finally:
        server.stop()


class CuttableProxy:
    """
    A TCP forwarder on a free loopback port (asyncio, in the test's loop):
    ``cut()`` resets every connection through it, as a network change or
    a proxy restart does, while new connections keep working.
    """

    def __init__(self, target_port):
        self.target_port = target_port
        self.pairs = []

    async def start(self):
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.pairs.append((writer, up_writer))

        async def pump(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def cut(self):
        """Reset both sides of every connection: no close frame either way."""
        import socket
        import struct

        for pair in self.pairs:
            for writer in pair:
                sock = writer.get_extra_info("socket")
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except (AttributeError, OSError):
                    pass  # (closed already)
                writer.transport.abort()
        self.pairs = []

    async def stop(self):
        self.cut()
        self.server.close()
        await self.server.wait_closed()


def test_network_drop_resumes_the_session(server):
    """
    The pages' TCP connections are reset mid-call (a network change): they
    reconnect, the server gives the sessions back ("resumed"), with what was
    sent meanwhile; the call never stopped and signaling goes on.
    """

    async def go():
        proxy = await CuttableProxy(server.ports["http"]).start()
        try:
            async with Browser() as br:
                url = f"{server.http}/test.html?ws=ws://127.0.0.1:{proxy.port}/ws"
                a = await br.page(url)
                b = await br.page(url)
                await a.fill("#peer", b.peer_id)
                await a.click("#call")
                for page in (a, b):
                    await wait_text(page, "#channelState", "open")
                since = len(server.lines)
                proxy.cut()
                for page in (a, b):
                    await log_has(page, "reconnecting: attempt 1")
                    await wait_text(page, "#resumeState", "resumed")  # the session itself, kept
                    await wait_text(page, "#status", "open")
                for page in (a, b):
                    await asyncio.to_thread(
                        server.wait_for_line, rf"peer {page.peer_id} resumed from 127.0.0.1", since=since
                    )
                users = server.users()
                assert (users[a.peer_id]["targetUser"], users[b.peer_id]["targetUser"]) == (b.peer_id, a.peer_id)
                assert users[a.peer_id]["online"] and users[b.peer_id]["online"]
                assert "peer_left" not in "\n".join(server.lines[since:])
                await chat(b, "after the drop")
                await wait_chat(a, "peer: after the drop")
                # signaling through the server goes on: an ICE restart, offered and answered
                await a.evaluate("() => window.signalingClient._restartIce('test')")
                await log_has(a, "ICE restart (test)")
                await asyncio.to_thread(
                    server.wait_for_line, rf"relay answer {b.peer_id} -> {a.peer_id}", since=since
                )
                await chat(a, "after the ICE restart")
                await wait_chat(b, "peer: after the ICE restart")
                assert await a.text_content("#pcState") == "connected"
                await a.click("#hangup")
                await log_has(b, "call ended: user_disconnect")
                assert br.errors == []
        finally:
            await proxy.stop()

    run(go(), timeout=180)
