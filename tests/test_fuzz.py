"""
Tier 3: a short fuzz run against the installed server (the long one is
bench/fuzz.py): random and mutated messages, and garbage at the frame level.
The server must answer every bad input as documented, never crash, keep
serving well-behaved peers, and afterwards hold only the live peers.
"""


import pytest
from fuzzing import FRAME_CASES, frame_fuzz, json_fuzz
from live import ServerProcess, paired, recv, run, send, sync

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def fuzz_server():
    proc = ServerProcess("--rate=0", "--max-message-size=65536").start()
    yield proc
    proc.stop()


async def still_relaying(a, b):
    await send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "v=0"}})
    assert await recv(b) == {"type": "offer", "from": a.peer_id, "data": {"sdp": "v=0"}}
    assert await sync(a) == [] and await sync(b) == []


def test_json_fuzz_short(fuzz_server):
    """5,000 random and mutated JSON messages get only documented answers; a healthy pair keeps relaying."""

    async def go():
        a, b = await paired(fuzz_server.ws)
        counts = await json_fuzz(fuzz_server.ws, messages=5000, connections=10, seed=1)
        assert counts["sent"] == 5000
        assert counts["errors"] > 1000 and counts["relayed"] > 100, counts
        await still_relaying(a, b)
        users = fuzz_server.users()
        assert set(users) == {a.peer_id, b.peer_id}
        assert users[a.peer_id]["state"] == "connected"
        await a.close()
        await b.close()

    run(go(), timeout=300)


def test_frame_fuzz_short(fuzz_server):
    """Bad opcodes and bits, bad UTF-8, truncated or huge frames, half-open TCP and garbage get documented answers."""

    async def go():
        a, b = await paired(fuzz_server.ws)
        results = await frame_fuzz("127.0.0.1", fuzz_server.ports["ws"], rounds=2, garbage=40, seed=2)
        assert set(results) == {name for name, _, _ in FRAME_CASES}
        await still_relaying(a, b)
        users = fuzz_server.users()
        assert {i for i, u in users.items() if u["online"]} == {a.peer_id, b.peer_id}
        # the fuzzers that vanished without a close frame (aborted TCP) wait in
        # their grace period, idle, for a resume that will not come
        assert all(u["state"] == "idle" for i, u in users.items() if not u["online"])
        await a.close()
        await b.close()

    run(go(), timeout=300)
    assert not any(u["online"] for u in fuzz_server.stats()["users"])
    assert "Traceback" not in fuzz_server.output()
    assert "Unhandled" not in fuzz_server.output()
