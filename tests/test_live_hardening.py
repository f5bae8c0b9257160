"""
Tier 3: the hardening features against the installed server over real
sockets: outbound caps, handshake timeouts, refusals at the handshake with
HTTP statuses, proxies, stats protection and TLS.
"""

import datetime
import ipaddress
import json
import socket
import ssl
import urllib.error
import urllib.request

import pytest
import websockets
from live import ServerProcess, closed_code, connect, paired, recv, run, send, sync

from signaling.tokens import make_token

pytestmark = pytest.mark.live

SECRET = b"live-test-secret-0123456789"


async def pair(url):
    a = await connect(url)
    b = await connect(url)
    await send(a, {"type": "ping", "to": b.peer_id})
    await recv(b)
    await send(b, {"type": "pong", "to": a.peer_id})
    await recv(a)
    return a, b


async def refused_status(url, **kwargs):
    with pytest.raises(websockets.exceptions.InvalidStatus) as e:
        await connect(url, **kwargs)
    return e.value.response.status_code


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A server with origins, tokens, proxies and small connection limits."""
    d = tmp_path_factory.mktemp("guarded")
    (d / "secret").write_bytes(SECRET)
    (d / "stats").write_bytes(b"stats-bearer-0123456789")
    proc = ServerProcess(
        "--origin=https://app.example", f"--token-secret-file={d / 'secret'}",
        "--trusted-proxy=127.0.0.1", "--max-connections=6", "--max-connections-per-ip=2",
        f"--stats-token-file={d / 'stats'}", "--stats-hide-ip",
    ).start()
    yield proc
    proc.stop()


def token(**kwargs):
    return make_token(SECRET, kwargs.pop("ttl", 60), **kwargs)


def test_refusals_at_the_handshake(guarded):
    """Wrong origin, no token, expired token, too many per address and too many in total get 403/401/429/503."""
    base = guarded.ws

    def url(tok):
        return f"{base}?token={tok}"

    def xff(addr):
        return {"X-Forwarded-For": addr}

    async def go():
        ok = dict(origin="https://app.example")
        a = await connect(url(token()), additional_headers=xff("203.0.113.1"), **ok)
        b = await connect(url(token()), additional_headers=xff("203.0.113.2"), **ok)
        await send(a, {"type": "ping", "to": b.peer_id})
        assert (await recv(b))["type"] == "ping"

        assert await refused_status(url(token()), origin="https://evil.example") == 403
        assert await refused_status(base, **ok) == 401
        assert await refused_status(url(token(ttl=-5)), **ok) == 401
        assert await refused_status(url(token() + "x"), **ok) == 401

        c = await connect(url(token()), additional_headers=xff("203.0.113.1"), **ok)
        assert await refused_status(url(token()), additional_headers=xff("203.0.113.1"), **ok) == 429
        more = [
            await connect(url(token()), additional_headers=xff(f"203.0.113.{n}"), **ok)
            for n in (3, 4, 5)
        ]
        assert await refused_status(url(token()), additional_headers=xff("203.0.113.6"), **ok) == 503

        # the well-behaved pair kept working through all of it
        await send(b, {"type": "pong", "to": a.peer_id})
        assert (await recv(a))["type"] == "pong"
        for ws in (a, b, c, *more):
            await ws.close()

    run(go())


def test_fixed_peer_id_and_conflict(guarded):
    """
    A token's peer id is the welcome id; a newer connection with it takes
    the id over at once (the older one, here silent as if its network died,
    is closed with 4409), and the id works for the newer one.
    """

    async def go():
        url = f"{guarded.ws}?token={token(peer_id='carol')}"
        carol = await connect(url, origin="https://app.example")
        assert carol.peer_id == "carol"
        other = await connect(f"{guarded.ws}?token={token()}", origin="https://app.example",
                              additional_headers={"X-Forwarded-For": "203.0.113.50"})  # (2 per address)
        again = await connect(url, origin="https://app.example")
        assert again.peer_id == "carol"
        assert await closed_code(carol) == 4409
        await send(other, {"type": "ping", "to": "carol"})
        assert await recv(again) == {"type": "ping", "from": other.peer_id, "data": {}}
        await again.close()
        await other.close()

    run(go())


def test_forwarded_for_only_from_trusted_proxy(guarded):
    """X-Forwarded-For sets the address only from a trusted proxy; another peer cannot set it."""

    async def go():
        headers = {"X-Forwarded-For": "198.51.100.7", "Authorization": "Bearer " + token()}
        trusted = await connect(guarded.ws, additional_headers=headers, origin="https://app.example")
        spoofer = await connect(
            guarded.ws, additional_headers=headers, origin="https://app.example",
            local_addr=("127.0.0.2", 0),
        )
        stats = json.loads(stats_get(guarded, "stats-bearer-0123456789"))
        assert {u["id"] for u in stats["users"]} >= {trusted.peer_id, spoofer.peer_id}
        assert all(u["ip"] is None for u in stats["users"])  # --stats-hide-ip
        await trusted.close()
        await spoofer.close()

    run(go())
    # the addresses themselves are in the log
    guarded.wait_for_line(r"connected from 198\.51\.100\.7")
    guarded.wait_for_line(r"connected from 127\.0\.0\.2")


def stats_get(server, bearer=None):
    request = urllib.request.Request(server.http + "/api/stats")
    if bearer:
        request.add_header("Authorization", "Bearer " + bearer)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def test_stats_token(guarded):
    """/api/stats needs the bearer token when one is configured."""
    with pytest.raises(urllib.error.HTTPError) as e:
        stats_get(guarded)
    assert e.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as e:
        stats_get(guarded, "wrong")
    assert e.value.code == 401
    assert "connectedUsers" in json.loads(stats_get(guarded, "stats-bearer-0123456789"))


@pytest.fixture(scope="module")
def small_buffers():
    proc = ServerProcess(
        "--max-outbound-buffer=65536", "--rate=0", "--handshake-timeout=1", "--resume-grace=1"
    ).start()
    yield proc
    proc.stop()


def test_non_reading_peer_is_dropped(small_buffers):
    """
    A peer that never reads is dropped once its unsent bytes pass the cap
    (into its grace period: a stalled network may come back); its partner
    gets peer_left when the period (1 s here) is over.
    """

    async def go():
        a, b = await paired(small_buffers.ws)
        reader = await connect(small_buffers.ws)  # an unrelated, healthy peer
        b.transport.pause_reading()
        sdp = "a=" + "x" * (128 * 1024)
        gone = b.peer_id
        got = []
        for _ in range(400):  # at most ~50 MB: far past any kernel buffer
            await send(a, {"type": "offer", "to": gone, "data": {"sdp": sdp}})
            got = await sync(a)
            if got:
                break
        assert got, "the non-reading peer was never dropped"
        # the message that overflowed was not delivered, and the sender is told so
        assert got[0] == {"type": "error", "code": "peer-not-found", "ref": "offer",
                          "message": "that peer is going away; the message was not delivered"}
        small_buffers.wait_for_line(rf"peer {gone} \(127\.0\.0\.1\) dropped: not reading")
        small_buffers.wait_for_line(rf"peer {gone} \(127\.0\.0\.1\) lost its connection .*: in grace for 1.0s")
        if len(got) == 1:
            got.append(await recv(a))
        assert got[1:] == [{"type": "disconnect", "from": gone, "data": {"reason": "peer_left"}}]
        assert gone not in small_buffers.users()
        assert await sync(reader) == []
        b.transport.abort()
        await a.close()
        await reader.close()

    run(go())


def test_silent_tcp_connection_times_out(small_buffers):
    """
    A TCP connection that never completes the WebSocket handshake is closed
    after --handshake-timeout (1 s here): not at once, and well before the
    default of 10 s, which is what it would take if the option were ignored.
    """
    import time

    with socket.create_connection(("127.0.0.1", small_buffers.ports["ws"]), timeout=6) as s:
        started = time.monotonic()
        try:
            assert s.recv(1024) == b""  # the server closed it...
        except ConnectionResetError:
            pass  # ...or dropped it
        except socket.timeout:
            raise AssertionError("still open after 6 s: --handshake-timeout=1 was not applied") from None
        assert time.monotonic() - started >= 0.9


def make_certificate(directory):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def test_tls_endpoints(tmp_path):
    """With ssl: endpoints, peers connect over wss:// on both ports and the stats come over https://."""
    key, cert = make_certificate(tmp_path)
    tls = f"privateKey={key}:certKey={cert}"
    server = ServerProcess(
        http=f"ssl:0:interface=127.0.0.1:{tls}", ws=f"ssl:0:interface=127.0.0.1:{tls}"
    ).start()
    try:
        context = ssl.create_default_context(cafile=str(cert))

        async def go():
            a = await connect(f"wss://127.0.0.1:{server.ports['ws']}/", ssl=context)
            b = await connect(f"wss://127.0.0.1:{server.ports['http']}/ws", ssl=context)
            await send(a, {"type": "ping", "to": b.peer_id})
            assert await recv(b) == {"type": "ping", "from": a.peer_id, "data": {}}
            with urllib.request.urlopen(
                f"https://127.0.0.1:{server.ports['http']}/api/stats", context=context, timeout=10
            ) as response:
                assert json.loads(response.read())["connectedUsers"] == 2
            await a.close()
            await b.close()
            # a client that does not trust the certificate is refused by TLS
            with pytest.raises(ssl.SSLCertVerificationError):
                await connect(f"wss://127.0.0.1:{server.ports['ws']}/", ssl=ssl.create_default_context())

        run(go())
    finally:
        server.stop()
