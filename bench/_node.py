"""
The Node side of the benchmarks: the ``ws`` load generator
(``bench/node/loadgen.mjs``) and PeerJS server 1.0 (npm ``peer``) as a
reference server, both run with the ``node`` on the PATH.

``bench/node/package.json`` and its lockfile pin ``ws`` 8.x and ``peer``
1.0.x; :func:`ensure_installed` runs ``npm ci`` there when
``bench/node/node_modules`` is missing (the npm registry must be
reachable then; nothing is installed anywhere else).
"""

import json
import os
import shutil
import socket
import subprocess
import threading
import time

from _server import pinned

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_DIR = os.path.join(HERE, "node")
LOADGEN = os.path.join(NODE_DIR, "loadgen.mjs")
PEERJS_BIN = os.path.join(NODE_DIR, "node_modules", "peer", "dist", "bin", "peerjs.js")

#: PeerJS server's options in the benchmark: loopback, its default path and
#: key, and its one limit (5,000 concurrent peers) raised as ours are.
PEERJS_OPTIONS = ["--host", "127.0.0.1", "--path", "/", "--key", "peerjs", "--concurrent_limit", "30000"]


def node() -> str:
    path = shutil.which("node")
    if path is None:
        raise SystemExit("node is not on the PATH (Node 18 or later is needed for bench/node)")
    return path


def ensure_installed() -> None:
    """``npm ci`` in bench/node if its node_modules is missing (pinned by package-lock.json)."""
    if os.path.exists(os.path.join(NODE_DIR, "node_modules", "ws", "package.json")) and os.path.exists(PEERJS_BIN):
        return
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is not on the PATH: cannot install bench/node's packages")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True,
                   timeout=600)


def versions() -> dict:
    """Node's version and the installed versions of ws and peer."""
    out = {"node": subprocess.run([node(), "--version"], capture_output=True, text=True).stdout.strip()}
    for name in ("ws", "peer"):
        with open(os.path.join(NODE_DIR, "node_modules", name, "package.json")) as f:
            out[name] = json.load(f)["version"]
    return out


def free_port() -> int:
    """A port free on loopback now (a benchmark: the gap before the server binds it is accepted)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PeerJSServer:
    """
    PeerJS server 1.0 (its own CLI, ``peerjs``) on a free loopback port,
    optionally pinned to one core; the same reading of memory and CPU time
    as ``_server.Server``.  ``ws`` is the base URL of its WebSocket
    (``/peerjs``; clients add ``?key=&id=&token=``).
    """

    protocol = "peerjs"

    def __init__(self, core=None):
        ensure_installed()
        port = free_port()
        argv = [node(), PEERJS_BIN, "--port", str(port), *PEERJS_OPTIONS]
        self.proc = subprocess.Popen(pinned(core, argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = []
        deadline = time.monotonic() + 30
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Started PeerServer" in line:
                break
            if time.monotonic() > deadline:
                break
        else:
            raise SystemExit("PeerJS server did not start:\n" + "".join(self.lines[-20:]))
        threading.Thread(target=self._drain, daemon=True).start()  # (it logs every connect and disconnect)
        self.ws = f"ws://127.0.0.1:{port}/peerjs"
        self.http = f"http://127.0.0.1:{port}"

    def _drain(self):
        for line in self.proc.stdout:
            if len(self.lines) < 100:
                self.lines.append(line)

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self):
        """User plus system CPU time the process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


def loadgen_argv(*args, protocol="native"):
    """The command line of the Node generator for ``args`` (scenario, URL, options)."""
    ensure_installed()
    return [node(), LOADGEN, *args, "--protocol", protocol]
