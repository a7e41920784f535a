"""service.inference without a server: what `infer` decides for every protocol, and request accounting."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from sample_images import png

from service.accounting import Accounting
from service.autodepth import AutoDepth, Policy
from service.device import row_dtype
from service.errors import ClientClosedRequest, InvalidParameter, NotReady, Overloaded
from service.forecast import Forecaster
from service.inference import InferenceCore, InferRequest, PriorityPolicy, RequestContext, ServedModel
from service.loading import make_preprocessor
from service.metrics import Metrics
from service.profile import LatencyProfile
from service.repository import load_repository
from service.statistics import Statistics

pytestmark = pytest.mark.anyio
CLASSES = 3


class FakeBatcher:
    """Answers every submission at once with logits [0, 1, 2] + the depth, and records what it was given."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.queued = 0  # images the forecaster sees waiting for every key

    async def submit(self, key, images, deadline=None, yield_s=0.0, since=None):
        self.calls.append((key, images.shape, deadline))
        rows = np.zeros(len(images), row_dtype(CLASSES))
        rows["logits"] = np.arange(CLASSES, dtype=np.float32) + key[1]
        rows["started"] = asyncio.get_running_loop().time()
        return rows

    def queue_images(self, key) -> int:
        return self.queued


class View:
    """The forecaster's read-only view: every depth costs 10 ms a batch, plus whatever `queued` says."""

    def __init__(self, batcher: FakeBatcher, depths: list[int]):
        profile = LatencyProfile()
        for depth in depths:
            profile.record(depth, 1, 10.0 * depth)
        self.limits = {("tiny", d): 1 for d in depths}
        self.profiles, self.running, self.batcher = {"tiny": profile}, None, batcher

    def queue_images(self, key) -> int:
        return self.batcher.queue_images(key)


@contextlib.contextmanager
def make_core(repo):
    model = load_repository(repo)["tiny"]
    auto = AutoDepth(model.depths, Policy(target_ms=100.0, headroom=0.2, step_up_hold_s=1.0))
    served = ServedModel(model, make_preprocessor(model, 10**6), model.depths[-1], auto)
    batcher = FakeBatcher()
    with ThreadPoolExecutor(2) as pool:
        forecaster = Forecaster(View(batcher, model.depths), max_queue_delay_ms=0.0)
        yield InferenceCore({"tiny": served}, batcher, forecaster, pool, Metrics(), Statistics(), default_top_k=2)


@pytest.fixture
def core(tiny_repo):
    with make_core(tiny_repo) as core:
        yield core


def request(images, **fields) -> InferRequest:
    return InferRequest(RequestContext("rid", asyncio.get_running_loop().time()), images, **fields)


async def test_default_and_requested_depths_are_named_as_such(core):
    default = await core.infer(request([png()]))
    requested = await core.infer(request([png()], depth=1))
    assert [(i.depth, i.depth_reason) for i in default.images] == [(3, "default")]
    assert [(i.depth, i.depth_reason) for i in requested.images] == [(1, "requested")]
    assert [key for key, _, _ in core.batcher.calls] == [("tiny", 3), ("tiny", 1)]
    assert default.depth_requested is None and requested.depth_requested == 1


async def test_the_context_learns_model_and_depth_for_accounting(core):
    r = request([png()], depth=2)
    await core.infer(r)
    assert (r.context.model, r.context.depth) == ("tiny", 2)


async def test_a_depth_that_is_not_served_fails_before_any_image_is_decoded(core):
    with pytest.raises(InvalidParameter, match="depth 7 is not served"):
        await core.infer(request([b"not an image"], depth=7))
    assert core.batcher.calls == []


async def test_timeout_becomes_the_batcher_deadline_from_arrival(core):
    r = request([png()], timeout_s=0.25)
    await core.infer(r)
    ((_, _, deadline),) = core.batcher.calls
    assert deadline == pytest.approx(r.context.received_at + 0.25)


async def test_decoded_tensors_pass_through_and_logits_only_requests_get_no_predictions(core):
    x = np.zeros((2, 1, 8, 8), np.float32)
    result = await core.infer(request(x, depth=1, predictions=False))
    assert core.batcher.calls[0][1] == (2, 1, 8, 8)
    assert np.array_equal(result.logits, [[1, 2, 3], [1, 2, 3]]) and all(i.predictions == [] for i in result.images)


async def test_top_k_defaults_to_the_server_setting_and_is_capped_by_the_labels(core):
    default = (await core.infer(request([png()], depth=1))).images[0].predictions
    capped = (await core.infer(request([png()], depth=1, top_k=10))).images[0].predictions
    assert [p["label"] for p in default] == ["gamma", "beta"] and len(capped) == CLASSES


async def test_auto_goes_shallower_behind_a_backlog_and_refuses_when_even_depth_1_is_late(core):
    idle = await core.infer(request([png()], depth="auto"))
    core.batcher.queued = 3  # 3 images on each of 3 depths: 180 ms queued, over the 100 ms target
    with pytest.raises(Overloaded, match="even depth 1 would miss") as refused:
        await core.infer(request([png()], depth="auto"))
    assert idle.images[0].depth == 3 and refused.value.retry_after_s >= 1


async def test_adaptive_refuses_as_auto_does_when_even_its_first_depth_would_be_late(repo_copy):
    from test_adaptive import with_policy

    with make_core(with_policy(repo_copy, 1.0)) as core:
        idle = await core.infer(request([png()], depth="adaptive"))
        core.batcher.queued = 3  # 180 ms queued, over the 100 ms target
        with pytest.raises(Overloaded, match="even depth 1 would miss") as refused:
            await core.infer(request([png()], depth="adaptive"))
        generous = await core.infer(request([png()], depth="adaptive", timeout_s=10.0))  # its own budget fits
    assert idle.images[0].depths_run == (1, 3) and refused.value.retry_after_s >= 1
    assert 'reason="adaptive_overload"} 1.0' in core.metrics.exposition().decode()
    # admitted on its own budget, but the backlog has pushed auto's depth below 3: it stops at depth 1
    assert (generous.images[0].depths_run, generous.images[0].depth_reason) == ((1,), "overload")


async def test_choosing_a_depth_changes_nothing(core):
    """Choice reads the server-wide auto depth; only following the load moves it."""
    served = core.served["tiny"]
    core.batcher.queued = 1  # 60 ms queued: depth 3 still fits the 100 ms target, but without headroom
    before = (core.pre_queue_ms.value, served.auto.current)
    for _ in range(3):
        explicit = core.choose_depth(served, 2, by_default=False, images=1, spent_ms=50.0, budget_ms=None)
        auto = core.choose_depth(served, "auto", by_default=False, images=1, spent_ms=0.0, budget_ms=None)
        assert explicit == (2, "requested") and auto == (3, "latency_target")
    assert (core.pre_queue_ms.value, served.auto.current) == before
    core.follow_load(served)
    assert served.auto.current == 2  # the deepest depth that keeps 20% of its slack free of queued work
    assert core.choose_depth(served, "auto", by_default=False, images=1, spent_ms=0.0, budget_ms=None)[0] == 2


async def test_every_answer_feeds_the_auto_depth_and_the_pre_queue_average(core):
    served = core.served["tiny"]
    await core.infer(request([png()]))  # depth 3, the current auto depth
    assert served.auto.recent_ms > 0 and core.pre_queue_ms.value > 0


# -- accounting -------------------------------------------------------------------------------------


def accounting(metrics: Metrics, refusal=None, max_in_flight: int = 2) -> Accounting:
    return Accounting(metrics, Statistics(), max_in_flight, 64 * 2**20, lambda: refusal, lambda: 3.0)


def counted(metrics: Metrics, status: str, model: str = "", depth: str = "") -> float:
    value = metrics.registry.get_sample_value(
        "srvit_requests_total", {"model": model, "depth": depth, "status": status, "protocol": "classify"}
    )
    return value or 0.0


async def test_a_tracked_request_is_counted_with_its_model_depth_and_status():
    metrics = Metrics()
    acc = accounting(metrics)
    with acc.track("a", "classify") as ctx:
        ctx.model, ctx.depth = "tiny", 2
        assert acc.in_flight == 1 and not acc.idle.is_set()
    with pytest.raises(InvalidParameter), acc.track("b", "classify"):
        raise InvalidParameter("bad")
    assert counted(metrics, "200", "tiny", "2") == 1 and counted(metrics, "422") == 1
    assert acc.in_flight == 0 and acc.idle.is_set()


async def test_a_cancelled_request_counts_as_499_and_frees_its_slot():
    metrics = Metrics()
    acc = accounting(metrics)

    async def held():
        with acc.track("c", "classify"):
            await asyncio.sleep(10)

    task = asyncio.create_task(held())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert counted(metrics, str(ClientClosedRequest.status)) == 1 and acc.in_flight == 0


async def test_admission_refuses_when_not_ready_or_full_without_taking_a_slot():
    metrics = Metrics()
    with (
        pytest.raises(NotReady, match="draining"),
        accounting(metrics, "the server is draining").track("d", "classify"),
    ):
        pass
    acc = accounting(metrics, max_in_flight=1)
    with acc.track("e", "classify"), pytest.raises(Overloaded) as full, acc.track("f", "classify"):
        pass
    assert full.value.retry_after_s == 3.0 and acc.in_flight == 0
    assert counted(metrics, "503") == 2


def test_priority_levels_follow_triton_none_zero_and_beyond_the_levels_are_the_default():
    policy = PriorityPolicy(levels=3, default_level=2, step_s=0.1)
    assert [policy.level(p) for p in (None, 1, 2, 3, 4, 99)] == [2, 1, 2, 3, 2, 2]
    assert [policy.yield_s(p) for p in (1, None, 3)] == pytest.approx([0.0, 0.1, 0.2])


@pytest.fixture
def bounded(core):
    core.max_queue_wait_ms = 50.0  # depth 3 costs 30 ms a batch here
    return core


async def test_a_request_predicted_to_wait_past_max_queue_wait_is_refused_before_queueing(bounded):
    x = np.zeros((1, 1, 8, 8), np.float32)
    bounded.batcher.queued = 1  # one image ahead on each of depths 1-3: 60 ms of work ahead
    with pytest.raises(Overloaded) as refused:
        await bounded.infer(request(x, depth=3))
    assert "would wait about 60 ms" in refused.value.message and refused.value.retry_after_s >= 1
    assert bounded.batcher.calls == []  # never queued
    assert bounded.metrics.registry.get_sample_value("srvit_rejections_total",
                                                     {"model": "tiny", "reason": "queue_wait"}) == 1  # fmt: skip
    bounded.batcher.queued = 0
    assert (await bounded.infer(request(x, depth=3))).images[0].depth == 3


async def test_auto_requests_are_bounded_by_the_queue_wait_too(bounded):
    """60 ms of work ahead fits auto's 100 ms target at depth 1, but not the 50 ms wait bound: refused."""
    x = np.zeros((1, 1, 8, 8), np.float32)
    bounded.batcher.queued = 1
    with pytest.raises(Overloaded, match="max_queue_wait_ms"):
        await bounded.infer(request(x, depth="auto"))
    assert bounded.batcher.calls == []


async def test_body_bytes_are_held_until_the_request_ends_and_a_body_past_the_budget_is_refused():
    metrics = Metrics()
    acc = Accounting(metrics, Statistics(), 8, 100, lambda: None, lambda: 3.0)
    with acc.track("g", "classify") as first:
        acc.hold(first, 60)
        with pytest.raises(Overloaded, match="max_buffered_bytes is 100") as refused, acc.track("h", "v2_http") as ctx:
            acc.hold(ctx, 41)
        assert refused.value.retry_after == 1 and acc.buffered_bytes == 60  # the refused one held nothing
        with acc.track("i", "classify") as fits:
            acc.hold(fits, 40)
            assert acc.buffered_bytes == 100
    assert acc.buffered_bytes == 0
    rejected = metrics.registry.get_sample_value("srvit_rejections_total", {"model": "", "reason": "buffered_bytes"})
    assert rejected == 1


async def test_a_lone_small_image_is_decoded_on_the_event_loop_and_larger_ones_in_the_pool(core):
    on_loop = []
    core.pool.submit(lambda: None).result()  # the pool's threads exist: what runs there is not on the loop thread
    preprocessor = core.served["tiny"].preprocessor
    calls = preprocessor.__call__

    class Spy(type(preprocessor)):
        def __call__(self, data):
            on_loop.append(threading.current_thread() is threading.main_thread())
            return calls(data)

    preprocessor.__class__ = Spy
    core.inline_decode_max_pixels = 16384
    inline = await core.infer(request([png()]))
    await core.infer(request([png(), png()]))  # two images: each in the pool, decoded side by side
    core.inline_decode_max_pixels = 0
    pooled = await core.infer(request([png()]))
    assert on_loop == [False, False, False]  # only the pool's decodes go through __call__
    np.testing.assert_array_equal(inline.logits, pooled.logits)
