"""Tier 1: y-webrtc's topic rules (signaling.topics), pure."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signaling.topics import (
    INVALID,
    MAX_TOPIC_LENGTH,
    NOT_ALLOWED,
    TOO_MANY_HERE,
    TOO_MANY_TOPICS,
    TopicAccess,
    Topics,
    valid_topic,
)

pytestmark = pytest.mark.pure


def test_topic_names_are_bounded_printable_strings():
    """A topic is a str of 1 to 256 printable characters; nothing else is."""
    for name in ("r", "room 1", "ünï 漢字", "x" * MAX_TOPIC_LENGTH, "a/b:c"):
        assert valid_topic(name), name
    for name in ("", "x" * (MAX_TOPIC_LENGTH + 1), "a\nb", "\x00", "tab\t", "\ud800", None, 1, ["r"], b"r",
                 "\u2028"):
        assert not valid_topic(name), repr(name)


def test_subscribe_publish_targets_and_counts():
    """Subscribers are kept per topic in arrival order; counts and summary follow."""
    t = Topics()
    assert t.subscribe("a", ["r", "s"]).opened == ["r", "s"]
    change = t.subscribe("b", ["r", "r"])  # (a repeated name counts once)
    assert (change.topics, change.opened, change.refused) == (["r"], [], [])
    assert list(t.subscribers("r")) == ["a", "b"] and list(t.subscribers("s")) == ["a"]
    assert list(t.subscribers("none")) == [] and t.count("none") == 0
    assert (t.count("r"), t.count("s")) == (2, 1)
    assert t.summary() == {"topics": 2, "subscriptions": 3}
    assert t.subscribe("a", ["r"]).topics == []  # already in it
    assert t.summary() == {"topics": 2, "subscriptions": 3}


def test_unsubscribe_and_leave_free_empty_topics():
    """The last subscriber to go frees its topic, and says so (closed); names it is not in are ignored."""
    t = Topics()
    t.subscribe("a", ["r", "s"])
    t.subscribe("b", ["r"])
    change = t.unsubscribe("a", ["r", "s", "other", 5, None])
    assert (sorted(change.topics), change.closed) == (["r", "s"], ["s"])
    assert "s" not in t and "r" in t and t.topics_of("a") == set()
    assert t.unsubscribe("a", ["r"]).topics == []
    change = t.leave("b")
    assert (change.topics, change.closed) == (["r"], ["r"])
    assert len(t) == 0 and t.summary() == {"topics": 0, "subscriptions": 0}
    assert t._of == {} and t._subscribers == {}  # nothing left behind
    assert t.leave("b").topics == []


def test_invalid_names_are_refused_and_the_rest_applied():
    """A subscribe with bad names refuses those (invalid-topic) and applies the others."""
    t = Topics()
    change = t.subscribe("a", ["ok", "", 7, "x" * 300, "ok2"])
    assert change.topics == ["ok", "ok2"]
    assert [reason for _, reason in change.refused] == [INVALID] * 3


def test_per_subscriber_and_server_caps():
    """A subscriber has at most max_per_subscriber topics; the server at most max_topics; leaving frees room."""
    t = Topics(max_per_subscriber=2, max_topics=3)
    change = t.subscribe("a", ["1", "2", "3"])
    assert change.topics == ["1", "2"] and change.refused == [("3", TOO_MANY_HERE)]
    assert t.subscribe("b", ["3"]).topics == ["3"]
    change = t.subscribe("c", ["1", "4"])  # joining an existing topic is fine; a fourth topic is not
    assert change.topics == ["1"] and change.refused == [("4", TOO_MANY_TOPICS)]
    t.leave("b")
    assert t.subscribe("c", ["4"]).opened == ["4"]


def test_token_access_by_list_and_prefix():
    """A token's topics and prefix restrict what its holder joins; one naming neither restricts nothing."""
    assert TopicAccess.from_claims(None) is None
    assert TopicAccess.from_claims({"exp": 1, "sub": "x"}) is None
    listed = TopicAccess.from_claims({"topics": ["r1", "r2"]})
    prefixed = TopicAccess.from_claims({"topic_prefix": "team-7/"})
    both = TopicAccess.from_claims({"topics": ["lobby"], "topic_prefix": "team-7/"})
    assert listed.allows("r1") and not listed.allows("r3") and not listed.allows("r1x")
    assert prefixed.allows("team-7/doc") and not prefixed.allows("team-8/doc") and not prefixed.allows("team-7")
    assert both.allows("lobby") and both.allows("team-7/x") and not both.allows("other")
    assert TopicAccess.from_claims({"topics": []}).allows("r") is False  # an empty list allows nothing
    t = Topics()
    change = t.subscribe("a", ["r1", "r3"], listed)
    assert change.topics == ["r1"] and change.refused == [("r3", NOT_ALLOWED)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["sub", "unsub", "leave"]), st.sampled_from("abcd"),
                          st.lists(st.sampled_from(["r", "s", "t", "u", ""]), max_size=4)), max_size=40))
def test_state_stays_consistent(ops):
    """Whatever the sequence of operations: both indexes agree, no empty topic is kept, caps hold."""
    t = Topics(max_per_subscriber=3, max_topics=3)
    for op, who, names in ops:
        if op == "sub":
            t.subscribe(who, names)
        elif op == "unsub":
            t.unsubscribe(who, names)
        else:
            t.leave(who)
        pairs = {(s, name) for name, subs in t._subscribers.items() for s in subs}
        assert pairs == {(s, name) for s, names_ in t._of.items() for name in names_}
        assert all(t._subscribers.values()) and all(t._of.values())
        assert t.subscriptions == len(pairs) and len(t) <= 3
        assert all(len(names_) <= 3 for names_ in t._of.values())
