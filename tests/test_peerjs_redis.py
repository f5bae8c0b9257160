"""
Tier 2 (redis): the scripts that let a PeerJS client come back to any node
of a cluster with its token (signaling/lua/peerjs_*.lua), on a real
redis-server through the Redis registry's rules.
"""

import pytest
from redis_server import RULES_PREFIX, redis_rules
from twisted.internet.task import Clock

pytestmark = pytest.mark.redis

MINE, OTHER = "aa" * 32, "bb" * 32


@pytest.fixture
def rules(redis_server):
    clock = Clock()
    clock.advance(1_757_422_800)
    r = redis_rules(redis_server, clock)
    r.client.flushdb()
    yield r
    r.client.close()


def check(rules, digest=MINE):
    return rules._execute("peerjs_check", "peerjs/a", digest)


def test_the_same_token_matches_only_while_its_connection_holds_the_id(rules):
    """A token matches while the connection it was recorded with holds the id, online or in grace; not after."""
    assert check(rules) == 0  # nobody has it
    rules.add("peerjs/a", "127.0.0.1", "n1.1")
    assert check(rules) == 0  # held, but no token recorded
    rules._execute("peerjs_claim", "peerjs/a", MINE, "n1.1", "86400")
    assert (check(rules), check(rules, OTHER)) == (1, 0)
    assert 86000 < rules.client.ttl(RULES_PREFIX + "peerjs:peerjs/a") <= 86400
    assert rules.suspend("peerjs/a", "n1.1", "127.0.0.1") > 0
    assert check(rules) == 1  # in its grace period
    rules.remove("peerjs/a")
    assert check(rules) == 0  # gone
    rules.add("peerjs/a", "127.0.0.1", "n2.7")  # another client took the id: the old record cannot match
    assert check(rules) == 0


def test_a_resume_elsewhere_needs_a_new_record(rules):
    """After the session moved to another connection, only a record for that connection matches."""
    rules.add("peerjs/a", "127.0.0.1", "n1.1")
    rules._execute("peerjs_claim", "peerjs/a", MINE, "n1.1", "86400")
    rules.resume("peerjs/a", "127.0.0.1", 0.0, "n2.3")
    assert check(rules) == 0
    rules._execute("peerjs_claim", "peerjs/a", MINE, "n2.3", "86400")
    assert check(rules) == 1


def test_release_ends_or_shortens_only_its_own_record(rules):
    """A connection's close deletes its record (or keeps it for the grace period); a newer record is left alone."""
    key = RULES_PREFIX + "peerjs:peerjs/a"
    rules._execute("peerjs_claim", "peerjs/a", MINE, "n1.1", "86400")
    assert rules._execute("peerjs_release", "peerjs/a", f"{MINE}:n1.1", "25") == 1
    assert 0 < rules.client.ttl(key) <= 25
    rules._execute("peerjs_claim", "peerjs/a", MINE, "n2.3", "86400")
    assert rules._execute("peerjs_release", "peerjs/a", f"{MINE}:n1.1", "0") == 0  # (not its record any more)
    assert rules.client.get(key) == f"{MINE}:n2.3"
    assert rules._execute("peerjs_release", "peerjs/a", f"{MINE}:n2.3", "0") == 1
    assert rules.client.get(key) is None
