"""The HTTP API in-process (httpx over ASGI, lifespan included): shapes, parameters, errors, readiness, metrics."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sample_images import encode, jpeg, picture, png

from modelrepo.manifest import load as load_manifest
from service.preprocess import Preprocessor
from service.runtime import OrtRuntime

pytestmark = pytest.mark.anyio

KEYS = {"model", "model_version", "depth_requested", "depth_used", "depth_reason", "depths_run", "gflops",
        "predictions", "timing_ms", "request_id"}  # fmt: skip


def raw(data: bytes, kind: str = "image/png") -> dict:
    return {"content": data, "headers": {"Content-Type": kind}}


def direct_probs(repo, depth: int, data: bytes) -> np.ndarray:
    """What onnxruntime itself says for the same bytes, preprocessed the same way: the server must agree."""
    import json

    manifest = json.loads((repo / f"tiny_d{depth}" / "manifest.json").read_text())
    x = Preprocessor(manifest["preprocessing"], 10**6)(data)[None]  # [1, C, H, W]
    session = ort.InferenceSession(str(repo / f"tiny_d{depth}" / manifest["model_file"]))
    logits = session.run(None, {"images": x})[0][0].astype(np.float64)
    return np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()


async def test_readyz_is_503_until_warmed_up_then_200(serving):
    async with serving(start=False) as (app, client):
        before = await client.get("/readyz")
        assert (before.status_code, before.json()["code"]) == (503, "not_ready")
        assert (await client.post("/classify", **raw(png()))).json()["code"] == "not_ready"
        async with app.router.lifespan_context(app):
            assert (await client.get("/readyz")).json() == {"status": "ready"}
            assert (await client.get("/healthz")).status_code == 200


async def test_raw_png_is_classified_like_onnxruntime_at_the_default_depth(serving, tiny_repo):
    async with serving() as (_, client):
        r = await client.post("/classify", params={"top_k": 3}, **raw(png(seed=3)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == KEYS and body["request_id"] == r.headers["x-request-id"]
    assert (body["model"], body["model_version"], body["depth_used"]) == ("tiny", "1", 3)
    assert (body["depth_requested"], body["depth_reason"], body["depths_run"]) == (None, "default", [3])
    assert body["gflops"] == pytest.approx(load_manifest(tiny_repo / "tiny_d3" / "manifest.json").flops / 1e9)
    scores = [p["score"] for p in body["predictions"]]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0)
    expected = direct_probs(tiny_repo, 3, png(seed=3))
    assert [p["index"] for p in body["predictions"]] == list(np.argsort(-expected))
    assert scores == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
    assert {p["label"] for p in body["predictions"]} == {"alpha", "beta", "gamma"}
    assert set(body["timing_ms"]) == {"queue", "inference", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["inference"] >= 0


@pytest.mark.parametrize("depth", [1, 2, 3])
async def test_every_depth_is_served_exactly_as_asked(serving, tiny_repo, depth):
    async with serving() as (_, client):
        body = (
            await client.post("/classify", params={"depth": depth, "top_k": 3}, **raw(jpeg(seed=1), "image/jpeg"))
        ).json()
    assert (body["depth_requested"], body["depth_used"], body["depth_reason"]) == (depth, depth, "requested")
    expected = direct_probs(tiny_repo, depth, jpeg(seed=1))
    assert [p["score"] for p in body["predictions"]] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)


async def test_multipart_single_image_and_form_fields(serving):
    async with serving() as (_, client):
        r = await client.post(
            "/classify", files={"image": ("a.png", png(), "image/png")}, data={"depth": "1", "top_k": "2"}
        )
    body = r.json()
    assert r.status_code == 200 and set(body) == KEYS
    assert (body["depth_used"], len(body["predictions"])) == (1, 2)


async def test_multipart_several_images_answer_in_part_order(serving, tiny_repo):
    images = [png(seed=s) for s in range(5)]
    files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    async with serving() as (app, client):
        r = await client.post("/classify", files=files, params={"depth": 2, "top_k": 1})
        sizes = _samples(await client.get("/metrics"), "srvit_batch_size_images_sum", depth="2")
    body = r.json()
    assert r.status_code == 200 and len(body["results"]) == 5 and body["request_id"] == r.headers["x-request-id"]
    for data, result in zip(images, body["results"], strict=True):
        assert result["predictions"][0]["index"] == int(np.argmax(direct_probs(tiny_repo, 2, data)))
    assert sizes == [5.0]  # five images, one request: they count as five toward the batch


async def test_too_many_parts_and_nameless_or_misnamed_parts_are_bad_requests(serving):
    async with serving(max_images_per_request=2) as (_, client):
        three = [("image", (f"{i}.png", png(), "image/png")) for i in range(3)]
        too_many = await client.post("/classify", files=three)
        misnamed = await client.post("/classify", files={"file": ("a.png", png(), "image/png")})
        as_text = await client.post(
            "/classify", data={"image": "not a file"}, files={"other": ("x", b"", "text/plain")}
        )
    for r in (too_many, misnamed, as_text):
        assert (r.status_code, r.json()["code"]) == (400, "bad_request"), r.text


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"depth": 0}, "depth 0 is not served"),
        ({"depth": 4}, "depth 4 is not served"),
        ({"depth": "abc"}, "depth:"),
        ({"depth": "2.5"}, "depth:"),
        ({"top_k": 0}, "top_k:"),
        ({"timeout_ms": -1}, "timeout_ms:"),
        ({"deph": 2}, "deph: unknown parameter"),
    ],
)
async def test_bad_parameters_are_422_invalid_parameter_in_our_body(serving, params, fragment):
    async with serving() as (_, client):
        r = await client.post("/classify", params=params, **raw(png()))
    body = r.json()
    assert (r.status_code, body["code"]) == (422, "invalid_parameter"), body
    assert fragment in body["error"] and set(body) == {"error", "code", "request_id"}


async def test_parameter_given_in_query_and_form_is_refused(serving):
    async with serving() as (_, client):
        r = await client.post("/classify?depth=1", files={"image": ("a.png", png(), "image/png")}, data={"depth": "2"})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_parameter")


async def test_form_field_given_twice_is_refused(serving):
    async with serving() as (_, client):
        r = await client.post("/classify", files={"image": ("a.png", png(), "image/png")}, data={"depth": ["1", "3"]})
    assert (r.status_code, r.json()["code"]) == (422, "invalid_parameter") and "'depth'" in r.json()["error"]


async def test_unknown_model_is_404(serving):
    async with serving() as (_, client):
        r = await client.post("/classify", params={"model": "nope"}, **raw(png()))
        named = await client.post("/classify", params={"model": "tiny"}, **raw(png()))
    assert (r.status_code, r.json()["code"]) == (404, "model_not_found") and "tiny" in r.json()["error"]
    assert named.status_code == 200


@pytest.mark.parametrize("headers", [{"Content-Type": "text/plain"}, {"Content-Type": "application/json"}, {},
                                     {"Content-Type": "image/png", "Content-Encoding": "gzip"}])  # fmt: skip
async def test_wrong_content_type_or_encoding_is_415(serving, headers):
    async with serving() as (_, client):
        r = await client.post("/classify", content=png(), headers=headers)
    assert (r.status_code, r.json()["code"]) == (415, "unsupported_media_type")


async def test_garbage_is_400_and_a_refused_format_is_415(serving):
    tiff = b"II*\x00" + bytes(60)
    async with serving() as (_, client):
        garbage = await client.post("/classify", **raw(b"definitely not an image", "application/octet-stream"))
        truncated = await client.post("/classify", **raw(png()[:40]))
        refused = await client.post("/classify", **raw(tiff, "application/octet-stream"))
    assert (garbage.status_code, garbage.json()["code"]) == (400, "invalid_image")
    assert (truncated.status_code, truncated.json()["code"]) == (400, "invalid_image")
    assert (refused.status_code, refused.json()["code"]) == (415, "unsupported_media_type")


async def test_decompression_bomb_is_422_before_decoding(serving):
    bomb = _png_header_only(30_000, 30_000)  # a few dozen bytes declaring 900 megapixels
    async with serving(max_pixels=1_000_000) as (_, client):
        r = await client.post("/classify", **raw(bomb))
        big = await client.post("/classify", **raw(png(size=1100)))
    assert (r.status_code, r.json()["code"]) == (422, "image_too_large") and "900000000" in r.json()["error"]
    assert (big.status_code, big.json()["code"]) == (422, "image_too_large")


async def test_extreme_aspect_ratio_is_422_image_too_large(serving):
    strip = encode(picture(1, 0).resize((1, 40_000)), "PNG")  # 40000 pixels, but 8x320000 once resized
    async with serving(max_pixels=1_000_000) as (_, client):
        r = await client.post("/classify", **raw(strip))
    assert (r.status_code, r.json()["code"]) == (422, "image_too_large") and "aspect ratio" in r.json()["error"]


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature, IHDR and the start of the pixel data: all a decoder needs to begin allocating."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(4096))) + chunk(b"IEND", b"")
    )


async def test_top_k_limits_predictions_and_is_capped_by_the_label_count(serving):
    async with serving(default_top_k=2) as (_, client):
        one = (await client.post("/classify", params={"top_k": 1}, **raw(png()))).json()
        many = (await client.post("/classify", params={"top_k": 50}, **raw(png()))).json()
        default = (await client.post("/classify", **raw(png()))).json()
    assert [len(b["predictions"]) for b in (one, many, default)] == [1, 3, 2]


async def test_tiny_timeout_is_504_deadline_exceeded(serving):
    async with serving() as (_, client):
        r = await client.post("/classify", params={"timeout_ms": 0.001}, **raw(png()))
        ok = await client.post("/classify", params={"timeout_ms": 30_000}, **raw(png()))
    assert (r.status_code, r.json()["code"]) == (504, "deadline_exceeded")
    assert ok.status_code == 200


async def test_full_queue_is_503_overloaded_with_retry_after(serving, monkeypatch):
    gate = threading.Event()
    gate.set()
    original = OrtRuntime.run
    monkeypatch.setattr(OrtRuntime, "run", lambda self, images: (gate.wait(10), original(self, images))[1])
    async with serving(max_queue_images=2, max_queue_delay_ms=0) as (app, client):
        gate.clear()  # warm-up done: from now on the device holds the first batch
        device = app.state.service.device
        running = asyncio.create_task(client.post("/classify", params={"depth": 1}, **raw(png())))
        await _until(lambda: device.running is not None)
        queued = [asyncio.create_task(client.post("/classify", params={"depth": 1}, **raw(png()))) for _ in range(2)]
        await _until(lambda: device.batcher.queue_images(("tiny", 1)) == 2)
        refused = await client.post("/classify", params={"depth": 1}, **raw(png()))
        gate.set()
        answers = await asyncio.gather(running, *queued)
    assert (refused.status_code, refused.json()["code"]) == (503, "overloaded")
    assert int(refused.headers["retry-after"]) >= 1
    assert [a.status_code for a in answers] == [200, 200, 200]


async def test_requests_past_max_in_flight_are_503_before_their_body_is_read(serving):
    read = []

    async def body():
        read.append("body")
        yield png()

    async with serving(max_in_flight=1) as (app, client):
        with app.state.service.accounting.track("held", "classify"):  # a request in progress holds the only slot
            refused = await client.post("/classify", content=body(), headers={"Content-Type": "image/png"})
        ok = await client.post("/classify", **raw(png()))
    assert (refused.status_code, refused.json()["code"]) == (503, "overloaded")
    assert int(refused.headers["retry-after"]) >= 1 and read == []
    assert ok.status_code == 200


async def _until(condition, timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


async def test_models_lists_depths_accuracy_latency_labels_and_shape(serving):
    async with serving(warmup_batch_sizes=(1, 2)) as (_, client):
        body = (await client.get("/v1/models")).json()
    (model,) = body["models"]
    assert (model["name"], model["version"], model["max_depth"], model["labels"]) == ("tiny", "1", 3, 3)
    assert (model["default_depth"], model["auto_depth"], model["input_shape"]) == (3, 3, [-1, 1, 8, 8])
    assert [d["depth"] for d in model["depths"]] == [1, 2, 3]
    for depth in model["depths"]:
        assert depth["accuracy"] is None  # exported without held-out data
        assert set(depth["latency_ms"]) == {"1", "2", "16"} and all(ms > 0 for ms in depth["latency_ms"].values())
        assert (depth["runtime"], depth["max_batch_size"]) == ("CPUExecutionProvider", 16)


async def test_batch_limit_is_capped_by_the_setting(serving):
    async with serving(max_batch_size=4) as (_, client):
        depths = (await client.get("/v1/models")).json()["models"][0]["depths"]
    assert {d["max_batch_size"] for d in depths} == {4}


async def test_metrics_move_and_parse(serving):
    async with serving() as (_, client):
        for depth in (1, 3, 3):
            await client.post("/classify", params={"depth": depth}, **raw(png()))
        await client.post("/classify", params={"depth": "abc"}, **raw(png()))
        await client.post("/classify", params={"depth": 1}, **raw(b"junk", "image/png"))
        text = (await client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert _value(families, "srvit_requests_total", model="tiny", depth="3", status="200") == 2
    assert _value(families, "srvit_requests_total", model="", depth="", status="422") == 1  # refused before
    assert _value(families, "srvit_requests_total", model="tiny", depth="1", status="400") == 1
    assert _value(families, "srvit_request_duration_seconds_count", model="tiny", depth="3") == 2
    for name in ("srvit_queue_wait_seconds_count", "srvit_inference_duration_seconds_count",
                 "srvit_preprocess_duration_seconds_count", "srvit_batch_size_images_count"):  # fmt: skip
        assert _value(families, name, model="tiny", depth="1") == 1, name
    assert _value(families, "srvit_inference_images_total", model="tiny", depth="3") == 2
    assert _value(families, "srvit_queue_images", model="tiny", depth="2") == 0
    assert _value(families, "srvit_auto_depth", model="tiny") == 3
    assert "srvit_rejections" in families and "srvit_auto_depth_downgrades" in families


def _value(families, sample_name: str, **labels) -> float:
    family = next(f for f in families.values() if sample_name.startswith(f.name))
    matches = [s.value for s in family.samples if s.name == sample_name and s.labels.items() >= labels.items()]
    assert len(matches) == 1, (sample_name, labels, family.samples)
    return matches[0]


def _samples(response, sample_name: str, **labels) -> list[float]:
    families = text_string_to_metric_families(response.text)
    return [
        s.value for f in families for s in f.samples if s.name == sample_name and s.labels.items() >= labels.items()
    ]


async def test_draining_refuses_new_work_and_readiness_turns_503(serving):
    async with serving() as (app, client):
        await app.state.service.drain()
        ready = await client.get("/readyz")
        refused = await client.post("/classify", **raw(png()))
        live = await client.get("/healthz")
    assert (ready.status_code, ready.json()["code"]) == (503, "not_ready")
    assert (refused.status_code, refused.json()["code"]) == (503, "not_ready")
    assert live.status_code == 200


async def test_readiness_turns_503_when_the_batch_executor_crashes(serving, monkeypatch):
    def bug(key):
        raise RuntimeError("a bug inside the executor loop")

    async with serving() as (app, client):
        monkeypatch.setattr(app.state.service.device.batcher, "_urgency", bug)
        failed = await client.post("/classify", **raw(png()))
        ready = await client.get("/readyz")
        v2_ready = await client.get("/v2/health/ready")
        live = await client.get("/healthz")
    assert (failed.status_code, failed.json()["code"]) == (500, "internal")
    assert (ready.status_code, ready.json()["code"]) == (503, "not_ready") and "restart" in ready.json()["error"]
    assert v2_ready.status_code == 503 and live.status_code == 500


async def test_client_request_id_is_echoed_when_sane_and_replaced_when_not(serving):
    async with serving() as (_, client):
        sane = await client.post("/classify", headers={"X-Request-ID": "abc-123", "Content-Type": "image/png"},
                                 content=png())  # fmt: skip
        insane = await client.get("/readyz", headers={"X-Request-ID": "x" * 500})
    assert sane.headers["x-request-id"] == "abc-123" == sane.json()["request_id"]
    assert insane.headers["x-request-id"] != "x" * 500 and len(insane.headers["x-request-id"]) == 32


async def test_unexpected_exception_is_500_internal_without_traceback(serving, monkeypatch):
    from service.inference import InferenceCore

    async def explode(*args, **kw):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(InferenceCore, "infer", explode)
    async with serving() as (_, client):
        r = await client.post("/classify", **raw(png()))
        missing = await client.get("/nowhere")
    body = r.json()
    assert (r.status_code, body["code"]) == (500, "internal") and "secret" not in r.text and "Traceback" not in r.text
    assert body["request_id"] == r.headers["x-request-id"]
    assert (missing.status_code, missing.json()["code"]) == (404, "not_found")


async def test_openapi_documents_classify_bodies_and_answers(serving):
    async with serving() as (_, client):
        spec = (await client.get("/openapi.json")).json()
        docs = await client.get("/docs")
    op = spec["paths"]["/classify"]["post"]
    assert {"image/jpeg", "image/png", "multipart/form-data"} <= set(op["requestBody"]["content"])
    assert {p["name"] for p in op["parameters"]} == {"depth", "top_k", "model", "timeout_ms"}
    assert {"413", "415", "422", "503", "504"} <= set(op["responses"])
    assert docs.status_code == 200


async def test_rgb_images_are_converted_for_a_grayscale_model(serving):
    async with serving() as (_, client):
        r = await client.post("/classify", **raw(jpeg(size=40), "image/jpeg"))
        webp = await client.post("/classify", content=_webp(), headers={"Content-Type": "image/webp"})
    assert r.status_code == 200 and webp.status_code == 200


def _webp() -> bytes:
    return encode(picture(12, 2, "RGB"), "WEBP")
