"""
Tier 4: TURN through a real coturn relay on loopback.  The installed server
hands out credentials (in the welcome and at /api/ice-servers) that coturn
accepts: turnutils_uclient allocates with them, two aioice agents limited to
relay candidates exchange data through coturn, and two Chromium test pages
with "relay only" on call each other over a relayed pair.  Credentials with
another secret, or expired, are refused by coturn.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import time
import urllib.request

import pytest
from coturn import Coturn, need_coturn
from live import ServerProcess, connect, run

pytestmark = pytest.mark.live

SECRET = "coturn-shared-secret-for-tests"


def password(secret: str, username: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()


@pytest.fixture(scope="module")
def relay():
    need_coturn()
    coturn = Coturn(SECRET).start()
    yield coturn
    coturn.stop()


@pytest.fixture(scope="module")
def turn_server(relay, tmp_path_factory):
    """The installed server, handing out credentials for the relay (and it as a STUN server too)."""
    folder = tmp_path_factory.mktemp("turn")
    secret = folder / "turn-secret"
    secret.write_text(SECRET + "\n")
    secret.chmod(0o600)
    proc = ServerProcess(
        f"--turn={relay.uri}", f"--turn-secret-file={secret}", f"--stun=stun:127.0.0.1:{relay.port}",
        "--turn-ttl=600",
    ).start()
    yield proc
    proc.stop()


def ice_servers(server):
    with urllib.request.urlopen(server.http + "/api/ice-servers", timeout=10) as response:
        assert response.headers["Cache-Control"] == "no-store"
        return json.loads(response.read())


def turn_entry(servers):
    [entry] = [s for s in servers if "username" in s]
    return entry


def test_credentials_from_welcome_and_endpoint_work_with_coturn(relay, turn_server):
    """
    A raw WebSocket client reads the welcome's ICE servers and recomputes the
    HMAC; turnutils_uclient allocates a relay with them, and with the
    endpoint's; the secret appears nowhere in the server's log.
    """

    async def welcome():
        ws = await connect(turn_server.ws)
        await ws.close()
        return ws.peer_id, ws.welcome["iceServers"]

    peer_id, servers = run(welcome())
    assert servers[0] == {"urls": [f"stun:127.0.0.1:{relay.port}"]}
    entry = turn_entry(servers)
    assert entry["urls"] == [relay.uri]
    expiry, _, user = entry["username"].partition(":")
    assert user == peer_id and 590 <= int(expiry) - time.time() <= 610
    assert entry["credential"] == password(SECRET, entry["username"])
    status, output = relay.uclient(entry["username"], entry["credential"])
    assert status == 0, output

    doc = ice_servers(turn_server)
    assert doc["ttl"] == 600
    entry = turn_entry(doc["iceServers"])
    assert entry["credential"] == password(SECRET, entry["username"])
    status, output = relay.uclient(entry["username"], entry["credential"])
    assert status == 0, output
    assert SECRET not in turn_server.output()


def test_coturn_refuses_wrong_and_expired_credentials(relay):
    """Credentials signed with another secret, and credentials past their expiry, get no allocation."""
    fresh = f"{int(time.time()) + 600}:someone"
    status, output = relay.uclient(fresh, password("another-secret", fresh))
    assert status != 0 and "Cannot complete Allocation" in output
    expired = f"{int(time.time()) - 5}:someone"  # minted with an expiry in the past
    status, output = relay.uclient(expired, password(SECRET, expired))
    assert status != 0 and "Cannot complete Allocation" in output
    good = f"{int(time.time()) + 600}:someone"
    assert relay.uclient(good, password(SECRET, good))[0] == 0  # (the relay itself is fine)


async def relay_agent(relay, entry, controlling):
    """An aioice agent limited to relay candidates, with the given credentials."""
    from aioice import Connection, TransportPolicy

    agent = Connection(
        ice_controlling=controlling, turn_server=("127.0.0.1", relay.port), turn_username=entry["username"],
        turn_password=entry["credential"], turn_transport="udp", transport_policy=TransportPolicy.RELAY,
    )
    try:
        await asyncio.wait_for(agent.gather_candidates(), 20)
    except Exception:  # refused by the relay: no candidate
        pass
    return agent


@pytest.fixture
def loopback_ice(monkeypatch):
    """aioice skips 127.0.0.1; the relay is on it (RECIPES)."""
    import aioice.ice

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4=True, use_ipv6=False: ["127.0.0.1"])


def test_two_relay_only_agents_exchange_data_through_coturn(relay, turn_server, loopback_ice):
    """Two aioice agents with credentials from /api/ice-servers, relay candidates only, talk through coturn."""

    async def go():
        a = await relay_agent(relay, turn_entry(ice_servers(turn_server)["iceServers"]), True)
        b = await relay_agent(relay, turn_entry(ice_servers(turn_server)["iceServers"]), False)
        try:
            for agent in (a, b):
                assert [c.type for c in agent.local_candidates] == ["relay"]
                assert agent.local_candidates[0].host == "127.0.0.1"
            for x, y in ((a, b), (b, a)):
                for candidate in y.local_candidates:
                    await x.add_remote_candidate(candidate)
                await x.add_remote_candidate(None)
                x.remote_username, x.remote_password = y.local_username, y.local_password
            await asyncio.wait_for(asyncio.gather(a.connect(), b.connect()), 30)
            await a.send(b"through the relay")
            assert await asyncio.wait_for(b.recv(), 10) == b"through the relay"
            await b.send(b"and back")
            assert await asyncio.wait_for(a.recv(), 10) == b"and back"
        finally:
            await a.close()
            await b.close()

    run(go())


def test_agent_with_bad_credentials_gets_no_relay(relay, loopback_ice):
    """An agent whose credentials are signed with another secret, or expired, gathers no relay candidate."""

    async def go():
        for username, secret in ((f"{int(time.time()) + 600}:x", "another-secret"),
                                 (f"{int(time.time()) - 5}:x", SECRET)):
            agent = await relay_agent(relay, {"username": username, "credential": password(secret, username)}, True)
            try:
                assert [c for c in agent.local_candidates if c.type == "relay"] == []
            finally:
                await agent.close()

    run(go())


@pytest.mark.browser
def test_relay_only_pages_call_through_coturn(turn_server):
    """
    Two Chromium test pages with "relay only" on call each other by
    clicking: the data channel opens over a pair whose local side is a
    relay candidate, and chat flows through coturn.  The caller's TURN
    credentials had expired by then (made so): the client fetched fresh
    ones from /api/ice-servers for the call.
    """
    from test_webrtc import Browser, chat, wait_chat, wait_text

    async def go():
        async with Browser() as b:
            a = await b.page(turn_server.http + "/test.html")
            callee = await b.page(turn_server.http + "/test.html")
            for page in (a, callee):
                await page.check("#relayOnly")
            await a.evaluate("""() => {
                const c = window.signalingClient;
                c.serverIceServers = c.serverIceServers.map(
                    (s) => s.username ? {...s, username: "1:expired", credential: "nothing"} : s);
            }""")
            await a.fill("#peer", callee.peer_id)
            await a.click("#call")
            for page in (a, callee):
                await wait_text(page, "#channelState", "open")
                await page.wait_for_function(
                    "() => document.getElementById('pairState').textContent.startsWith('local relay/udp')",
                    timeout=30000,
                )
            assert "remote relay/udp" in await a.text_content("#pairState")
            assert "fresh TURN credentials fetched" in await a.text_content("#log")
            await chat(a, "relayed hello")
            await wait_chat(callee, "peer: relayed hello")
            assert b.errors == []

    run(go(), timeout=180)
