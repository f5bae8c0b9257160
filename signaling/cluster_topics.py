"""
y-webrtc topics across the nodes of a cluster, through the Redis registry's
connections (:class:`~signaling.redis_registry.RedisRegistry`).

Each node subscribes to a topic's channel, ``P yjs:t:<topic>``, while it
has subscribers of that topic, and keeps its number of them in Redis
(``P yjs:n:<topic>``, a hash node -> count; the scripts ``yjs_*.lua``).  A
publish runs ``yjs_publish.lua``: it adds up the other nodes' counts (so
``clients`` is the topic's subscribers on every node) and, if there are
any, publishes the frame on the topic's channel once; each node that gets it
sends it to its own subscribers.  A subscribe is complete (the connection's
next frame is handled) only once the node counts it in Redis and listens
on the channel, so that a publish that follows it reaches every node.

What keeps the counts right: changes are increments (they add up in any
order); a node that loses its subscriber connection, or finds its counts
gone (it was silent for too long, or Redis lost them), writes them again
whole; and each node forgets the counts of nodes silent for longer than the
node timeout (``yjs_reap.lua``, at every heartbeat interval).

Without Redis (unreachable) a node still delivers to its own subscribers,
counting only them.
"""

from typing import Any, Dict, List

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from signaling.topics import Change

__all__ = ["RedisTopics"]


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else value


class RedisTopics:
    """
    The cluster side of :class:`~signaling.yjs_protocol.YjsRooms` (it sets
    itself as ``rooms.backend``).

    :param registry: the node's :class:`~signaling.redis_registry.RedisRegistry`.
    :param rooms: this process's :class:`~signaling.yjs_protocol.YjsRooms`.
    """

    _log = Logger()

    def __init__(self, registry, rooms) -> None:
        self.registry = registry
        self.rooms = rooms
        self.node = registry.node
        self.channel_prefix = registry.prefix + "yjs:t:"
        self._sub: Any = None  # the registry's subscriber connection (once connected)
        self._upkeep = LoopingCall(self._reap)
        self._upkeep.clock = registry.clock
        self.published = 0  # publishes this node passed to other nodes (metrics)
        self.received = 0  # publishes from other nodes delivered here (metrics)
        rooms.backend = self
        registry.channel_handler = self._message
        registry.subscriber_hooks.append(self._connected)

    # -- subscriptions ------------------------------------------------------------

    def changed(self, change: Change, step: int):
        """
        Subscribers here joined (``step`` 1) or left (-1) ``change.topics``:
        count them in Redis, and listen on the channels of the topics
        ``change`` opened (stop for those it closed).  A Deferred that fires
        when both are done.
        """
        args: List[str] = []
        for topic in change.topics:
            args += [topic, str(step)]
        waits = [self._count(args)]
        for topic in change.opened:
            waits.append(self._listen(topic))
        for topic in change.closed:
            self._unlisten(topic)
        return defer.gatherResults([d for d in waits if d is not None], consumeErrors=True).addErrback(
            lambda _: None)

    def _count(self, args: List[str]):
        if not self.registry.ready:
            return None  # (written whole when it is again: see _connected and _reap)
        d = self.registry._execute("yjs_count", self.node, *args)
        d.addErrback(lambda f: None)  # logged by the registry; written whole at reconnection
        return d

    def _listen(self, topic: str):
        if not self._listening():
            return None  # (subscribed when the connection is back: see _connected)
        d = self._sub.subscribe(self.channel_prefix + topic)
        d.addErrback(self._failed, "subscribing to a topic's channel")
        return d

    def _unlisten(self, topic: str) -> None:
        if self._listening():
            self._sub.unsubscribe(self.channel_prefix + topic).addErrback(self._failed, "unsubscribing")

    def _listening(self) -> bool:
        """Whether the subscriber connection is up (its ``connected``)."""
        return self._sub is not None and bool(getattr(self._sub, "connected", 0))

    def _failed(self, failure, what: str) -> None:
        self._log.warn("redis: {what} failed: {why}", what=what, why=failure.getErrorMessage())

    def _connected(self, protocol) -> None:
        """The subscriber connection is (again) up: listen on every topic here, and write the counts whole."""
        self._sub = protocol
        for topic in list(self.rooms.topics.counts()):
            self._listen(topic)
        self._sync()
        if not self._upkeep.running:
            self._upkeep.start(self.registry.heartbeat_interval, now=False)

    def _sync(self) -> defer.Deferred:
        """Write this node's counts whole (once the node is registered)."""
        registry = self.registry
        args: List[str] = []
        for topic, count in self.rooms.topics.counts().items():
            args += [topic, str(count)]
        d = registry.whenReady().addCallback(lambda _: registry._execute("yjs_sync", self.node, *args))
        d.addCallback(lambda _: self._log.info("redis: node {node} wrote its y-webrtc topic counts ({topics} topics)",
                                               node=self.node, topics=len(args) // 2))
        d.addErrback(lambda f: None)  # logged by the registry; the next upkeep tries again
        return d

    def _reap(self):
        """Every heartbeat interval: forget silent nodes' counts; write ours again if they are gone."""
        registry = self.registry
        if not registry.running:
            if self._upkeep.running:
                self._upkeep.stop()
            return None
        if not registry.ready:
            return None

        def reaped(reply):
            gone, forgotten = reply[0], [_text(node) for node in reply[1:]]
            if forgotten:
                self._log.info("redis: forgot the y-webrtc topic counts of silent nodes: {nodes}",
                               nodes=", ".join(forgotten))
            if gone and len(self.rooms.topics):
                self._log.warn("redis: this node's y-webrtc topic counts were gone; writing them again")
                return self._sync()
            return None

        d = registry._execute("yjs_reap", str(int(registry.node_timeout * 1000)), self.node)
        return d.addCallback(reaped).addErrback(lambda f: None)

    # -- publishing -----------------------------------------------------------------

    def publish(self, topic: str, head: bytes, here: int):
        """
        Count ``topic``'s subscribers on every node and publish ``head`` to
        the other nodes that have some (one script); then deliver here.
        Fires with the count.
        """
        rooms = self.rooms
        if not self.registry.ready:
            if here:
                rooms.deliver(topic, head + b"%d}" % here)
            return here

        def counted(total):
            total = int(total)
            if total > here:
                self.published += 1
            if here:
                rooms.deliver(topic, head + b"%d}" % total)
            return total

        def failed(_):  # (Redis went away: logged by the registry) only this node's subscribers
            return counted(here)

        d = self.registry._execute("yjs_publish", topic, self.node, str(here), head.decode("utf-8"))
        return d.addCallbacks(counted, failed)

    def _message(self, channel: str, message: bytes) -> None:
        """A publish from another node: to this node's subscribers of its topic."""
        if not channel.startswith(self.channel_prefix):
            return
        origin, _, rest = message.partition(b"\n")
        if origin.decode("utf-8", "replace") == self.node:
            return  # ours: delivered here already
        total, _, head = rest.partition(b"\n")
        self.received += 1
        self.rooms.deliver(channel[len(self.channel_prefix):], head + total + b"}")

    # -- views ------------------------------------------------------------------

    def counters(self) -> Dict[str, int]:
        return {"published": self.published, "received": self.received}
