"""
Tier 2 (redis): the y-webrtc topic scripts (signaling/lua/yjs_*.lua) against
a real redis-server, each call one EVAL of the script the nodes run.
"""

import pytest
from redis_server import RULES_PREFIX, redis_rules
from twisted.internet.task import Clock

pytestmark = pytest.mark.redis

P = RULES_PREFIX


@pytest.fixture
def rules(redis_server):
    rules = redis_rules(redis_server, Clock())
    rules.client.flushdb()
    yield rules
    rules.client.flushdb()


def counts(rules, topic):
    return {node: int(n) for node, n in rules.client.hgetall(P + "yjs:n:" + topic).items()}


def test_counts_are_increments_and_zero_frees(rules):
    """Changes add up per node and topic in any order; a count at zero is removed with its bookkeeping."""
    rules._execute("yjs_count", "n1", "r", "1", "s", "1")
    rules._execute("yjs_count", "n2", "r", "1")
    rules._execute("yjs_count", "n1", "r", "1")
    assert counts(rules, "r") == {"n1": 2, "n2": 1} and counts(rules, "s") == {"n1": 1}
    assert rules.client.smembers(P + "yjs:of:n1") == {"r", "s"}
    assert rules.client.smembers(P + "yjs:nodes") == {"n1", "n2"}
    rules._execute("yjs_count", "n1", "s", "-1", "r", "-1")
    rules._execute("yjs_count", "n2", "r", "-1")
    assert counts(rules, "s") == {} and counts(rules, "r") == {"n1": 1}
    assert rules.client.smembers(P + "yjs:of:n1") == {"r"} and rules.client.smembers(P + "yjs:of:n2") == set()


def test_publish_counts_every_node_and_publishes_only_for_others(rules):
    """The script answers the topic's subscribers on every node, and publishes only if another node has some."""
    listener = rules.client.pubsub()
    listener.subscribe(P + "yjs:t:r")
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    rules._execute("yjs_count", "n1", "r", "2")
    assert rules._execute("yjs_publish", "r", "n1", "2", '{"type":"publish","topic":"r","clients":') == 2
    assert listener.get_message(timeout=0.2) is None  # nobody elsewhere: nothing published
    rules._execute("yjs_count", "n2", "r", "3")
    # (the caller's own count comes from itself, not from Redis, which may lag)
    assert rules._execute("yjs_publish", "r", "n1", "1", '{"type":"publish","topic":"r","clients":') == 4
    message = listener.get_message(timeout=5)
    assert message["data"] == 'n1\n4\n{"type":"publish","topic":"r","clients":'
    listener.close()


def test_sync_writes_a_nodes_counts_whole(rules):
    """A sync replaces every count of that node (others untouched); an empty one forgets the node."""
    rules._execute("yjs_count", "n1", "a", "1", "b", "2")
    rules._execute("yjs_count", "n2", "a", "5")
    rules._execute("yjs_sync", "n1", "b", "1", "c", "3")
    assert counts(rules, "a") == {"n2": 5} and counts(rules, "b") == {"n1": 1} and counts(rules, "c") == {"n1": 3}
    assert rules.client.smembers(P + "yjs:of:n1") == {"b", "c"}
    rules._execute("yjs_sync", "n1")
    assert counts(rules, "b") == {} and rules.client.smembers(P + "yjs:nodes") == {"n2"}


def test_reap_forgets_silent_nodes_and_tells_a_node_its_counts_are_gone(rules):
    """Counts of nodes silent past the timeout (or untracked) are forgotten; the caller learns if its own went."""
    for node in ("alive", "silent", "untracked", "me"):
        rules._execute("yjs_count", node, "r", "1")
    rules._execute("heartbeat", "alive")
    rules._execute("heartbeat", "me")
    rules.client.zadd(P + "nodes", {"silent": 1})  # (its last heartbeat long ago)
    reply = rules._execute("yjs_reap", "60000", "me")
    assert reply[0] == 0 and sorted(reply[1:]) == ["silent", "untracked"]
    assert counts(rules, "r") == {"alive": 1, "me": 1}
    assert rules.client.smembers(P + "yjs:nodes") == {"alive", "me"}
    rules._execute("yjs_reap", "-1000", "alive")  # every other node past this timeout: "me" too
    assert rules._execute("yjs_reap", "60000", "me")[0] == 1  # "me" must write its counts again
