"""
Tier 3: /api/stats of the installed server over real loopback sockets, with
a document of 2,000 users (about 300 KB, more than a connection may leave
unsent between two requests): kept-alive connections, gzip, ETags and 304,
pages, the summary form, and the pacing per address.
"""

import asyncio
import gzip
import http.client
import json
import time

import pytest
from live import ServerProcess, connect, run

pytestmark = pytest.mark.live

USERS = 2000


@pytest.fixture(scope="module")
def crowd():
    """The installed server with USERS idle users, held open by a thread's event loop, for the module."""
    import threading

    server = ServerProcess("--max-connections-per-ip=5000", "--stats-burst=1000").start()
    loop = asyncio.new_event_loop()
    opened = []

    async def open_all():
        limit = asyncio.Semaphore(100)

        async def one():
            async with limit:
                opened.append(await connect(server.ws))

        await asyncio.gather(*(one() for _ in range(USERS)))

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(asyncio.wait_for(open_all(), 120), loop).result(150)
        server.peer_ids = {ws.peer_id for ws in opened}
        yield server
    finally:
        async def close_all():
            await asyncio.gather(*(ws.close() for ws in opened), return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close_all(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        server.stop()


def request(conn, path, method="GET", **headers):
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def test_large_document_keepalive_gzip_and_etag(crowd):
    """One kept-alive connection: the whole document, its gzip form, then 304s for both tags."""
    conn = http.client.HTTPConnection("127.0.0.1", crowd.ports["http"], timeout=30)
    try:
        status, headers, body = request(conn, "/api/stats")
        assert status == 200 and int(headers["content-length"]) == len(body) > 256 * 1024
        doc = json.loads(body)
        assert doc["connectedUsers"] == USERS and {u["id"] for u in doc["users"]} == crowd.peer_ids
        assert [u["connectedAt"] for u in doc["users"]] == sorted(u["connectedAt"] for u in doc["users"])
        etag = headers["etag"]
        assert headers["vary"] == "Origin, Accept-Encoding" and "content-encoding" not in headers

        status, gz_headers, compressed = request(conn, "/api/stats", **{"Accept-Encoding": "gzip"})
        assert status == 200 and gz_headers["content-encoding"] == "gzip"
        assert int(gz_headers["content-length"]) == len(compressed) < len(body) / 3
        assert gzip.decompress(compressed) == body
        gz_etag = gz_headers["etag"]
        assert gz_etag != etag

        for tag, encoding in ((etag, "identity"), (gz_etag, "gzip"), (f'"nope", W/{etag}', "gzip")):
            status, headers, nothing = request(conn, "/api/stats",
                                               **{"If-None-Match": tag, "Accept-Encoding": encoding})
            assert (status, nothing) == (304, b""), tag
        status, head_headers, nothing = request(conn, "/api/stats", method="HEAD")
        assert status == 200 and nothing == b"" and int(head_headers["content-length"]) == len(body)
    finally:
        conn.close()


def test_pages_and_summary(crowd):
    """Pages of 500 (following next) list every user once in id order; the summary counts them."""
    conn = http.client.HTTPConnection("127.0.0.1", crowd.ports["http"], timeout=30)
    try:
        ids, after, count = [], "", 0
        while True:
            status, headers, body = request(conn, f"/api/stats?limit=500&after={after}",
                                            **{"Accept-Encoding": "gzip"})
            assert status == 200
            page = json.loads(gzip.decompress(body) if headers.get("content-encoding") == "gzip" else body)
            assert page["connectedUsers"] == USERS and len(page["users"]) <= 500
            ids += [u["id"] for u in page["users"]]
            count += 1
            if page["next"] is None:
                break
            after = page["next"]
        assert ids == sorted(crowd.peer_ids) and count == 4  # 500, 500, 500, 500 (the last: next null)
        status, _, body = request(conn, "/api/stats?summary")
        assert status == 200 and json.loads(body) == {
            "connectedUsers": USERS, "idle": USERS, "connecting": 0, "connected": 0, "pairs": 0, "offline": 0}
        status, _, body = request(conn, "/api/stats?limit=0")
        assert status == 400 and "limit" in json.loads(body)["error"]
    finally:
        conn.close()


def test_a_change_shows_in_the_next_answer(crowd):
    """Read after write: a peer that connects is in the very next answer (and the ETag moves)."""
    conn = http.client.HTTPConnection("127.0.0.1", crowd.ports["http"], timeout=30)
    try:
        _, headers, _ = request(conn, "/api/stats?summary")

        async def go():
            ws = await connect(crowd.ws)
            status, after, body = request(conn, "/api/stats?summary", **{"If-None-Match": headers["etag"]})
            await ws.close()
            return status, after, json.loads(body)

        status, after, doc = run(go())
        assert status == 200 and after["etag"] != headers["etag"] and doc["connectedUsers"] == USERS + 1
    finally:
        conn.close()


def test_pacing_per_address():
    """With --stats-rate=4 --stats-burst=2, eight quick requests from one address take about 1.5 s, all answered."""
    server = ServerProcess("--stats-rate=4", "--stats-burst=2").start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=30)
        started = time.monotonic()
        statuses = [request(conn, "/api/stats?summary")[0] for _ in range(8)]
        took = time.monotonic() - started
        conn.close()
        assert statuses == [200] * 8
        assert 1.4 <= took < 10  # 6 paced at 0.25 s each (the server's clock; the upper bound only for a slow host)
    finally:
        server.stop()
