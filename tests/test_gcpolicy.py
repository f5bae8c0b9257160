"""
Tier 1: the garbage collector policy (signaling.gcpolicy) on a fake clock,
with the process's real collector.
"""

import gc
import os
import weakref

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from signaling.gcpolicy import GenerationalFreeze

pytestmark = pytest.mark.pure


@pytest.fixture(autouse=True)
def need_freeze():
    """The policy needs CPython's gc.freeze: elsewhere skipped, but in CI its absence fails."""
    if hasattr(gc, "freeze"):
        return
    message = "gc.freeze is missing (the policy needs CPython)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Cycle:
    def __init__(self):
        self.me = self


@pytest.fixture
def policy():
    clock = Clock()
    service = GenerationalFreeze(clock, 600)
    thresholds = gc.get_threshold()
    service.startService()
    yield service, clock
    if service.running:
        service.stopService()
    assert gc.get_threshold() == thresholds and gc.get_freeze_count() == 0


def test_start_freezes_and_full_collections_freeze_the_survivors(policy):
    """Startup objects are frozen; after every full collection, what survived is frozen too."""
    service, _ = policy
    assert gc.get_freeze_count() > 0
    assert gc.get_threshold()[2] == 1
    survivor = [object() for _ in range(100)]  # noqa: F841 - alive across the collection
    gc.collect()
    assert service.freezes >= 1
    assert len(gc.get_objects(2)) == 0  # nothing left in the oldest generation to walk


def test_frozen_cycles_wait_for_the_periodic_full_collection(policy):
    """A cycle frozen while alive is not freed by ordinary collections, only by the periodic pass."""
    service, clock = policy
    cycle = Cycle()
    gone = weakref.ref(cycle)
    gc.collect()  # survives, so it is frozen
    del cycle
    gc.collect()
    assert gone() is not None  # frozen garbage: ordinary collections do not see it
    with capturedLogs() as events:
        clock.advance(600)
    assert gone() is None
    assert service.full_collections == 1
    (event,) = [e for e in events if "full garbage collection" in e["log_format"]]
    assert event["freed"] >= 1 and event["kept"] > 0


def test_objects_freed_by_reference_counting_even_when_frozen(policy):
    """Freezing does not keep objects without cycles alive: they go when their last reference does."""
    class Plain:
        pass

    obj = Plain()
    gone = weakref.ref(obj)
    gc.collect()  # frozen
    del obj
    assert gone() is None


def test_stop_restores_the_collector(policy):
    """Stopping unfreezes, restores the thresholds (checked by the fixture) and ends the periodic pass."""
    service, clock = policy
    service.stopService()
    assert gc.get_freeze_count() == 0 and gc.callbacks.count(service._collected) == 0
    clock.advance(600)
    assert service.full_collections == 0


def test_left_alone_when_the_collector_is_off():
    """With the collector disabled (someone tuned it already), the policy does nothing."""
    gc.disable()
    try:
        service = GenerationalFreeze(Clock(), 600)
        service.startService()
        assert gc.get_freeze_count() == 0 and service._collected not in gc.callbacks
        service.stopService()
    finally:
        gc.enable()
