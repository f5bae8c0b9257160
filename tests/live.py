"""
Run the installed server as a real process (``twistd -n signaling`` or
``twist signaling``) on free loopback ports, and talk to it with the
``websockets`` library.  Waiting is always on an event (a log line, a frame,
the process exiting), never on a sleep.
"""

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import websockets

BIN = os.path.dirname(sys.executable)
LISTENING = re.compile(r"(http|ws) listening on (\S+):(\d+)$")


def script(name):
    path = os.path.join(BIN, name)
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing: is the package installed in this environment?")
    return path


class ServerProcess:
    """One server process; ``http`` and ``ws`` are its base URLs once started."""

    def __init__(self, *args, command="twistd", json_logs=False,
                 http="tcp:0:interface=127.0.0.1", ws="tcp:0:interface=127.0.0.1", max_files=None, cwd=None):
        self.args = list(args)
        self.max_files = max_files  # RLIMIT_NOFILE of the server process (soft and hard)
        self.listen = [f"--http={http}", f"--ws={ws}"]
        self.command = command
        self.json_logs = json_logs
        self.lines = []
        self._queue = queue.Queue()
        self.ports = {}
        self.proc = None
        self.tmp = tempfile.TemporaryDirectory(prefix="signaling-test-")
        # its working directory (where the default resume secret is kept): its
        # own, or another's (a restart of the same server)
        self.cwd = cwd or self.tmp.name
        self.env = {}  # environment variables for the server, besides this process's

    def argv(self):
        listen = self.listen
        if self.command == "twistd":
            return [script("twistd"), "-n", "--pidfile=", "signaling", *listen, *self.args]
        fmt = ["--log-format=json"] if self.json_logs else []
        return [script("twist"), *fmt, "signaling", *listen, *self.args]

    def start(self, timeout=30.0, unix_ws=False):
        """Start it and wait until it is ready (``unix_ws``: its WebSocket endpoint is a UNIX socket)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self.proc = subprocess.Popen(
            self.argv(),
            cwd=self.cwd,  # twistd adds its working directory to sys.path
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            encoding="utf-8",
            errors="backslashreplace",  # an unescaped byte in the log must show, not break the reader
            preexec_fn=self._limits if self.max_files else None,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        ready = False
        while len(self.ports) < (1 if unix_ws else 2) or not ready:
            line = self._next_line(deadline)
            ready = ready or "signaling" in line and " ready" in line
            if self.json_logs:
                try:
                    event = json.loads(line.lstrip("\x1e"))
                except ValueError:
                    continue
                if event.get("log_namespace") == "signaling.listening.ListenService" and "port" in event:
                    self.ports[event["label"]] = event["port"]
            else:
                m = LISTENING.search(line)
                if m:
                    self.ports[m.group(1)] = int(m.group(3))
        self.http = f"http://127.0.0.1:{self.ports['http']}"
        self.ws = f"ws://127.0.0.1:{self.ports['ws']}/" if not unix_ws else None
        self.ws_on_http = f"ws://127.0.0.1:{self.ports['http']}/ws"
        return self

    def _limits(self):
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (self.max_files, self.max_files))

    def rss_kib(self):
        """The server process's resident memory."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def _read(self):
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def _next_line(self, deadline):
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError("server did not log in time:\n" + self.output()) from None
        if line is None:
            raise AssertionError("server exited:\n" + self.output())
        return line

    def wait_for_line(self, pattern, timeout=20.0, since=0):
        """
        Wait until a log line matching ``pattern`` (a regex) appears, counting
        only lines from index ``since`` of ``self.lines`` on; return it.
        """
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            lines = self.lines[since:]
            for line in lines:
                if rx.search(line):
                    return line
            since += len(lines)
            self._next_line(deadline)  # wait for more output

    def output(self):
        return "\n".join(self.lines[-200:])

    def restarted(self):
        """A new server like this one (stopped): the same arguments, ports and working directory."""
        return ServerProcess(
            *self.args, command=self.command, json_logs=self.json_logs, max_files=self.max_files, cwd=self.cwd,
            http=f"tcp:{self.ports['http']}:interface=127.0.0.1", ws=f"tcp:{self.ports['ws']}:interface=127.0.0.1",
        )

    def signal(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=30.0):
        """Wait for the process to exit and for its output to be read; return its status."""
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout)
        return code

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.tmp.cleanup()

    # -- HTTP -----------------------------------------------------------------

    def get(self, path):
        with urllib.request.urlopen(self.http + path, timeout=10) as response:
            return response.status, dict(response.headers), response.read()

    def stats(self):
        status, headers, body = self.get("/api/stats")
        assert status == 200
        assert headers["Content-Type"] == "application/json"
        return json.loads(body)

    def users(self):
        return {u["id"]: u for u in self.stats()["users"]}


# -- websockets helpers ---------------------------------------------------------

TIMEOUT = 15.0


def run(coro, timeout=120.0):
    """Run a test's coroutine to completion, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def connect(url, **kwargs):
    """Open a WebSocket and return it with the id from its welcome."""
    kwargs.setdefault("max_size", None)
    kwargs.setdefault("ping_interval", None)
    ws = await asyncio.wait_for(websockets.connect(url, **kwargs), TIMEOUT)
    welcome = await recv(ws)
    assert welcome["type"] == "welcome", welcome
    ws.peer_id = welcome["id"]
    ws.welcome = welcome
    return ws


async def recv(ws):
    return json.loads(await recv_raw(ws))


async def recv_raw(ws):
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


async def send(ws, obj):
    await ws.send(json.dumps(obj))


async def pair(a, b):
    """Pair two connected peers with ping/pong (the relayed ping and pong are checked and consumed)."""
    await send(a, {"type": "ping", "to": b.peer_id})
    assert (await recv(b))["type"] == "ping"
    await send(b, {"type": "pong", "to": a.peer_id})
    assert (await recv(a))["type"] == "pong"


async def paired(url_a, url_b=None):
    """Two new peers (on ``url_a`` and ``url_b``), paired."""
    a = await connect(url_a)
    b = await connect(url_b or url_a)
    await pair(a, b)
    return a, b


async def sync(ws):
    """
    Round trip: send a message that is sure to be refused and return every
    frame that arrived before the refusal.  Frames for a socket are written
    in order, so this proves what has (and has not) arrived so far.
    """
    await send(ws, {"type": "ping", "to": "sync-marker"})
    before = []
    while True:
        msg = await recv(ws)
        if msg.get("type") == "error" and msg.get("code") == "peer-not-found" and msg.get("ref") == "ping":
            return before
        before.append(msg)


async def closed_code(ws):
    """Wait for the server to close ``ws``; return the close code it sent."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    except websockets.ConnectionClosed:
        pass
    return ws.close_code
