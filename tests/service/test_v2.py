"""The Open Inference Protocol endpoints: Triton's own Python client against a real `srvit serve`, and malformed
requests in-process."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from sample_images import png
from server_process import ServerProcess
from tritonclient.utils import InferenceServerException

from service import v2


@pytest.fixture(scope="module")
def server(tiny_repo, tmp_path_factory):
    proc = ServerProcess(tiny_repo, tmp_path_factory.mktemp("log") / "serve.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


def images(n: int = 3) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 1, 8, 8), dtype=np.float32)


def direct(tiny_repo, depth: int, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(tiny_repo / f"tiny_d{depth}" / "1" / "model.onnx"))
    return session.run(None, {"images": x})[0]


def infer(client, model: str, x: np.ndarray, binary: bool = True, **parameters):
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    output = triton.InferRequestedOutput("logits", binary_data=binary)
    return client.infer(model, [tensor], outputs=[output], parameters=parameters or None)


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    meta = client.get_model_metadata("tiny")
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]},
                              {"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]  # fmt: skip
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
    assert client.get_model_metadata("tiny_d2", model_version="1")["versions"] == ["1"]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_by_triton_folder_name_matches_onnxruntime(client, tiny_repo, binary):
    x = images(3)
    result = infer(client, "tiny_d2", x, binary)
    np.testing.assert_allclose(result.as_numpy("logits"), direct(tiny_repo, 2, x), atol=1e-5)
    assert result.get_response()["parameters"]["depth_used"] == 2


def test_depth_parameter_selects_the_graph(client, tiny_repo):
    x = images(2)
    np.testing.assert_allclose(infer(client, "tiny", x, depth=1).as_numpy("logits"), direct(tiny_repo, 1, x),
                               atol=1e-5)  # fmt: skip
    assert infer(client, "tiny", x).get_response()["parameters"]["depth_used"] == 3  # the default depth


def test_errors_reach_the_client_with_their_message(client):
    with pytest.raises(InferenceServerException, match="no model named 'nope'"):
        infer(client, "nope", images(1))
    with pytest.raises(InferenceServerException, match=r"shape \[-1, 1, 8, 8\]"):
        infer(client, "tiny", np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(InferenceServerException, match="depth 7 is not served"):
        infer(client, "tiny", images(1), depth=7)


def request_body(n: int = 1, **changes) -> dict:
    """A JSON-data infer request for the tiny model; `changes` replace top-level keys or, as input_*, the tensor's."""
    tensor = {"name": "images", "shape": [n, 1, 8, 8], "datatype": "FP32", "data": images(n).ravel().tolist()}
    tensor |= {k.removeprefix("input_"): v for k, v in changes.items() if k.startswith("input_")}
    return {"inputs": [tensor], **{k: v for k, v in changes.items() if not k.startswith("input_")}}


def binary_request(x: np.ndarray) -> dict:
    parameters = {"binary_data_size": x.nbytes}
    header = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": parameters}]}).encode()  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    return {"content": header + x.astype("<f4").tobytes(), "headers": headers}


BAD, INVALID = (400, "bad_request"), (422, "invalid_parameter")


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body, expected",
    [
        ({"inputs": [1]}, BAD),
        ([1], BAD),
        (request_body(input_shape=[1, 1, 8, "8"]), INVALID),
        (request_body(input_shape=[1.0, 1, 8, 8]), INVALID),
        (request_body(input_shape=[True, 1, 8, 8]), INVALID),
        (request_body(parameters=[]), BAD),
        (request_body(input_parameters=[1]), BAD),
        (request_body(input_parameters={"binary_data_size": "x"}), BAD),
        (request_body(outputs=[1]), BAD),
        (request_body(outputs=[{"name": "logits", "parameters": [1]}]), BAD),
        (request_body(parameters={"timeout": "x"}), INVALID),
        (request_body(parameters={"timeout": float("nan")}), INVALID),
        (request_body(parameters={"timeout": float("inf")}), INVALID),
        (request_body(parameters={"timeout": -5}), INVALID),
        (request_body(parameters={"timeout": True}), INVALID),
        (request_body(parameters={"timeout": 10**400}), INVALID),  # too big for a float
        (request_body(outputs=[{"name": ["logits"]}]), BAD),
        (request_body(input_data=[10**400] * 64), BAD),  # too big for a float
        (request_body(input_data=[1e40] * 64), BAD),  # infinity as float32: NaN logits, which JSON cannot carry
        (request_body(input_data=["0.5"] * 64), BAD),  # strings are not numbers
        (request_body(input_data=[True] * 64), BAD),
        (request_body(parameters={"depth": True}), INVALID),
        (request_body(parameters={"depth": "2"}), INVALID),
        (request_body(parameters={"priority": -1}), INVALID),
        (request_body(parameters={"priority": "high"}), INVALID),
        (request_body(outputs=[{"name": "logits", "parameters": {"classification": 0}}]), INVALID),
        (request_body(outputs=[{"name": "probabilities"}]), INVALID),
    ],
)
async def test_malformed_json_is_a_client_error_never_a_500(serving, body, expected):
    async with serving() as (_, client):
        r = await client.post("/v2/models/tiny/infer", content=json.dumps(body))
    assert (r.status_code, r.json()["code"]) == expected, r.text


@pytest.mark.anyio
async def test_timeout_in_microseconds_is_honoured(serving):
    async with serving() as (_, client):
        ok = await client.post("/v2/models/tiny/infer", json=request_body(parameters={"timeout": 30_000_000}))
        late = await client.post("/v2/models/tiny/infer", json=request_body(parameters={"timeout": 1}))
    assert ok.status_code == 200
    assert (late.status_code, late.json()["code"]) == (504, "deadline_exceeded")


@pytest.mark.anyio
async def test_json_tensors_have_a_lower_body_limit_than_binary_ones(serving):
    x = images(30)  # 7680 bytes as binary, about 40 KB as JSON
    async with serving(max_json_body_bytes=8192) as (_, client):
        as_json = await client.post("/v2/models/tiny/infer", json=request_body(30))
        as_binary = await client.post("/v2/models/tiny/infer", **binary_request(x))
    assert (as_json.status_code, as_json.json()["code"]) == (413, "payload_too_large")
    assert "binary" in as_json.json()["error"]
    assert as_binary.status_code == 200, as_binary.text
    assert as_binary.json()["outputs"][0]["shape"] == [30, 3]


@pytest.mark.anyio
async def test_health_checks_are_answered_while_a_json_tensor_is_parsed(serving, monkeypatch):
    entered, gate, released = threading.Event(), threading.Event(), []
    real = v2.parse_infer

    def slow_parse(*args):
        entered.set()
        released.append(gate.wait(3))  # False: nothing could answer a health check meanwhile
        return real(*args)

    monkeypatch.setattr(v2, "parse_infer", slow_parse)
    async with serving() as (_, client):
        infer_task = asyncio.create_task(client.post("/v2/models/tiny/infer", json=request_body()))
        async with asyncio.timeout(10):
            while not entered.is_set():
                await asyncio.sleep(0.005)
        health = await client.get("/v2/health/live")
        gate.set()
        answer = await infer_task
    assert health.status_code == 200 and released == [True] and answer.status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("length", [b"\xb2", b"1" * 5000, b"-1", b"1.5"])  # b"\xb2" reads as "²" (latin-1)
async def test_a_header_length_that_is_not_ascii_digits_is_a_400(serving, length):
    x = images(1)
    request = binary_request(x)
    request["headers"]["Inference-Header-Content-Length"] = length
    async with serving() as (_, client):
        r = await client.post("/v2/models/tiny/infer", **request)
    assert (r.status_code, r.json()["code"]) == BAD, r.text


def bytes_request(raw: bytes, shape: list[int], **tensor) -> dict:
    """A BYTES `image` input of `raw` (Triton's length-prefixed elements) with the binary tensor extension."""
    entry = {"name": "image", "shape": shape, "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
    header = json.dumps({"inputs": [entry | tensor]}).encode()
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    return {"content": header + raw, "headers": headers}


def prefixed(*files: bytes) -> bytes:
    return b"".join(len(f).to_bytes(4, "little") + f for f in files)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("raw", "shape", "tensor", "expected"),
    [
        (prefixed(png())[:-3], [1], {}, (400, "bad_request")),  # an element shorter than its prefix says
        (prefixed(png())[:2], [1], {}, (400, "bad_request")),  # a cut length prefix
        (prefixed(png(), png()), [1], {}, (400, "bad_request")),  # two elements for shape [1]
        (prefixed(png(), b"GIF89a junk"), [2, 1], {}, (400, "invalid_image")),  # one bad element fails the request
        (prefixed(png()), [1, 2], {}, (422, "invalid_parameter")),
        (prefixed(*[png()] * 17), [17], {}, (422, "invalid_parameter")),  # over max_images_per_request
        (prefixed(png()), [1], {"datatype": "FP32"}, (422, "invalid_parameter")),
    ],
)
async def test_malformed_bytes_inputs_are_client_errors_and_the_server_goes_on(serving, raw, shape, tensor, expected):
    async with serving() as (_, client):
        bad = await client.post("/v2/models/tiny/infer", **bytes_request(raw, shape, **tensor))
        good = await client.post("/v2/models/tiny/infer", **bytes_request(prefixed(png(), png()), [2, 1]))
    assert (bad.status_code, bad.json()["code"]) == expected, bad.text
    assert good.status_code == 200 and good.json()["outputs"][0]["shape"] == [2, 3]


@pytest.mark.anyio
async def test_bytes_in_json_are_refused_with_the_way_to_send_them(serving):
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not a file"]}]}
    async with serving() as (_, client):
        answer = await client.post("/v2/models/tiny/infer", json=body)
    assert answer.status_code == 400 and "binary_data=True" in answer.json()["error"]


@pytest.mark.anyio
async def test_a_compressed_body_with_data_after_its_stream_is_a_400(serving):
    body = json.dumps(request_body()).encode()
    async with serving() as (_, client):
        answer = await client.post("/v2/models/tiny/infer", content=gzip.compress(body) + b"trailing",
                                   headers={"Content-Encoding": "gzip"})  # fmt: skip
        good = await client.post(
            "/v2/models/tiny/infer", content=gzip.compress(body), headers={"Content-Encoding": "gzip"}
        )
    assert answer.status_code == 400 and "after its compressed stream" in answer.json()["error"]
    assert good.status_code == 200
