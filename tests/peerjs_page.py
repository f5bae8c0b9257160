"""
The real PeerJS client in Chromium, for the browser tests: the npm package
``peerjs`` (tests/npm/peerjs, installed with ``npm ci`` when missing), its
``dist/peerjs.min.js`` loaded by a page this module serves on a loopback
port of its own (another origin than the signaling server's, as an app's
page would be), a threaded TCP forwarder that can cut connections, and the
page's helpers (``window.start``, ``connect``, ``sendTo``, ``callPeer``...).
"""

import asyncio
import http.server
import os
import shutil
import subprocess
import threading

import pytest

NPM_DIR = os.path.join(os.path.dirname(__file__), "npm", "peerjs")
DIST = os.path.join(NPM_DIR, "node_modules", "peerjs", "dist", "peerjs.min.js")


def need(what: str, message: str):
    """A missing prerequisite: a failure under CI=true, else a skip."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing: {message}")
    pytest.skip(f"{what} is missing: {message}")


def peerjs_dist() -> bytes:
    """The browser build of the pinned peerjs (``npm ci`` in tests/npm/peerjs if it is not installed)."""
    if not os.path.exists(DIST):
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            need("npm", "install nodejs and npm (the PeerJS browser tests fetch the peerjs package with npm ci)")
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NPM_DIR, check=True,
                       timeout=600, stdin=subprocess.DEVNULL)
    with open(DIST, "rb") as f:
        return f.read()


PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>PeerJS client test page</title>
<script src="/peerjs.min.js"></script>
<script>
window.events = [];  // [kind, ...details], in order
window.data = [];  // [from, serialization, value] of every data message received
window.conns = [];
window.framesDecoded = 0;
function note(...e) { window.events.push(e); }
window.has = (...want) => window.events.some((e) => want.every((w, i) => e[i] === w));

window.start = (id, options) => {
  const peer = id ? new peerjs.Peer(id, options) : new peerjs.Peer(options);
  window.peer = peer;
  peer.on("open", (pid) => note("open", pid));
  peer.on("error", (e) => note("error", e.type, String(e.message)));
  peer.on("disconnected", (pid) => note("disconnected", pid));
  peer.on("close", () => note("close"));
  peer.on("connection", (conn) => wire(conn));
  peer.on("call", async (call) => {
    note("call", call.peer);
    call.answer(await media());
    watch(call);
  });
  return true;
};

function media() { return navigator.mediaDevices.getUserMedia({video: true, audio: true}); }

function wire(conn) {
  window.conns.push(conn);
  conn.on("open", () => note("conn-open", conn.peer, conn.serialization));
  conn.on("data", (d) => {
    if (d instanceof ArrayBuffer) d = {bytes: Array.from(new Uint8Array(d))};
    else if (ArrayBuffer.isView(d)) d = {bytes: Array.from(new Uint8Array(d.buffer, d.byteOffset, d.byteLength))};
    window.data.push([conn.peer, conn.serialization, d]);
  });
  conn.on("error", (e) => note("conn-error", conn.peer, String(e)));
  conn.on("close", () => note("conn-close", conn.peer));
}

window.connect = (other, serialization) => { wire(window.peer.connect(other, {serialization})); return true; };

window.sendTo = (other, serialization, value, bytes) => {
  const conn = window.conns.find((c) => c.peer === other && c.serialization === serialization && c.open);
  conn.send(bytes ? new Uint8Array(value) : value);
  return true;
};

window.callPeer = async (other) => {
  const call = window.peer.call(other, await media());
  watch(call);
  return true;
};

function watch(call) {
  call.on("stream", (remote) => {
    const video = document.createElement("video");
    video.autoplay = true; video.muted = true; video.srcObject = remote;
    document.body.appendChild(video);
    note("stream", call.peer);
  });
  setInterval(async () => {
    if (!call.peerConnection) return;
    (await call.peerConnection.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "video") window.framesDecoded = r.framesDecoded || 0;
    });
  }, 200);
}
</script>
<p>PeerJS client test page (served by the test, not by the product)</p>
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.split("?")[0]
        files = {"/": (PAGE, "text/html; charset=utf-8"), "/peerjs.min.js": (self.server.dist, "text/javascript")}
        if path not in files:
            self.send_error(404)
            return
        body, kind = files[path]
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class PageServer:
    """The test page and peerjs.min.js over HTTP on a free loopback port (a thread)."""

    def __init__(self):
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.dist = peerjs_dist()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class CuttableForwarder:
    """
    ``test_browser_calls.CuttableProxy`` (a TCP forwarder whose ``cut()``
    resets every connection through it: no close frame either way, as a
    network change does) on an asyncio loop of its own thread, for tests
    that are not asyncio themselves.
    """

    def __init__(self, target_port: int):
        from test_browser_calls import CuttableProxy

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = self._run(CuttableProxy(target_port).start())
        self.port = self.proxy.port

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def cut(self):
        async def cut():
            self.proxy.cut()

        self._run(cut())

    def stop(self):
        self._run(self.proxy.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
