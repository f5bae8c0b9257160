"""
y-webrtc's topics (its rooms), with no network code: who is subscribed to
what, within bounds.

A topic is a y-webrtc room name: 1 to :data:`MAX_TOPIC_LENGTH` printable
characters (no control characters, no lone surrogates).  A subscriber is
any hashable object (the server's connection; anything in tests).

=======================  =============================================  ==========================
operation                allowed when                                   effect
=======================  =============================================  ==========================
``subscribe(c, names)``  each name valid, allowed by ``c``'s access,    ``c`` in each topic;
                         ``c`` under ``max_per_subscriber`` topics,      a topic is made by its
                         and a new topic under ``max_topics``            first subscriber
``unsubscribe(c, ...)``  always (names ``c`` is not in are ignored)     ``c`` out; a topic with no
                                                                        subscriber left is freed
``leave(c)``             always (its socket went)                       ``c`` out of every topic
=======================  =============================================  ==========================

Each change says which topics it opened (first subscriber here) and closed
(last one gone), so that a cluster backend subscribes to a topic's channel
only while this process has subscribers.  A subscribe that refuses some
names still applies the others; what it refused comes back with why.

:class:`TopicAccess` is what an access token allows (a list of topics
and/or a prefix); no restriction when the token names neither.
"""

from typing import Dict, Hashable, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple

__all__ = [
    "MAX_TOPIC_LENGTH", "INVALID", "NOT_ALLOWED", "TOO_MANY_HERE", "TOO_MANY_TOPICS", "REASONS",
    "valid_topic", "TopicAccess", "Change", "Topics",
]

#: the longest topic name, in characters
MAX_TOPIC_LENGTH = 256

#: why a topic was refused (the error code a client is sent)
INVALID = "invalid-topic"
NOT_ALLOWED = "topic-not-allowed"
TOO_MANY_HERE = "too-many-topics"  # the subscriber's own cap
TOO_MANY_TOPICS = "server-topics-full"  # the server's cap on topics

#: what each refusal says
REASONS = {
    INVALID: "a topic is a string of 1 to %d printable characters" % MAX_TOPIC_LENGTH,
    NOT_ALLOWED: "your access token does not allow this topic",
    TOO_MANY_HERE: "you are subscribed to as many topics as one connection may be",
    TOO_MANY_TOPICS: "the server has as many topics as it allows; try again later",
}


def valid_topic(name) -> bool:
    """Whether ``name`` may be a topic: a str of 1 to MAX_TOPIC_LENGTH printable characters."""
    return type(name) is str and 0 < len(name) <= MAX_TOPIC_LENGTH and name.isprintable()


class TopicAccess:
    """
    The topics an access token allows: those in ``topics``, and those
    starting with ``prefix``; every topic if it names neither.
    """

    __slots__ = ("topics", "prefix")

    def __init__(self, topics: Optional[Iterable[str]] = None, prefix: Optional[str] = None):
        self.topics = frozenset(topics) if topics is not None else None
        self.prefix = prefix

    @classmethod
    def from_claims(cls, claims: Optional[dict]) -> Optional["TopicAccess"]:
        """What verified claims allow (``topics``, ``topic_prefix``); None: no restriction."""
        if not claims:
            return None
        topics, prefix = claims.get("topics"), claims.get("topic_prefix")
        if topics is None and prefix is None:
            return None
        return cls(topics, prefix)

    @property
    def unrestricted(self) -> bool:
        return self.topics is None and self.prefix is None

    def allows(self, name: str) -> bool:
        if self.unrestricted:
            return True
        return (self.topics is not None and name in self.topics) or (
            self.prefix is not None and name.startswith(self.prefix)
        )

    def __repr__(self) -> str:
        return f"<TopicAccess topics={sorted(self.topics) if self.topics is not None else None} prefix={self.prefix!r}>"


class Change(NamedTuple):
    """What one operation did."""

    #: topics the subscriber joined (subscribe) or left (unsubscribe, leave)
    topics: List[str]
    #: topics that got their first subscriber here (a cluster subscribes to them)
    opened: List[str]
    #: topics whose last subscriber here left (freed; a cluster unsubscribes)
    closed: List[str]
    #: (name, reason) of what a subscribe refused; reason is a key of REASONS
    refused: List[Tuple[object, str]]


class Topics:
    """
    The topics of one process and their subscribers.

    :param max_per_subscriber: topics one subscriber may be in at once.
    :param max_topics: topics (with at least one subscriber) at once.
    """

    def __init__(self, max_per_subscriber: int = 64, max_topics: int = 20000):
        self.max_per_subscriber = max_per_subscriber
        self.max_topics = max_topics
        # topic -> its subscribers, in the order they came (a dict as an ordered set)
        self._subscribers: Dict[str, Dict[Hashable, None]] = {}
        # subscriber -> its topics
        self._of: Dict[Hashable, Set[str]] = {}
        self.subscriptions = 0  # (subscriber, topic) pairs

    def __len__(self) -> int:
        return len(self._subscribers)

    def __contains__(self, name) -> bool:
        return name in self._subscribers

    def subscribe(self, subscriber: Hashable, names: Sequence, access: Optional[TopicAccess] = None) -> Change:
        """Put ``subscriber`` in each topic of ``names`` it may join (see the module's table)."""
        mine = self._of.get(subscriber)
        if mine is None:
            mine = set()
        joined: List[str] = []
        opened: List[str] = []
        refused: List[Tuple[object, str]] = []
        for name in names:
            if not valid_topic(name):
                refused.append((name, INVALID))
                continue
            if name in mine:
                continue  # already in it: nothing to do
            if access is not None and not access.allows(name):
                refused.append((name, NOT_ALLOWED))
                continue
            if len(mine) >= self.max_per_subscriber:
                refused.append((name, TOO_MANY_HERE))
                continue
            subscribers = self._subscribers.get(name)
            if subscribers is None:
                if len(self._subscribers) >= self.max_topics:
                    refused.append((name, TOO_MANY_TOPICS))
                    continue
                subscribers = self._subscribers[name] = {}
                opened.append(name)
            subscribers[subscriber] = None
            mine.add(name)
            joined.append(name)
        if mine:
            self._of[subscriber] = mine
        self.subscriptions += len(joined)
        return Change(joined, opened, [], refused)

    def unsubscribe(self, subscriber: Hashable, names: Iterable) -> Change:
        """Take ``subscriber`` out of each topic of ``names`` it is in; others are ignored."""
        mine = self._of.get(subscriber)
        if not mine:
            return Change([], [], [], [])
        left: List[str] = []
        closed: List[str] = []
        for name in names:
            if type(name) is str and name in mine:
                mine.discard(name)
                left.append(name)
                if self._drop(subscriber, name):
                    closed.append(name)
        if not mine:
            del self._of[subscriber]
        return Change(left, [], closed, [])

    def leave(self, subscriber: Hashable) -> Change:
        """Take ``subscriber`` out of every topic (its socket went)."""
        mine = self._of.pop(subscriber, None)
        if not mine:
            return Change([], [], [], [])
        left = sorted(mine)
        closed = [name for name in left if self._drop(subscriber, name)]
        return Change(left, [], closed, [])

    def _drop(self, subscriber: Hashable, name: str) -> bool:
        """Take one subscription away; True if the topic is now empty (and freed)."""
        subscribers = self._subscribers[name]
        del subscribers[subscriber]
        self.subscriptions -= 1
        if not subscribers:
            del self._subscribers[name]
            return True
        return False

    # -- views ----------------------------------------------------------------

    def subscribers(self, name: str) -> Sequence[Hashable]:
        """The subscribers of ``name`` (a view: do not change topics while going through it)."""
        subscribers = self._subscribers.get(name)
        return subscribers.keys() if subscribers is not None else ()  # type: ignore[return-value]

    def count(self, name: str) -> int:
        """How many subscribe to ``name`` here."""
        subscribers = self._subscribers.get(name)
        return len(subscribers) if subscribers is not None else 0

    def topics_of(self, subscriber: Hashable) -> Set[str]:
        return set(self._of.get(subscriber, ()))

    def counts(self) -> Dict[str, int]:
        """Topic -> subscribers here, for every topic."""
        return {name: len(subscribers) for name, subscribers in self._subscribers.items()}

    def summary(self) -> Dict[str, int]:
        """``topics`` and ``subscriptions`` (pairs of subscriber and topic) here."""
        return {"topics": len(self._subscribers), "subscriptions": self.subscriptions}
