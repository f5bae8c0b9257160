"""
Tier 3: the server as operators run it: ``twistd -n signaling`` stopped with
SIGTERM/SIGINT, ``twist --log-format=json signaling``, and the plugin as found
in the installed (non-editable) package.
"""

import asyncio
import json
import os
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


def test_bad_endpoint_fails_startup():
    """An endpoint that cannot be listened on makes twistd exit with an error, not run half-started."""
    blocker = ServerProcess().start()
    try:
        taken = blocker.ports["http"]
        proc = subprocess.run(
            [script("twistd"), "-n", "--pidfile=", "signaling",
             f"--http=tcp:{taken}:interface=127.0.0.1", "--ws=tcp:0:interface=127.0.0.1"],
            cwd=blocker.tmp.name, capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode != 0
        assert "Address already in use" in proc.stdout + proc.stderr
    finally:
        blocker.stop()


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
