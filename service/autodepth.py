"""depth=auto: per request, the deepest depth predicted to finish within the latency budget, without flapping."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

LATENCY_TARGET, OVERLOAD = "latency_target", "overload"
MAX_HOLD_BACKOFF = 8  # the step-up hold grows to at most this many times step_up_hold_s
RECENT_SMOOTHING = 0.1  # weight of each answer in the moving average of measured latency at the current depth


@dataclass(frozen=True)
class Policy:
    """The server-wide goal, and how early to give way.

    A depth is *comfortable* while the work queued ahead uses at most `1 - headroom` of its slack (the target
    minus the depth's own time). Giving way when the current depth is no longer comfortable, rather than when
    it stops fitting at all, leaves room for a burst to be served at shallower depths instead of refused.

    The server-wide depth moves one served depth at a time: down at most once per `step_down_every_s`, up
    after a deeper depth has stayed comfortable for `step_up_hold_s` (a step down is cheap to undo, a step up
    into a queue that is still draining is not). A step up that has to be undone within its hold doubles the
    next hold (up to 8x), so a load a deeper depth cannot sustain is probed less and less often. Under a
    steady overload the depth settles around the deepest one that keeps up, instead of swinging between the
    shallowest (which drains the queue) and the deepest (which fills it again).
    """

    target_ms: float
    headroom: float = 0.2
    step_up_hold_s: float = 2.0

    @property
    def step_down_every_s(self) -> float:
        """headroom * target: a queue growing twice as fast as the device drains it (a 2x overload) fills the
        headroom in this time, so a step down must not wait longer than that for the last one to show."""
        return self.headroom * self.target_ms / 1000


@dataclass(frozen=True)
class Forecast:
    """Predicted completion time of one request at each served depth, in ms since it arrived."""

    loaded_ms: Mapping[int, float]  # the time already spent, then the work queued and running on the device now
    idle_ms: Mapping[int, float]  # on an idle device, had it not waited: what the depth itself costs
    spent_ms: float = 0.0  # the time already spent (included in loaded_ms)


@dataclass(frozen=True)
class Decision:
    depth: int
    reason: str  # LATENCY_TARGET: the budget alone limits the depth; OVERLOAD: the load pushed it down


class AutoDepth:
    """One model's auto depth (`current`), moved by the load every auto request sees, and by how late the
    answers at the current depth come back.

    `current` follows the server-wide target only: one request's tight timeout_ms narrows its own choice
    but must not drag every other request down.
    """

    def __init__(self, depths: Iterable[int], policy: Policy):
        self.depths = sorted(depths)
        self.policy = policy
        self.current = self.depths[-1]
        self.recent_ms = 0.0  # moving average of the measured latency of answers at `current`, since it was set
        self._fits_since: float | None = None  # since when a deeper depth has been comfortable
        self._stepped_down: float | None = None  # when the last step down happened
        self._stepped_up: float | None = None  # when the last step up happened, until it has held
        self._hold_s = policy.step_up_hold_s  # doubles after each step up that had to be undone
        self._last_seen: float | None = None  # the previous decision's time

    def observe(self, depth: int, latency_ms: float) -> None:
        """An answered request's depth and measured latency, arrival to answer. On a CPU server, decoding and
        HTTP share the cores with inference and slow it in ways the device forecast cannot see; the answers
        show it. Only answers at the current depth count, each at most twice the target, so neither answers
        queued before the last step nor one very slow request decide alone."""
        if depth == self.current:
            sample = min(latency_ms, 2 * self.policy.target_ms)
            self.recent_ms += RECENT_SMOOTHING * (sample - self.recent_ms)

    def decide(self, forecast: Forecast, now: float, budget_ms: float | None = None,
               probe: Forecast | None = None) -> Decision | None:  # fmt: skip
        """`follow` the load `probe` shows (default: `forecast`), then `choose` this request's depth: one request's
        whole decision in one call. The server makes the two steps itself (InferenceCore.follow_load, then
        choose_depth), so that choosing stays free of side effects."""
        self.follow(probe or forecast, now)
        return self.choose(forecast, budget_ms)

    def choose(self, forecast: Forecast, budget_ms: float | None = None) -> Decision | None:
        """The depth for one request, or None to reject it; reads `current`, changes nothing.

        The depth is the deepest that fits the target (or the request's tighter budget), else the shallowest.
        Rejection is judged against the request's own budget (the target when it has none): only when the
        shallowest depth misses it because of the work queued on the device (with none, it would make it,
        time already spent included). A generous timeout_ms behind a backlog is served shallow rather than
        refused; a budget that even an idle device misses gets the shallowest depth, and the request's
        deadline decides."""
        own = self.policy.target_ms if budget_ms is None else budget_ms
        budget = min(own, self.policy.target_ms)
        depth = _deepest(forecast.loaded_ms, budget, (d for d in self.depths if d <= self.current))
        shallowest = self.depths[0]
        if depth is None and self.hopeless(forecast, shallowest, budget_ms):
            return None
        depth = depth or shallowest
        unloaded = _deepest(forecast.idle_ms, budget, self.depths) or shallowest
        return Decision(depth, OVERLOAD if depth < unloaded else LATENCY_TARGET)

    def hopeless(self, forecast: Forecast, depth: int, budget_ms: float | None = None) -> bool:
        """Whether a request at `depth` would miss its own budget (the target when it has none) only because of
        the work queued ahead, which it would make on an idle device: refused rather than queued to be late."""
        own = self.policy.target_ms if budget_ms is None else budget_ms
        return forecast.loaded_ms[depth] > own >= forecast.idle_ms[depth] + forecast.spent_ms

    def load_cap(self, idle_ms: Mapping[int, float]) -> int | None:
        """The deepest depth the load allows now: `current` while the load holds it below the depth an idle
        server would give a request (`idle_ms`: each depth's time on an idle device), else None; what
        depth=adaptive may go to. Reads only."""
        unloaded = _deepest(idle_ms, self.policy.target_ms, self.depths) or self.depths[0]
        return self.current if self.current < unloaded else None

    def follow(self, forecast: Forecast, now: float) -> None:
        """Move the server-wide `current` by the forecast of a typical request (one image, the usual wait so
        far): a request of many images, or one slow to decode, must not make every depth look slow for
        everyone else. The only place `current` changes, besides `observe`'s feedback.

        One depth down when the current one is uncomfortable or its answers miss the target (at most once
        per step_down_every_s), one up after the hold; after a quiet spell (nothing queued to protect),
        straight to the deepest comfortable depth."""
        comfortable = [d for d in self.depths if self._comfortable(forecast, d)]
        best = max(comfortable, default=self.depths[0])
        quiet = self._last_seen is None or now - self._last_seen >= self.policy.step_up_hold_s
        self._last_seen = now
        at = self.depths.index(self.current)
        if quiet or (self._stepped_up is not None and now - self._stepped_up >= self._hold_s):
            self._hold_s, self._stepped_up = self.policy.step_up_hold_s, None  # the last step up held
        if quiet:
            self._fits_since = None
            self._set(best)
            return
        if self.recent_ms > self.policy.target_ms:
            best = min(best, self.depths[max(at - 1, 0)])  # answers come back late: the forecast is optimistic
        if best < self.current:
            self._fits_since = None
            if self._stepped_down is None or now - self._stepped_down >= self.policy.step_down_every_s:
                if self._stepped_up is not None:  # a step up undone: probe less often while the load lasts
                    self._hold_s = min(2 * self._hold_s, MAX_HOLD_BACKOFF * self.policy.step_up_hold_s)
                self._stepped_down, self._stepped_up = now, None
                self._set(self.depths[at - 1])
        elif best > self.current:
            self._fits_since = now if self._fits_since is None else self._fits_since
            if now - self._fits_since >= self._hold_s:
                self._stepped_up = now
                self._set(self.depths[at + 1])
                self._fits_since = now if best > self.current else None  # the next step's hold starts now
        else:
            self._fits_since = None

    def _set(self, depth: int) -> None:
        if depth != self.current:
            self.current, self.recent_ms = depth, 0.0

    def _comfortable(self, forecast: Forecast, depth: int) -> bool:
        own = forecast.idle_ms[depth]
        slack = self.policy.target_ms - own
        return slack >= 0 and forecast.loaded_ms[depth] - own <= (1 - self.policy.headroom) * slack


def _deepest(predicted_ms: Mapping[int, float], budget_ms: float, depths: Iterable[int]) -> int | None:
    fitting = [d for d in depths if predicted_ms[d] <= budget_ms]
    return max(fitting) if fitting else None
