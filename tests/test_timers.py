"""SlotTimer: Autobahn's per-connection deadlines in short slots (signaling/timers.py)."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from signaling.timers import SlotTimer

RESOLUTION = 0.002


def clock_at(start=1_757_422_800.0):
    clock = Clock()
    clock.advance(start)
    return clock


@settings(max_examples=200, deadline=None)
@given(start=st.floats(1e9, 2e9), delays=st.lists(st.floats(0, 30), min_size=1, max_size=30),
       cancelled=st.sets(st.integers(0, 29)))
def test_never_early_at_most_a_slot_late_in_order_and_cancellable(start, delays, cancelled):
    clock = clock_at(start)
    timer = SlotTimer(clock, RESOLUTION)
    ran = []
    deadlines = [clock.seconds() + d for d in delays]
    calls = [timer.call_later(d, lambda i=i: ran.append((i, clock.seconds()))) for i, d in enumerate(delays)]
    for i in cancelled:
        if i < len(calls):
            calls[i].cancel()
    while clock.getDelayedCalls():  # from one slot to the next
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
    expected = [i for i in range(len(delays)) if i not in cancelled]
    assert sorted(i for i, _ in ran) == expected
    for i, at in ran:
        assert deadlines[i] - 1e-5 <= at <= deadlines[i] + RESOLUTION + 1e-5
    # those that share a slot run in the order they were set; slots in time order
    times = [at for _, at in ran]
    assert times == sorted(times)
    assert timer.pending() == 0 and not clock.getDelayedCalls()


def test_a_deadline_on_a_slot_boundary_runs_at_it():
    """A delay that ends exactly where the fake clock is advanced to runs then (what the tests rely on)."""
    clock = clock_at()
    timer = SlotTimer(clock, RESOLUTION)
    ran = []
    timer.call_later(5, ran.append, "ping")
    clock.advance(5)
    assert ran == ["ping"]


def test_one_delayed_call_in_all():
    """However many slots, the reactor holds one timed call, for the earliest; an earlier deadline moves it."""
    clock = clock_at()
    timer = SlotTimer(clock, RESOLUTION)
    for i in range(100):
        timer.call_later(1.0 + i * RESOLUTION * 3, lambda: None)
    assert len(clock.getDelayedCalls()) == 1 and timer.pending() == 100
    ran = []
    timer.call_later(0.5, ran.append, "sooner")
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == clock.seconds() + 0.5
    clock.advance(0.5)
    assert ran == ["sooner"] and len(clock.getDelayedCalls()) == 1


def test_a_deadline_set_by_a_deadline_for_later_keeps_the_earlier_slots_on_time():
    clock = clock_at()
    timer = SlotTimer(clock, RESOLUTION)
    ran = []
    timer.call_later(1, lambda: timer.call_later(5, ran.append, "late"))
    timer.call_later(2, lambda: ran.append(("two", clock.seconds())))
    start = clock.seconds()
    clock.advance(1)
    clock.advance(1)
    assert ran == [("two", start + 2)]
    clock.advance(4)
    assert ran[-1] == "late"


def test_a_failing_call_does_not_stop_the_others_of_its_slot():
    clock = clock_at()
    timer = SlotTimer(clock, RESOLUTION)
    ran = []

    def boom():
        raise ValueError("boom")

    timer.call_later(1, ran.append, 1)
    timer.call_later(1, boom)
    timer.call_later(1, ran.append, 3)
    with capturedLogs() as events:
        clock.advance(1)
    assert ran == [1, 3]
    assert [e["log_failure"].type for e in events if "log_failure" in e] == [ValueError]


def test_cancel_twice_and_after_running_is_harmless():
    clock = clock_at()
    timer = SlotTimer(clock, RESOLUTION)
    ran = []
    call = timer.call_later(1, ran.append, "x")
    clock.advance(1)
    call.cancel()
    call.cancel()
    other = timer.call_later(1, ran.append, "y")
    other.cancel()
    other.cancel()
    clock.advance(1)
    assert ran == ["x"] and timer.pending() == 0


def test_a_slot_whose_deadlines_are_all_cancelled_leaves_no_timed_call():
    """(A server whose connections have all gone has nothing pending: trial checks the reactor is clean.)"""
    clock = clock_at()
    timer = SlotTimer(clock, RESOLUTION)
    a = timer.call_later(1, lambda: None)
    b = timer.call_later(1, lambda: None)
    c = timer.call_later(3, lambda: None)
    a.cancel()
    assert len(clock.getDelayedCalls()) == 1 and timer.pending() == 2
    b.cancel()
    assert len(clock.getDelayedCalls()) == 1 and timer.pending() == 1  # (the slot at 1 s, forgotten, is skipped)
    c.cancel()
    assert clock.getDelayedCalls() == [] and timer.pending() == 0
    ran = []
    timer.call_later(1, ran.append, "again")  # the slot is made anew
    clock.advance(1)
    assert ran == ["again"]


def test_a_cancelled_or_run_deadline_keeps_nothing():
    clock = clock_at()
    timer = SlotTimer(clock, RESOLUTION)
    ran = timer.call_later(1, lambda: None)
    cancelled = timer.call_later(1, lambda: None)
    cancelled.cancel()
    clock.advance(1)
    for deadline in (ran, cancelled):
        assert (deadline.slot, deadline.func, deadline.args, deadline.kwargs) == (None, None, None, None)
