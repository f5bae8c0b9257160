"""
Tier 3: the server as operators run it: ``twistd -n signaling`` stopped with
SIGTERM/SIGINT, ``twist --log-format=json signaling``, and the plugin as found
in the installed (non-editable) package.
"""

import asyncio
import json
import os
import re
import signal
import subprocess

import pytest
from live import ServerProcess, closed_code, connect, paired, recv, run, script, send, sync

import signaling

pytestmark = pytest.mark.live

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# After a clean shutdown on a signal, twistd and twist re-raise the signal
# (Twisted's convention, which systemd and shells read as a clean stop);
# status 0 is the other clean outcome.
def clean_exit(code, signum):
    return code in (0, -signum)


async def pair_and_negotiate(server):
    a, b = await paired(server.ws, server.ws_on_http)
    await send(a, {"type": "offer", "to": b.peer_id, "data": {"type": "offer", "sdp": "v=0\r\n"}})
    assert (await recv(b))["data"]["sdp"] == "v=0\r\n"
    await send(b, {"type": "answer", "to": a.peer_id, "data": {"type": "answer", "sdp": "v=0\r\n"}})
    assert (await recv(a))["data"]["sdp"] == "v=0\r\n"
    return a, b


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_peers_with_1001_and_exits_cleanly(signum):
    """On SIGTERM/SIGINT twistd closes every WebSocket with 1001, logs a final summary, exits cleanly."""
    server = ServerProcess().start()
    try:
        async def go():
            a, b = await pair_and_negotiate(server)
            c = await connect(server.ws)  # an idle one too
            server.signal(signum)
            return await asyncio.gather(closed_code(a), closed_code(b), closed_code(c))

        assert run(go()) == [1001, 1001, 1001]
        code = server.wait()
        assert clean_exit(code, signum), (code, server.output())
        out = server.output()
        assert "shutting down: no longer accepting connections" in out
        assert "stopped: closed 3 connections; 0 users left in the registry" in out
        assert "Traceback" not in out
    finally:
        server.stop()


def test_shutdown_with_no_peers_is_prompt():
    """With nobody connected, SIGTERM stops the server cleanly."""
    server = ServerProcess().start()
    try:
        server.signal(signal.SIGTERM)
        code = server.wait()
        assert clean_exit(code, signal.SIGTERM), (code, server.output())
        assert "stopped: closed 0 connections" in server.output()
    finally:
        server.stop()


def test_twist_json_logs():
    """``twist --log-format=json signaling`` writes one JSON event per line, with its fields."""
    server = ServerProcess(command="twist", json_logs=True).start()
    try:
        async def go():
            a, b = await pair_and_negotiate(server)
            await a.close()
            await recv(b)
            await b.close()
            return a.peer_id, b.peer_id

        A, B = run(go())
        server.wait_for_line(rf'"peer": "{B}"')
        server.signal(signal.SIGTERM)
        code = server.wait()
        assert clean_exit(code, signal.SIGTERM), (code, server.output())
        events = [json.loads(line.lstrip("\x1e")) for line in server.lines if line.strip()]
        relays = [e for e in events if e.get("log_format", "").startswith("relay ")]
        assert {(e["type"], e["sender"], e["to"]) for e in relays} >= {
            ("ping", A, B), ("pong", B, A), ("offer", A, B), ("answer", B, A)
        }
        assert all(isinstance(e["size"], int) for e in relays)
        connects = [e for e in events if e.get("log_format", "").startswith("peer {peer} connected")]
        assert {e["peer"] for e in connects} == {A, B}
        assert any(e.get("log_namespace") == "signaling.summary" for e in events)
    finally:
        server.stop()


def one_line_failure(*args, env=None, cwd="/"):
    """Run twistd with ``args``; it must fail with exactly one line on stderr and nothing else: return it."""
    proc = subprocess.run(
        [script("twistd"), *args], capture_output=True, text=True, timeout=60, cwd=cwd,
        env=None if env is None else dict(os.environ, **env),
    )
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("signaling: ")
    return proc.stderr.strip()


def test_busy_ports_fail_startup_in_one_line_naming_each():
    """Ports in use make twistd exit at once with one line naming every busy one, not a traceback."""
    blocker = ServerProcess().start()
    try:
        http, ws = blocker.ports["http"], blocker.ports["ws"]
        line = one_line_failure(
            "-n", "--pidfile=", "signaling",
            f"--http=tcp:{http}:interface=127.0.0.1", f"--ws=tcp:{ws}:interface=127.0.0.1",
        )
        assert line == (
            f"signaling: cannot listen: --http=tcp:{http}:interface=127.0.0.1: port {http} on 127.0.0.1: "
            f"address already in use; --ws=tcp:{ws}:interface=127.0.0.1: port {ws} on 127.0.0.1: "
            "address already in use"
        )
        # the same in daemon mode (no truncated repr from the daemon's status pipe)
        line = one_line_failure(
            f"--pidfile={blocker.tmp.name}/d.pid", f"--logfile={blocker.tmp.name}/d.log", "signaling",
            f"--http=tcp:{http}:interface=127.0.0.1", "--ws=none",
        )
        assert f"--http=tcp:{http}:interface=127.0.0.1: port {http} on 127.0.0.1: address already in use" in line
    finally:
        blocker.stop()


@pytest.mark.parametrize("args, expected", [
    (["--http=3000"], "signaling: --http: '3000' is not a listening endpoint (did you mean tcp:3000?)"),
    (["--ws=tcp:eighty"], "signaling: --ws: 'tcp:eighty' is not a listening endpoint"),
    (["--http=unix:/no/such/folder/s.sock"], "signaling: cannot listen: --http=unix:/no/such/folder/s.sock: "
                                             "the folder /no/such/folder does not exist"),
    (["--origin="], "signaling: --origin must not be empty"),
    (["--max-message-size=1000"], "signaling: --max-message-size must be at least 65536, got '1000'"),
])
def test_bad_options_in_one_line(args, expected):
    """Each bad option is answered with one line that names it (exit status 2)."""
    assert one_line_failure("-n", "--pidfile=", "signaling", *args).startswith(expected)


def test_missing_log_folder_in_one_line():
    """A --logfile (or --pidfile) in a folder that does not exist: one line, not a traceback."""
    line = one_line_failure("--logfile=/no/such/folder/signaling.log", "--pidfile=", "signaling")
    assert line == (
        "signaling: twistd --logfile=/no/such/folder/signaling.log: the folder /no/such/folder does not exist "
        "(create it first)"
    )
    line = one_line_failure("-n", "--pidfile=/no/such/run/signaling.pid", "signaling")
    assert "twistd --pidfile=/no/such/run/signaling.pid: the folder /no/such/run does not exist" in line


def test_options_from_the_environment():
    """SIGNALING_<OPTION> sets an option not given on the command line; the command line wins; errors say which."""
    server = ServerProcess("--rate=7", command="twistd")
    env = {"SIGNALING_MAX_MESSAGE_SIZE": "70000", "SIGNALING_RATE": "1", "SIGNALING_NO_RELAY_LOG": "yes",
           "SIGNALING_ORIGIN": "https://a.example, https://b.example"}
    server.env = env
    server.start()
    try:
        line = server.wait_for_line(r"settings:")
        assert "max_message_size=70000" in line and "rate=7.0" in line and "log_relays=False" in line
        assert "allowed_origins=('https://a.example', 'https://b.example')" in line
    finally:
        server.stop()
    line = one_line_failure("-n", "--pidfile=", "signaling", env={"SIGNALING_BURST": "lots"})
    assert line == "signaling: --burst must be a whole number, got 'lots' (from the environment: SIGNALING_BURST)"


def test_bad_option_is_a_usage_error():
    """An invalid option value is refused with a usage message."""
    proc = subprocess.run(
        [script("twistd"), "-n", "--pidfile=", "signaling", "--max-message-size=1000"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    assert proc.returncode != 0
    assert "--max-message-size must be at least 65536" in proc.stdout + proc.stderr


def test_plugin_found_in_installed_package():
    """getPlugins(IServiceMaker) finds the plugin, loaded from the installed package, not the source tree."""
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    from twisted import plugins

    makers = {m.tapname: m for m in getPlugins(IServiceMaker, plugins)}
    assert "signaling" in makers
    maker = makers["signaling"]
    assert maker.module == "signaling.tap"
    assert hasattr(maker.options(), "parseOptions")
    import twisted.plugins.signaling_plugin as plugin_module

    for path in (plugin_module.__file__, signaling.__file__):
        path = os.path.realpath(path)
        assert "site-packages" in path, path
        for source in ("signaling", "twisted"):
            assert not path.startswith(os.path.join(REPO, source) + os.sep), path


def test_twistd_help_lists_signaling():
    """``twistd --help`` lists the signaling plugin."""
    proc = subprocess.run([script("twistd"), "--help"], capture_output=True, text=True, timeout=60, cwd="/")
    assert proc.returncode == 0
    assert any(line.split()[:1] == ["signaling"] for line in proc.stdout.splitlines()), proc.stdout


def test_closed_connections_free_themselves():
    """
    Closed connections are freed by reference counting, not left to the
    cycle collector: after 300 WebSockets have been opened, paired, have
    relayed and closed, the next full collection of the whole heap (every
    --gc-full-interval seconds, logged) finds less than one object per
    connection to free.  (A closed connection caught in a reference cycle
    leaves some 20.)  Only WebSockets talk to the server meanwhile: each
    HTTP request leaves a cycle of Twisted's and Klein's to the collector.
    """
    server = ServerProcess("--gc-full-interval=0.5").start()
    try:
        # the first one also frees what the reactor's start left behind
        server.wait_for_line(r"full garbage collection: \d+ objects freed")

        async def churn():
            witness = await connect(server.ws)
            for _ in range(150):
                a, b = await pair_and_negotiate(server)
                await a.close()
                assert (await recv(b))["data"] == {"reason": "peer_left"}
                await b.close()
            # A closed socket's server side has run connectionLost by the time
            # its client sees the end of the stream; a round trip after that
            # is handled after all of them.
            assert await sync(witness) == []
            return len(server.lines)

        since = run(churn())
        line = server.wait_for_line(r"full garbage collection: \d+ objects freed", since=since)
        freed = int(line.split("full garbage collection: ")[1].split()[0])
        assert freed < 300, line
    finally:
        server.stop()


def test_help_reads_cleanly():
    """--help: no runs of spaces inside a text, each option's rule said once, limits that are true."""
    proc = subprocess.run([script("twistd"), "signaling", "--help"], capture_output=True, text=True,
                          timeout=60, cwd="/")
    assert proc.returncode == 0
    entries, current = {}, None
    for line in proc.stdout.splitlines():
        m = re.match(r"\s+(--[a-z0-9-]+)=?\s+(.*)", line)
        if m:
            current = m.group(1)
            entries[current] = m.group(2)
        elif current and line.startswith(" " * 20):
            entries[current] += " " + line.strip()
    assert len(entries) > 40
    for option, text in entries.items():
        assert "   " not in text, (option, text)
        assert text.count("0 disables it") <= 1 and text.count("Must be positive") <= 1, (option, text)
    assert "At least 65536" in entries["--max-message-size"]
    assert "Must be positive" not in entries["--max-message-size"]
    assert "at least 16 bytes" in entries["--stats-token-file"]
    assert "at least 16 bytes" in entries["--token-secret-file"]


def test_twist_json_lines_have_the_rendered_message():
    """With --json-lines, each line is one JSON object (no 0x1E) with log_text, the message as rendered."""
    server = ServerProcess("--json-lines", command="twist", json_logs=True).start()
    try:
        server.signal(signal.SIGTERM)
        server.wait()
        events = [json.loads(line) for line in server.lines if line.strip()]  # (a 0x1E would fail here)
        ready = [e for e in events if e.get("log_text", "").startswith("signaling ") and " ready" in e["log_text"]]
        assert ready and ready[0]["log_format"] == "signaling {version} ready"
        assert all("log_text" in e for e in events)
    finally:
        server.stop()


def test_sigusr1_rotates_the_log(tmp_path):
    """
    SIGUSR1 makes twistd rotate its log file itself: the log so far becomes
    signaling.log.1 and a new signaling.log starts (what docs/deployment.rst says).
    """
    from redis_server import free_port

    http, ws = free_port(), free_port()
    log = tmp_path / "signaling.log"
    proc = subprocess.Popen([
        script("twistd"), "-n", "--pidfile=", f"--logfile={log}", "signaling",
        f"--http=tcp:{http}:interface=127.0.0.1", f"--ws=tcp:{ws}:interface=127.0.0.1",
    ], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    follower = ServerProcess()  # (only its line reader: tail -F follows the log across the rotation)
    follower.proc = subprocess.Popen(["tail", "-F", "-n", "+1", str(log)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
    import threading

    follower._reader = threading.Thread(target=follower._read, daemon=True)
    follower._reader.start()
    try:
        follower.wait_for_line(r"signaling .* ready")
        proc.send_signal(signal.SIGUSR1)
        since = len(follower.lines)
        follower.wait_for_line(r"has been replaced|has appeared", since=since)  # tail: a new file
        urllib_get(f"http://127.0.0.1:{http}/api/health")
        follower.wait_for_line(r"/api/health", since=since)
        rotated = (tmp_path / "signaling.log.1").read_text()
        assert " ready" in rotated and "/api/health" not in rotated
        current = log.read_text()
        assert "/api/health" in current and " ready" not in current
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        follower.proc.kill()
        follower.proc.wait()
        follower.tmp.cleanup()


def urllib_get(url):
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status


def test_unix_socket_clients(tmp_path):
    """
    On a unix: endpoint every client is "unix" in the stats (not
    "UNIXAddress(None)"), and the per-address cap does not lump them all
    together: more clients than --max-connections-per-ip connect.
    """
    path = tmp_path / "ws.sock"
    server = ServerProcess("--max-connections-per-ip=2", ws=f"unix:{path}").start(unix_ws=True)
    try:
        async def go():
            import websockets

            peers = []
            for _ in range(4):
                ws = await websockets.unix_connect(str(path), "ws://localhost/")
                welcome = json.loads(await ws.recv())
                assert welcome["type"] == "welcome"
                peers.append((ws, welcome["id"]))
            users = server.users()
            assert {users[i]["ip"] for _, i in peers} == {"unix"}
            for ws, _ in peers:
                await ws.close()

        run(go())
    finally:
        server.stop()
