"""
Tier 3: /metrics and /api/dashboard of the installed server, read by
prometheus_client's parser while real clients connect, pair and relay.
"""

import json
import urllib.error
import urllib.request

import pytest
from live import ServerProcess, connect, pair, recv, run, send
from test_metrics import families, value

pytestmark = pytest.mark.live

def get(url, token=None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers, response.read().decode("utf-8")


def test_live_metrics_move_with_traffic(server):
    """/metrics parsed by prometheus_client: counters move as clients connect, pair and relay."""
    _, headers, before_text = get(server.http + "/metrics")
    assert headers["Content-Type"].startswith("text/plain; version=")  # (Prometheus text exposition)
    before = families(before_text)

    async def go():
        a = await connect(server.ws)
        b = await connect(server.ws_on_http)
        await pair(a, b)
        for n in range(4):
            await send(a, {"type": "offer", "to": b.peer_id, "data": {"n": n}})
            await recv(b)
        await send(a, {"type": "answer", "to": "nobody"})
        assert (await recv(a))["code"] == "peer-not-found"
        after = families(get(server.http + "/metrics")[2])
        assert value(after, "signaling_relays_total", type="offer") - value(
            before, "signaling_relays_total", type="offer") == 4
        assert value(after, "signaling_connects_total") - value(before, "signaling_connects_total") == 2
        assert value(after, "signaling_pairs") >= 1
        assert value(after, "signaling_errors_total", code="peer-not-found") >= 1
        assert value(after, "signaling_connections", protocol="native") >= 2
        text = get(server.http + "/metrics")[2]
        assert a.peer_id not in text and b.peer_id not in text and "127.0.0.1" not in text
        dashboard = json.loads(get(server.http + "/api/dashboard")[2])
        assert dashboard["users"]["connected"] >= 2 and dashboard["relays"]["offer"] >= 4
        await a.close()
        await b.close()

    run(go())


def test_metrics_behind_the_stats_token(tmp_path):
    token_file = tmp_path / "stats-token"
    token_file.write_text("a-stats-token-of-16+")
    server = ServerProcess(f"--stats-token-file={token_file}").start()
    try:
        for path in ("/metrics", "/api/dashboard"):
            with pytest.raises(urllib.error.HTTPError) as e:
                get(server.http + path)
            assert e.value.code == 401
            assert get(server.http + path, "a-stats-token-of-16+")[0] == 200
    finally:
        server.stop()
