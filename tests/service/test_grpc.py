"""The Open Inference Protocol as Triton's clients use it: `tritonclient.grpc` and `tritonclient.http` against
a real `srvit serve`, encoded images as BYTES, the classification, configuration, statistics and repository
extensions, gRPC status codes, grpc.health.v1, and one batch for both transports."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families
from sample_images import jpeg, png
from server_process import ServerProcess
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

IMAGES = [png(16, seed) for seed in range(3)] + [jpeg(20, 7)]
BIG = png(2000, 1)  # about 4 MB of random pixels: five of them exceed the 16 MiB message limit


@pytest.fixture(scope="module")
def server(tiny_repo, tmp_path_factory):
    proc = ServerProcess(tiny_repo, tmp_path_factory.mktemp("log") / "serve.log", "--max-queue-delay-ms", "30")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def grpc_client(server):
    c = tgrpc.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def http_client(server):
    c = thttp.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


def encoded(module, files: list[bytes]):
    tensor = module.InferInput("image", [len(files), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object).reshape(-1, 1))
    return tensor


def fp32(module, x: np.ndarray):
    tensor = module.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return tensor


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def classify(server, files: list[bytes], depth: int) -> list[dict]:
    parts = [("image", (f"{i}.img", data, "application/octet-stream")) for i, data in enumerate(files)]
    answer = httpx.post(f"{server.url}/classify", params={"depth": depth, "top_k": 3}, files=parts, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return body.get("results", [body])


def test_health_metadata_and_extensions_agree_over_both_transports(grpc_client, http_client):
    for c in (grpc_client, http_client):
        assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("tiny") and c.is_model_ready("tiny_d2")
    http_meta = http_client.get_server_metadata()
    grpc_meta = grpc_client.get_server_metadata(as_json=True)
    assert grpc_meta["extensions"] == http_meta["extensions"]
    assert {"classification", "model_configuration", "statistics", "model_repository"} <= set(http_meta["extensions"])
    inputs = grpc_client.get_model_metadata("tiny", as_json=True)["inputs"]
    assert [(i["name"], i["datatype"]) for i in inputs] == [("images", "FP32"), ("image", "BYTES")]
    assert http_client.get_model_metadata("tiny")["inputs"][1] == {
        "name": "image",
        "datatype": "BYTES",
        "shape": [-1, 1],
    }


def test_encoded_images_answer_as_classify_does_over_grpc_and_http(server, grpc_client, http_client):
    expected = classify(server, IMAGES, depth=2)
    for module, c in ((tgrpc, grpc_client), (thttp, http_client)):
        result = c.infer("tiny", [encoded(module, IMAGES)], parameters={"depth": 2}, priority=1)
        probs = softmax(result.as_numpy("logits"))
        for row, answer in zip(probs, expected, strict=True):
            top = [p["index"] for p in answer["predictions"]]
            assert list(np.argsort(-row, kind="stable")[:3]) == top, module.__name__
            np.testing.assert_allclose(row[top], [p["score"] for p in answer["predictions"]], rtol=1e-5)


def test_fp32_tensors_and_folder_names_choose_the_depth(grpc_client):
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)
    by_name = grpc_client.infer("tiny_d1", [fp32(tgrpc, x)])
    by_param = grpc_client.infer("tiny", [fp32(tgrpc, x)], parameters={"depth": 1})
    deepest = grpc_client.infer("tiny", [fp32(tgrpc, x)])
    assert by_name.get_response(as_json=True)["parameters"]["depth_used"]["int64_param"] == "1"
    np.testing.assert_array_equal(by_name.as_numpy("logits"), by_param.as_numpy("logits"))
    assert deepest.get_response(as_json=True)["parameters"]["depth_used"]["int64_param"] == "3"
    assert not np.allclose(deepest.as_numpy("logits"), by_name.as_numpy("logits"))


def test_typed_contents_are_read_as_raw_ones_are(server, grpc_client):
    """Inputs in `contents` (fp32_contents, bytes_contents) rather than raw_input_contents, with the raw stub."""
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8), dtype=np.float32)
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="tiny_d2")
        request.inputs.add(name="images", datatype="FP32", shape=[1, 1, 8, 8]).contents.fp32_contents.extend(x.ravel())
        typed = stub.ModelInfer(request)
        request = pb.ModelInferRequest(model_name="tiny_d2")
        request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(IMAGES[0])
        typed_bytes = stub.ModelInfer(request)
    raw = grpc_client.infer("tiny_d2", [fp32(tgrpc, x)]).as_numpy("logits")
    np.testing.assert_array_equal(np.frombuffer(typed.raw_output_contents[0], "<f4").reshape(1, 3), raw)
    from_bytes = grpc_client.infer("tiny_d2", [encoded(tgrpc, IMAGES[:1])]).as_numpy("logits")
    np.testing.assert_array_equal(np.frombuffer(typed_bytes.raw_output_contents[0], "<f4").reshape(1, 3), from_bytes)


def test_classification_is_tritons_value_index_label_largest_first(grpc_client, http_client, tiny_repo):
    labels = (tiny_repo / "tiny_d3" / "labels.txt").read_text().split()
    for module, c in ((tgrpc, grpc_client), (thttp, http_client)):
        output = module.InferRequestedOutput("logits", class_count=2)
        result = c.infer("tiny_d3", [encoded(module, IMAGES[:2])], outputs=[output])
        classes = result.as_numpy("logits")
        logits = c.infer("tiny_d3", [encoded(module, IMAGES[:2])]).as_numpy("logits")
        assert classes.shape == (2, 2)
        for row, values in zip(classes, logits, strict=True):
            order = np.argsort(-values)[:2]
            assert [e.decode() for e in row] == [f"{values[i]:f}:{i}:{labels[i]}" for i in order]


def test_model_config_is_the_folders_config_pbtxt(grpc_client, http_client):
    http_config = http_client.get_model_config("tiny_d2")
    grpc_config = grpc_client.get_model_config("tiny_d2").config
    assert http_config["name"] == grpc_config.name == "tiny_d2"
    assert http_config["input"][0]["dims"] == list(grpc_config.input[0].dims) == [1, 8, 8]
    assert http_config["max_batch_size"] == grpc_config.max_batch_size > 0
    assert http_config["output"][0]["label_filename"] == "labels.txt"
    assert http_client.get_model_config("tiny")["name"] == "tiny"  # the logical name: its default depth's folder


def test_repository_index_lists_the_model_and_every_depth_folder(grpc_client, http_client):
    names = ["tiny", "tiny_d1", "tiny_d2", "tiny_d3"]
    assert [m["name"] for m in http_client.get_model_repository_index()] == names
    index = grpc_client.get_model_repository_index().models
    assert [(m.name, m.version, m.state) for m in index] == [(n, "1", "READY") for n in names]
    for c in (grpc_client, http_client):
        with pytest.raises(InferenceServerException, match="model control is off"):
            c.load_model("tiny")


def test_statistics_count_the_requests_sent_per_depth_folder(server, tiny_repo, tmp_path):
    """A fresh server: each count is exactly what was sent, by gRPC and HTTP alike, failures included."""
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log").wait_ready()
    try:
        g, h = tgrpc.InferenceServerClient(proc.grpc_url), thttp.InferenceServerClient(f"127.0.0.1:{proc.port}")
        for _ in range(3):
            g.infer("tiny_d1", [encoded(tgrpc, IMAGES[:2])])
        h.infer("tiny", [encoded(thttp, IMAGES[:1])], parameters={"depth": 1})
        g.infer("tiny_d2", [encoded(tgrpc, IMAGES[:1])])
        with pytest.raises(InferenceServerException):
            g.infer("tiny_d1", [encoded(tgrpc, [b"not an image"])])
        d1 = g.get_inference_statistics("tiny_d1", as_json=True)["model_stats"][0]
        total = h.get_inference_statistics("tiny")["model_stats"][0]
        every = {s["name"] for s in h.get_inference_statistics()["model_stats"]}
        text = httpx.get(f"{proc.url}/metrics").text
    finally:
        proc.stop()
    assert d1["inference_stats"]["success"]["count"] == "4" and d1["inference_stats"]["fail"]["count"] == "1"
    assert d1["inference_count"] == "7"  # images
    assert total["inference_stats"]["success"]["count"] == 5 and total["inference_count"] == 8
    assert total["inference_stats"]["fail"]["count"] == 1
    assert total["inference_stats"]["queue"]["ns"] > 0 and total["inference_stats"]["compute_infer"]["ns"] > 0
    assert sum(b["compute_infer"]["count"] for b in total["batch_stats"]) == total["execution_count"] > 0
    assert every == {"tiny", "tiny_d1", "tiny_d2", "tiny_d3"}
    by_protocol = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "srvit_requests_total" and s.labels["status"] == "200":
                by_protocol[s.labels["protocol"]] = by_protocol.get(s.labels["protocol"], 0) + s.value
    assert by_protocol == {"v2_grpc": 4, "v2_http": 1}


def test_a_grpc_and_an_http_request_share_one_batch(tiny_repo, tmp_path):
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--max-queue-delay-ms", "300").wait_ready()

    async def both():
        g = tgrpc_aio.InferenceServerClient(proc.grpc_url)
        async with httpx.AsyncClient() as h:
            over_http = h.post(f"{proc.url}/v2/models/tiny_d2/infer", json={"inputs": [
                {"name": "images", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": [0.5] * 64}]})  # fmt: skip
            answers = await asyncio.gather(g.infer("tiny_d2", [fp32(tgrpc, np.zeros((1, 1, 8, 8), np.float32))]),
                                           over_http)  # fmt: skip
        await g.close()
        return answers

    try:
        _, http_answer = asyncio.run(both())
        stats = thttp.InferenceServerClient(f"127.0.0.1:{proc.port}").get_inference_statistics("tiny_d2")
    finally:
        proc.stop()
    assert http_answer.status_code == 200
    assert stats["model_stats"][0]["execution_count"] == 1
    assert stats["model_stats"][0]["batch_stats"][0]["batch_size"] == 2


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (lambda c: c.infer("nope", [encoded(tgrpc, IMAGES[:1])]), "NOT_FOUND"),
        (lambda c: c.infer("tiny", [encoded(tgrpc, IMAGES[:1])], model_version="7"), "NOT_FOUND"),
        (lambda c: c.infer("tiny", [encoded(tgrpc, [b"\x89PNG broken"])]), "INVALID_ARGUMENT"),
        (lambda c: c.infer("tiny", [fp32(tgrpc, np.zeros((1, 1, 4, 4), np.float32))]), "INVALID_ARGUMENT"),
        (
            lambda c: c.infer(
                "tiny",
                [
                    tgrpc.InferInput("images", [1, 1, 8, 8], "INT32").set_data_from_numpy(
                        np.zeros((1, 1, 8, 8), np.int32)
                    )
                ],
            ),
            "INVALID_ARGUMENT",
        ),  # fmt: skip
        (lambda c: c.infer("tiny", [encoded(tgrpc, IMAGES[:1])], parameters={"depth": 9}), "INVALID_ARGUMENT"),
        (lambda c: c.infer("tiny", [encoded(tgrpc, IMAGES[:1])], parameters={"depth": "deep"}), "INVALID_ARGUMENT"),
        (lambda c: c.infer("tiny", [encoded(tgrpc, IMAGES[:1])], timeout=-1), "INVALID_ARGUMENT"),
        (lambda c: c.infer("tiny", [encoded(tgrpc, [BIG] * 5)]), "RESOURCE_EXHAUSTED"),  # over max_body_bytes
        (lambda c: c.get_model_config("nope"), "NOT_FOUND"),
        (lambda c: c.infer("tiny", [encoded(tgrpc, IMAGES[:1])], parameters={"depth": True}), "INVALID_ARGUMENT"),
        (lambda c: c.infer("tiny", [encoded(tgrpc, IMAGES[:1]), encoded(tgrpc, IMAGES[:1])]), "INVALID_ARGUMENT"),
        (
            lambda c: c.infer("tiny", [encoded(tgrpc, IMAGES[:1])], outputs=[tgrpc.InferRequestedOutput("x")]),
            "INVALID_ARGUMENT",
        ),  # fmt: skip
    ],
)
def test_bad_requests_get_the_matching_grpc_code_and_the_server_goes_on(grpc_client, call, code):
    with pytest.raises(InferenceServerException) as error:
        call(grpc_client)
    assert error.value.status() == f"StatusCode.{code}", error.value.message()
    assert grpc_client.infer("tiny", [encoded(tgrpc, IMAGES[:1])]).as_numpy("logits").shape == (1, 3)


def test_overload_is_resource_exhausted_with_retry_info(tiny_repo, tmp_path):
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--max-in-flight", "1", "--max-queue-delay-ms", "200")
    proc.wait_ready()

    async def burst():
        async with grpc.aio.insecure_channel(proc.grpc_url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = pb.ModelInferRequest(model_name="tiny")
            request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(IMAGES[0])
            return await asyncio.gather(*[stub.ModelInfer(request) for _ in range(6)], return_exceptions=True)

    try:
        answers = asyncio.run(burst())
    finally:
        proc.stop()
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert refused and len(refused) < len(answers), answers
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        status = rpc_status.from_call(error)
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry) and retry.retry_delay.seconds >= 1


def test_the_grpc_deadline_is_the_requests_deadline(tiny_repo, tmp_path):
    """A 300 ms batch window cannot be waited out by a 50 ms deadline: DEADLINE_EXCEEDED, counted as such."""
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--max-queue-delay-ms", "300").wait_ready()
    try:
        c = tgrpc.InferenceServerClient(proc.grpc_url)
        with pytest.raises(InferenceServerException) as error:
            c.infer("tiny", [encoded(tgrpc, IMAGES[:1])], client_timeout=0.05)
        with pytest.raises(InferenceServerException) as by_parameter:
            c.infer("tiny", [encoded(tgrpc, IMAGES[:1])], timeout=50_000)  # µs
        text = httpx.get(f"{proc.url}/metrics").text
    finally:
        proc.stop()
    assert error.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert by_parameter.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    late = [s for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "srvit_requests_total" and s.labels["protocol"] == "v2_grpc"]  # fmt: skip
    assert {s.labels["status"] for s in late if s.value} <= {"504", "499"} and late


def test_unimplemented_methods_say_what_to_do(server):
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED and "send tensors" in error.value.details()


def test_grpc_health_agrees_with_readyz_through_shutdown(tiny_repo, tmp_path):
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--shutdown-delay-s", "3").wait_ready()
    with grpc.insecure_channel(proc.grpc_url) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        before = [stub.Check(health_pb2.HealthCheckRequest(service=s)).status for s in ("", SERVICE)]
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Check(health_pb2.HealthCheckRequest(service="nope"))
        proc.terminate()
        for _ in range(100):
            if httpx.get(f"{proc.url}/readyz").status_code == 503:
                break
        leaving = stub.Check(health_pb2.HealthCheckRequest()).status
        still_served = tgrpc.InferenceServerClient(proc.grpc_url).infer("tiny", [encoded(tgrpc, IMAGES[:1])])
    assert proc.proc.wait(timeout=30) == 0
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert before == [serving, serving] and unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert leaving == not_serving and still_served.as_numpy("logits").shape == (1, 3)


SERVICE = "inference.GRPCInferenceService"


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_v2_bodies_are_inflated_and_a_bomb_is_413(server, http_client, encoding):
    result = http_client.infer("tiny_d2", [encoded(thttp, IMAGES[:2])], request_compression_algorithm=encoding)
    plain = http_client.infer("tiny_d2", [encoded(thttp, IMAGES[:2])])
    np.testing.assert_array_equal(result.as_numpy("logits"), plain.as_numpy("logits"))
    zeros = b"\0" * (64 * 1024 * 1024)  # 64 MiB of zeros, about 64 KiB compressed
    bomb = gzip.compress(zeros) if encoding == "gzip" else zlib.compress(zeros)
    answer = httpx.post(f"{server.url}/v2/models/tiny/infer", content=bomb, headers={"Content-Encoding": encoding,
                        "Inference-Header-Content-Length": "10"})  # fmt: skip
    assert len(bomb) < 100_000 and answer.status_code == 413, answer.text
    damaged = httpx.post(f"{server.url}/v2/models/tiny/infer", content=bomb[:-20] + b"x" * 20,
                         headers={"Content-Encoding": encoding})  # fmt: skip
    assert damaged.status_code in (400, 413), damaged.text
    other = httpx.post(f"{server.url}/v2/models/tiny/infer", content=b"{}", headers={"Content-Encoding": "br"})
    assert other.status_code == 415


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_grpc_message_compression_is_understood(grpc_client, algorithm):
    plain = grpc_client.infer("tiny_d2", [encoded(tgrpc, IMAGES)])
    packed = grpc_client.infer("tiny_d2", [encoded(tgrpc, IMAGES)], compression_algorithm=algorithm)
    np.testing.assert_array_equal(packed.as_numpy("logits"), plain.as_numpy("logits"))


def test_sigterm_lets_a_queued_grpc_call_finish_and_refuses_new_ones_while_draining(tiny_repo, tmp_path):
    """Shutdown delay 0: SIGTERM drains at once. A call already queued (300 ms batch window) is answered; one
    sent during the drain gets UNAVAILABLE; the server exits 0."""
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--max-queue-delay-ms", "300").wait_ready()

    async def drain():
        async with tgrpc_aio.InferenceServerClient(proc.grpc_url) as c:
            queued = asyncio.ensure_future(c.infer("tiny", [encoded(tgrpc, IMAGES[:1])]))
            await asyncio.sleep(0.1)
            proc.terminate()
            await asyncio.sleep(0.05)
            try:
                await c.infer("tiny", [encoded(tgrpc, IMAGES[:1])])
                late = "served"
            except InferenceServerException as e:
                late = e.status()
            return await queued, late

    try:
        answered, late = asyncio.run(drain())
    finally:
        code = proc.proc.wait(timeout=30)
    assert answered.as_numpy("logits").shape == (1, 3)
    assert late == "StatusCode.UNAVAILABLE" and code == 0


def test_a_taken_grpc_port_stops_start_up_with_a_message(tiny_repo, tmp_path, server):
    proc = ServerProcess(tiny_repo, tmp_path / "serve.log", "--grpc-port", str(server.grpc_port))
    assert proc.proc.wait(timeout=60) == 2
    assert "cannot listen for gRPC" in proc.output()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_one_gib_gzip_bomb_is_413_and_the_servers_memory_stays_flat(server):
    """1 GiB of zeros, about 1 MB gzipped: inflated against the 16 MiB limit chunk by chunk, never whole."""
    packer, parts = zlib.compressobj(wbits=31), []  # 31: gzip framing
    zeros = b"\0" * (16 * 1024 * 1024)
    for _ in range(64):
        parts.append(packer.compress(zeros))
    bomb = b"".join(parts) + packer.flush()
    before = rss_bytes(server.proc.pid)
    answers = [httpx.post(f"{server.url}/v2/models/tiny/infer", content=bomb, timeout=30,
                          headers={"Content-Encoding": "gzip"}).status_code for _ in range(3)]  # fmt: skip
    growth = rss_bytes(server.proc.pid) - before
    print(f"bomb {len(bomb)} bytes -> 1 GiB; answers {answers}; server RSS growth {growth / 2**20:.1f} MiB")
    assert len(bomb) < 2_000_000 and answers == [413] * 3
    assert growth < 48 * 2**20  # at most the 16 MiB limit held at once, plus the compressed body
