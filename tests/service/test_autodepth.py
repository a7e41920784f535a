"""service.autodepth without a server: depth choice, reasons, hysteresis, rejection."""

from __future__ import annotations

from service.autodepth import LATENCY_TARGET, OVERLOAD, AutoDepth, Forecast, Policy

COST_MS = {1: 10.0, 2: 20.0, 3: 30.0}  # what each depth takes on an idle device
# With the 50 ms target and 20% headroom a depth stays comfortable while the backlog is at most
# 0.8 * (50 - cost): depth 3 up to 16 ms, depth 2 up to 24 ms, depth 1 up to 32 ms.


def forecast(backlog_ms: float = 0.0) -> Forecast:
    return Forecast({d: backlog_ms + ms for d, ms in COST_MS.items()}, dict(COST_MS))


def auto(target_ms: float = 50.0, hold_s: float = 1.0) -> AutoDepth:
    return AutoDepth([3, 1, 2], Policy(target_ms, headroom=0.2, step_up_hold_s=hold_s))


def test_idle_server_gets_the_deepest_depth():
    decision = auto().decide(forecast(), now=0.0)
    assert (decision.depth, decision.reason) == (3, LATENCY_TARGET)


def test_target_alone_limits_the_depth_on_an_idle_server():
    decision = auto(target_ms=25).decide(forecast(), now=0.0)
    assert (decision.depth, decision.reason) == (2, LATENCY_TARGET)


def test_load_pushes_the_depth_down_at_once_with_reason_overload():
    a = auto()
    decision = a.decide(forecast(backlog_ms=35), now=0.0)  # 3 -> 65, 2 -> 55, 1 -> 45
    assert (decision.depth, decision.reason) == (1, OVERLOAD) and a.current == 1


def test_step_up_waits_for_the_hold_with_margin_one_depth_at_a_time():
    a = auto(hold_s=1.0)
    a.decide(forecast(backlog_ms=35), now=0.0)
    assert a.decide(forecast(), now=0.1).depth == 1  # fits now, but only just seen
    assert a.decide(forecast(), now=0.6).depth == 1
    assert a.decide(forecast(), now=1.2).depth == 2
    assert a.decide(forecast(), now=1.7).depth == 2  # the next step needs its own hold
    decision = a.decide(forecast(), now=2.25)
    assert (decision.depth, decision.reason) == (3, LATENCY_TARGET)


def test_under_load_the_server_wide_depth_steps_down_one_depth_at_a_time():
    a = auto(target_ms=50)  # one step down per 0.2 * 50 ms = 10 ms at most
    a.decide(forecast(), now=0.0)
    first = a.decide(forecast(backlog_ms=35), now=0.100)  # only depth 1 is comfortable
    assert a.current == 2 and (first.depth, first.reason) == (1, OVERLOAD)  # this request: the depth that fits
    a.decide(forecast(backlog_ms=35), now=0.105)
    assert a.current == 2, "the last step has not had 10 ms to show"
    a.decide(forecast(backlog_ms=35), now=0.111)
    assert a.current == 1


def test_auto_steps_down_before_the_target_is_reached_to_leave_room_for_a_burst():
    a = auto()
    decision = a.decide(forecast(backlog_ms=20), now=0.0)  # depth 3 would still fit: 50 ms
    assert (decision.depth, decision.reason) == (2, OVERLOAD) and a.current == 2


def test_step_up_goes_only_as_deep_as_is_comfortable():
    a = auto(hold_s=0.5)
    a.decide(forecast(backlog_ms=35), now=0.0)
    for t in (0.1, 0.4, 0.8, 1.6):
        decision = a.decide(forecast(backlog_ms=20), now=t)  # depth 3 fits (50 ms) without headroom
    assert decision.depth == 2 and a.current == 2


def test_a_miss_during_the_hold_restarts_it():
    a = auto(hold_s=1.0)
    a.decide(forecast(backlog_ms=35), now=0.0)
    a.decide(forecast(), now=0.1)
    a.decide(forecast(backlog_ms=35), now=0.5)  # load is back
    assert a.decide(forecast(), now=1.15).depth == 1  # the hold counts from 1.15, not 0.1
    assert a.decide(forecast(), now=1.7).depth == 1
    assert a.decide(forecast(), now=2.2).depth == 2


def test_after_a_quiet_spell_the_next_request_goes_back_up_at_once():
    a = auto(hold_s=1.0)
    a.decide(forecast(backlog_ms=35), now=0.0)
    assert a.decide(forecast(), now=5.0).depth == 3  # nothing asked for 5 s: nothing to protect


def test_request_budget_narrows_one_request_only():
    a = auto(target_ms=50)
    tight = a.decide(forecast(), now=0.0, budget_ms=15)
    assert (tight.depth, tight.reason) == (1, LATENCY_TARGET)
    assert a.current == 3 and a.decide(forecast(), now=0.01).depth == 3
    assert a.decide(forecast(), now=0.02, budget_ms=500).depth == 3  # a looser budget does not exceed the target


def test_reject_only_when_the_load_makes_even_depth_one_miss():
    a = auto(target_ms=50)
    assert a.decide(forecast(backlog_ms=45), now=0.0) is None  # 1 -> 55 > 50, idle 10 would fit
    assert a.current == 1


def test_a_generous_budget_is_served_shallow_behind_a_backlog_rather_than_refused():
    a = auto(target_ms=50)
    decision = a.decide(forecast(backlog_ms=100), now=0.0, budget_ms=5000)  # depth 1 done in 110 ms
    assert (decision.depth, decision.reason) == (1, OVERLOAD)
    assert a.decide(forecast(backlog_ms=100), now=0.01) is None  # no budget of its own: the target decides
    assert a.decide(forecast(backlog_ms=100), now=0.02, budget_ms=60) is None  # 110 ms misses its own 60 ms


def test_budget_even_an_idle_device_misses_gets_the_shallowest_depth():
    decision = auto(target_ms=50).decide(forecast(backlog_ms=100), now=0.0, budget_ms=5)
    assert (decision.depth, decision.reason) == (1, LATENCY_TARGET)  # its deadline decides, not a 503


def test_only_served_depths_are_chosen():
    a = AutoDepth([1, 3], Policy(25))
    f = Forecast({1: 10, 3: 30}, {1: 10, 3: 30})
    assert a.decide(f, now=0.0).depth == 1


def test_one_request_of_many_images_does_not_pull_the_server_wide_depth_down():
    a = auto()
    many = Forecast({d: 8 * ms for d, ms in COST_MS.items()}, {d: 8 * ms for d, ms in COST_MS.items()})
    own = a.decide(many, now=0.0, probe=forecast())  # 8 images alone take 80 ms at depth 1: nothing fits
    assert own.depth == 1 and a.current == 3
    assert a.decide(forecast(), now=0.1).depth == 3  # the next one-image request is not dragged down


def ask(a: AutoDepth, t0: float, t1: float, backlog_ms: float = 0.0) -> None:
    """A one-image request every 0.1 s from t0 to t1: never a quiet spell."""
    for i in range(round((t1 - t0) * 10) + 1):
        a.decide(forecast(backlog_ms), now=t0 + i / 10)


def test_a_step_up_that_must_be_undone_doubles_the_next_hold():
    a = auto(hold_s=1.0)
    ask(a, 0.0, 0.0, backlog_ms=35)  # depth 1
    ask(a, 0.1, 1.1)
    assert a.current == 2
    ask(a, 1.2, 1.2, backlog_ms=35)  # the deeper depth could not keep up
    assert a.current == 1
    ask(a, 1.3, 2.5)
    assert a.current == 1, "the hold is now 2 s"
    ask(a, 2.6, 3.4)
    assert a.current == 2
    ask(a, 3.5, 5.6, backlog_ms=20)  # depth 2 holds (depth 3 is not comfortable): the hold is back to 1 s
    ask(a, 5.7, 6.6)
    assert a.current == 2
    ask(a, 6.7, 6.8)
    assert a.current == 3, "one 1 s hold from 5.7, not 2 s"


def test_the_hold_grows_to_at_most_eight_times():
    a = auto(hold_s=0.5)
    ask(a, 0.0, 0.0, backlog_ms=35)
    t = 0.1
    for _ in range(6):  # step up after each hold, then undo it at once
        while a.current == 1:
            ask(a, t, t)
            t = round(t + 0.1, 1)
        ask(a, t, t, backlog_ms=35)
        t = round(t + 0.1, 1)
    assert a._hold_s == 4.0


def test_answers_later_than_the_target_step_the_depth_down_though_the_forecast_fits():
    a = auto(target_ms=50)
    ask(a, 0.0, 0.5)
    assert a.current == 3
    for _ in range(20):
        a.observe(3, 80.0)  # the forecast says 30 ms; the answers say 80
    a.decide(forecast(), now=0.6)
    assert a.current == 2 and a.recent_ms == 0.0, "a new depth starts a new average"
    for _ in range(20):
        a.observe(3, 500.0)  # answers queued before the step: not this depth's
    a.decide(forecast(), now=0.7)
    assert a.current == 2


def test_one_very_slow_answer_does_not_step_the_depth_down():
    a = auto(target_ms=50)
    ask(a, 0.0, 0.5)
    for _ in range(20):
        a.observe(3, 30.0)
    a.observe(3, 5000.0)  # counted as 100 ms: 30 + 0.1 * 70 = 37 ms on average
    a.decide(forecast(), now=0.6)
    assert a.current == 3


def test_time_spent_before_the_queue_alone_does_not_refuse_a_request():
    a = auto(target_ms=50)
    slow = Forecast({d: 45 + ms for d, ms in COST_MS.items()}, dict(COST_MS), spent_ms=45)  # a slow decode
    decision = a.decide(slow, now=0.0, probe=forecast())
    assert (decision.depth, decision.reason) == (1, OVERLOAD)  # 55 ms: late, but a 503 would be later still
    queued = Forecast({d: 45 + ms for d, ms in COST_MS.items()}, dict(COST_MS), spent_ms=5)  # 40 ms queued
    assert a.decide(queued, now=0.1) is None
