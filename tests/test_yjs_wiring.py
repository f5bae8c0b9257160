"""Tier 2: how makeService serves y-webrtc's protocol (options, environment, --no-yjs, cluster wiring)."""

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from signaling.tap import SignalingOptions, makeService
from signaling.yjs_protocol import YjsProtocol

pytestmark = pytest.mark.memory


@pytest.fixture(autouse=True)
def in_a_temporary_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("SIGNALING_YJS_MAX_TOPICS", "SIGNALING_NO_YJS"):
        monkeypatch.delenv(name, raising=False)


def parse(*argv):
    options = SignalingOptions()
    options.parseOptions(list(argv))
    return options


def test_served_at_yjs_with_its_caps():
    """By default /yjs is y-webrtc's protocol, with the topic caps the options give."""
    service = makeService(parse("--yjs-max-topics-per-connection=3", "--yjs-max-topics=7"), MemoryReactorClock())
    factory = service.factory
    assert factory.wire_formats["/yjs"] is YjsProtocol
    assert (factory.yjs.topics.max_per_subscriber, factory.yjs.topics.max_topics) == (3, 7)
    assert factory.yjs.backend is None


def test_no_yjs_and_the_environment(monkeypatch):
    """--no-yjs (or SIGNALING_NO_YJS) leaves /yjs to the native protocol; caps come from the environment too."""
    assert "/yjs" not in makeService(parse("--no-yjs"), MemoryReactorClock()).factory.wire_formats
    monkeypatch.setenv("SIGNALING_NO_YJS", "yes")
    assert "/yjs" not in makeService(parse(), MemoryReactorClock()).factory.wire_formats
    monkeypatch.delenv("SIGNALING_NO_YJS")
    monkeypatch.setenv("SIGNALING_YJS_MAX_TOPICS", "11")
    assert makeService(parse(), MemoryReactorClock()).factory.yjs.topics.max_topics == 11


@pytest.mark.parametrize("argv", [["--yjs-max-topics=0"], ["--yjs-max-topics-per-connection=-1"],
                                  ["--yjs-max-topics=many"]])
def test_bad_caps(argv):
    with pytest.raises(usage.UsageError, match="--yjs-max-topics"):
        parse(*argv)


def test_with_redis_topics_span_the_nodes():
    """With --redis, the rooms get the Redis backend, which takes the registry's other channels."""
    from signaling.cluster_topics import RedisTopics

    service = makeService(parse("--redis=redis://127.0.0.1:1/0", "--node-id=n1"), MemoryReactorClock())
    rooms, registry = service.factory.yjs, service.factory.registry
    assert isinstance(rooms.backend, RedisTopics)
    assert registry.channel_handler == rooms.backend._message
    assert rooms.backend._connected in registry.subscriber_hooks
