"""
The real y-webrtc client in Chromium, for the /yjs tests: npm's ``yjs`` and
``y-webrtc`` (tests/npm/yjs, pinned by its lockfile) bundled with esbuild,
served on a page of our own from a loopback HTTP server.  Each page is in
its own browser context, so that pages can only find each other through
the signaling server (pages in one context would sync over
BroadcastChannel without any server).
"""

import functools
import http.server
import os
import shutil
import subprocess
import threading

import pytest

NPM_DIR = os.path.join(os.path.dirname(__file__), "npm", "yjs")
BUNDLE = os.path.join(NPM_DIR, "bundle.js")

#: an editor bound to a Y.Text, and a y-webrtc provider made by start(...)
PAGE = b"""<!doctype html>
<meta charset="utf-8">
<title>y-webrtc against our server</title>
<textarea id="editor" rows="4" cols="60"></textarea>
<script src="bundle.js"></script>
<script>
window.start = ({url, room, password}) => {
  const doc = new Y.Doc();
  const text = doc.getText("t");
  const editor = document.getElementById("editor");
  editor.addEventListener("input", () => doc.transact(() => {
    text.delete(0, text.length);
    text.insert(0, editor.value);
  }, "editor"));
  text.observe((_, tr) => { if (tr.origin !== "editor") editor.value = text.toString(); });
  window.peers = 0;
  const provider = new WebrtcProvider(room, doc, {
    signaling: [url], password: password || null,
    peerOpts: {config: {iceServers: []}},  // host candidates only: nothing leaves the machine
  });
  provider.on("peers", (e) => { window.peers = e.webrtcPeers.length; });
  window.doc = doc; window.text = text; window.provider = provider;
};
window.signalingConnected = () => window.provider.signalingConns.every((c) => c.connected);
</script>
"""


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        message = f"{tool} is missing (apt-get install nodejs npm)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def build_bundle() -> str:
    """Install the pinned packages (npm ci) if needed and bundle them (esbuild); return the bundle's path."""
    lock = os.path.join(NPM_DIR, "package-lock.json")
    sources = [lock] + [os.path.join(NPM_DIR, name) for name in ("entry.js", "build.mjs")]
    if os.path.exists(BUNDLE) and os.path.getmtime(BUNDLE) >= max(os.path.getmtime(p) for p in sources):
        return BUNDLE
    node, npm = need("node"), need("npm")
    modules = os.path.join(NPM_DIR, "node_modules")
    if not os.path.isdir(os.path.join(modules, "y-webrtc")) or os.path.getmtime(modules) < os.path.getmtime(lock):
        subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NPM_DIR, check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    subprocess.run([node, "build.mjs"], cwd=NPM_DIR, check=True, timeout=120)
    return BUNDLE


class PageServer:
    """Serves PAGE (as /index.html) and the bundle on a free loopback port, in a thread."""

    def __init__(self, bundle: str):
        with open(bundle, "rb") as f:
            files = {"/index.html": (PAGE, "text/html; charset=utf-8"),
                     "/bundle.js": (f.read(), "text/javascript; charset=utf-8")}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body, kind = files.get(self.path.split("?")[0], (b"", None))
                self.send_response(200 if kind else 404)
                self.send_header("Content-Type", kind or "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/index.html"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@functools.lru_cache(maxsize=None)
def _bundle_once() -> str:
    return build_bundle()


async def open_page(browser, page_server, signaling_url, room, password=None):
    """A page in a new browser context running a WebrtcProvider for ``room`` with only our server."""
    context = await browser.browser.new_context()
    page = await context.new_page()
    page.on("pageerror", lambda e: browser.errors.append(str(e)))
    await page.goto(page_server.url)
    await page.evaluate("(o) => window.start(o)", {"url": signaling_url, "room": room, "password": password})
    return page
