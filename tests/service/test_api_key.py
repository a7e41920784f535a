"""Optional API keys on every protocol, health checks exempt; /metrics on a port of its own; no server header."""

from __future__ import annotations

import argparse
import json

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError
from sample_images import png
from server_process import ServerProcess
from tritonclient.utils import InferenceServerException

from bench import servers
from service.cli import add_arguments
from service.settings import Settings

KEY = "s3cret-key"
pytestmark = pytest.mark.anyio


def image() -> dict:
    return {"content": png(), "headers": {"Content-Type": "image/png"}}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"X-API-Key": KEY[:-1]}, 401),
        ({"Authorization": f"Bearer {KEY}"}, 200),
        ({"authorization": f"bearer {KEY}"}, 200),
        ({"X-API-Key": KEY}, 200),
    ],
)
async def test_inference_and_metadata_need_the_key(serving, headers, status):
    async with serving(api_key=KEY) as (_, client):
        classify = await client.post("/classify", **image() | {"headers": image()["headers"] | headers})
        models = await client.get("/v1/models", headers=headers)
        v2 = await client.get("/v2/models/tiny", headers=headers)
    assert (classify.status_code, models.status_code, v2.status_code) == (status, status, status)
    if status == 401:
        body = classify.json()
        assert body["code"] == "unauthorized" and body["request_id"] == classify.headers["x-request-id"]
        assert classify.headers["www-authenticate"] == "Bearer" and KEY not in classify.text


async def test_health_checks_never_need_the_key_and_refusals_are_counted(serving):
    async with serving(api_key=KEY) as (_, client):
        health = [(await client.get(path)).status_code for path in ("/healthz", "/readyz", "/v2/health/live",
                                                                     "/v2/health/ready")]  # fmt: skip
        for _ in range(3):
            await client.post("/classify", **image())
        metrics = await client.get("/metrics", headers={"X-API-Key": KEY})
    assert health == [200] * 4
    assert 'srvit_rejections_total{model="",reason="unauthorized"} 3.0' in metrics.text


async def test_the_key_can_come_from_a_file_and_a_missing_file_stops_start_up(serving, tmp_path):
    secret = tmp_path / "api-key"
    secret.write_text(KEY + "\n")  # as a mounted secret often ends
    async with serving(api_key_file=secret) as (_, client):
        assert (await client.get("/v1/models", headers={"X-API-Key": KEY})).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401
    with pytest.raises(Exception, match="cannot read api_key_file"):
        async with serving(api_key_file=tmp_path / "absent"):
            pass


def test_grpc_needs_the_key_in_metadata_and_health_does_not(tiny_repo, tmp_path):
    metrics_port = servers.free_port()
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--metrics-port", str(metrics_port),
                         env={"SRVIT_API_KEY": KEY})  # fmt: skip
    proc.wait_ready()
    try:
        c = tgrpc.InferenceServerClient(proc.grpc_url)
        x = tgrpc.InferInput("images", [1, 1, 8, 8], "FP32")
        x.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
        with pytest.raises(InferenceServerException) as refused:
            c.infer("tiny", [x])
        answered = c.infer("tiny", [x], headers={"authorization": f"Bearer {KEY}"})
        by_header = c.infer("tiny", [x], headers={"x-api-key": KEY})
        live = c.is_server_live() and c.is_server_ready()
        with grpc.insecure_channel(proc.grpc_url) as channel:
            serving = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        api = httpx.get(f"{proc.url}/readyz")
        apart = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        proc.stop()
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    assert answered.as_numpy("logits").shape == by_header.as_numpy("logits").shape == (1, 3)
    assert live and serving == health_pb2.HealthCheckResponse.SERVING
    assert "server" not in api.headers  # no server software or version
    assert (
        apart.status_code == 200
        and 'srvit_requests_total{depth="3",model="tiny",protocol="v2_grpc",status="200"} 2.0' in apart.text
    )


def test_json_log_lines_carry_each_requests_fields_and_never_its_body(tiny_repo, tmp_path):
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--log-format", "json").wait_ready()
    try:
        answer = httpx.post(f"{proc.url}/classify", params={"depth": 2}, headers={"X-Request-ID": "req-42",
                            "Content-Type": "image/png"}, content=png())  # fmt: skip
        bad = httpx.post(f"{proc.url}/classify", headers={"Content-Type": "image/png"}, content=b"\x89PNG" + b"A" * 500)
        c = tgrpc.InferenceServerClient(proc.grpc_url)
        x = tgrpc.InferInput("images", [1, 1, 8, 8], "FP32")
        x.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
        c.infer("tiny_d1", [x], request_id="grpc-7")
    finally:
        proc.stop()
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    requests = {line["request_id"]: line for line in lines if line["logger"] == "service.requests"}
    assert answer.status_code == 200 and bad.status_code == 400
    assert {k: requests["req-42"][k] for k in ("protocol", "model", "depth", "status")} == {
        "protocol": "classify", "model": "tiny", "depth": 2, "status": 200}  # fmt: skip
    assert requests["grpc-7"]["protocol"] == "v2_grpc" and requests["grpc-7"]["depth"] == 1
    assert requests[bad.headers["x-request-id"]]["status"] == 400 and requests["req-42"]["duration_ms"] > 0
    assert "AAAA" not in proc.output()  # no body in any line
    assert all(set(line) >= {"time", "level", "logger", "message"} for line in lines)


@pytest.mark.parametrize("key", ["", "short", "has space in it", "ключ-ключ-ключ"])
def test_an_unusable_key_is_refused_and_never_printed(key):
    with pytest.raises(ValidationError) as error:
        Settings(api_key=key)
    assert "api_key must be" in str(error.value)
    assert key not in str(error.value) or not key  # the value itself is never echoed


def test_the_key_is_no_command_line_flag():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings}
    assert "--api-key" not in flags and "--api-key-file" in flags
