"""deploy/kserve/inferenceservice.yaml against the openAPIV3Schema of KServe's own CRD (vendored, v0.20.0),
strictly, and its predictor container started for real with its own command: V2 on KServe's port."""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest
import tritonclient.grpc
import yaml
from containerfiles import FAST_START, check_settings, image_user, serve, with_option
from manifests import KSERVE, ROOT, container, env, probes

from bench import servers
from service.cli import GRACEFUL_CLOSE_S

CRD = ROOT / "deploy" / "kserve" / "crd" / "serving.kserve.io_inferenceservices.yaml.gz"
KSERVE_HTTP_PORT = 8080  # KServe routes a predictor's HTTP traffic here (its InferenceServiceDefaultHttpPort)
KSERVE_GRPC_PORT = 8081  # and gRPC here (InferenceServiceDefaultGrpcPort)


def strict(schema: dict) -> dict:
    """The CRD schema rejecting unknown fields, as the API server's strict field validation does: an object with
    declared properties and no additionalProperties or x-kubernetes-preserve-unknown-fields allows no others."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):  # fmt: skip
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def validator() -> jsonschema.Validator:
    crd = yaml.load(gzip.decompress(CRD.read_bytes()), Loader=yaml.CSafeLoader)  # 2 MB: the C parser
    assert crd["spec"]["names"]["kind"] == "InferenceService"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # the API server checks metadata itself
    return jsonschema.Draft7Validator(schema)


def isvc() -> dict:
    return yaml.safe_load(KSERVE.read_text())


def predictor_container(doc: dict) -> dict:
    return container(doc["spec"]["predictor"], "kserve-container")


def errors(validator: jsonschema.Validator, doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_inferenceservice_validates_against_kserves_crd(validator):
    doc = isvc()
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert errors(validator, doc) == []


def test_the_schema_check_rejects_a_misspelt_field_and_a_wrong_type(validator):
    misspelt, wrong_type = isvc(), isvc()
    c = predictor_container(misspelt)
    c["readinesProbe"] = c.pop("readinessProbe")
    predictor_container(wrong_type)["ports"][0]["containerPort"] = "8080"
    assert any("readinesProbe" in e for e in errors(validator, misspelt))
    assert any("containerPort" in e for e in errors(validator, wrong_type))


def test_predictor_speaks_on_kserves_port_as_a_locked_down_non_root_user():
    doc = isvc()
    predictor, c = doc["spec"]["predictor"], predictor_container(doc)
    command = c["command"]
    assert command[:2] == ["srvit", "serve"] and command[command.index("--port") + 1] == str(KSERVE_HTTP_PORT)
    assert [p["containerPort"] for p in c["ports"]] == [KSERVE_HTTP_PORT]  # the one port KServe routes
    assert check_settings(env(c)).grpc_port == KSERVE_GRPC_PORT
    annotations = doc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert (annotations["prometheus.kserve.io/port"], annotations["prometheus.kserve.io/path"]) == ("8080", "/metrics")
    assert predictor["securityContext"]["runAsUser"] == image_user(ROOT / "docker" / "Dockerfile")
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    settings = check_settings(env(c))
    assert predictor["terminationGracePeriodSeconds"] > (
        settings.shutdown_delay_s + settings.drain_timeout_s + GRACEFUL_CLOSE_S
    )


@pytest.fixture(scope="module")
def predictor(tiny_repo, tmp_path_factory):
    """kserve-container's own command and settings, moved to loopback and a free port."""
    c = predictor_container(isvc())
    port, grpc_port = servers.free_port(), servers.free_port()
    argv = with_option(with_option(c["command"], "--host", "127.0.0.1"), "--port", str(port))
    variables = env(c) | FAST_START | {"SRVIT_REPO": str(tiny_repo), "SRVIT_GRPC_PORT": str(grpc_port)}
    server = serve(argv, variables, Path(tmp_path_factory.mktemp("kserve")) / "serve.log", port)
    server.grpc_url = f"127.0.0.1:{grpc_port}"
    yield server, c
    servers.stop(server.process)


def test_predictor_answers_its_probes_and_v2_and_exports_metrics(predictor):
    server, c = predictor
    found = probes(c)
    assert {p["httpGet"]["path"] for p in found.values()} == {"/v2/health/ready", "/v2/health/live"}
    for kind, probe in found.items():
        assert probe["httpGet"]["port"] == KSERVE_HTTP_PORT
        assert httpx.get(server.url + probe["httpGet"]["path"], timeout=2).status_code == 200, kind
    assert httpx.get(f"{server.url}/v2", timeout=5).json()["name"]
    (model, *_) = httpx.get(f"{server.url}/v1/models", timeout=5).json()["models"]
    name = model["name"]
    assert httpx.get(f"{server.url}/v2/models/{name}/ready", timeout=5).json() == {"name": name, "ready": True}
    metadata = httpx.get(f"{server.url}/v2/models/{name}", timeout=5).json()
    tensor, encoded = metadata["inputs"]
    assert (tensor["datatype"], encoded["datatype"]) == ("FP32", "BYTES")
    n, *chw = tensor["shape"]
    body = {"inputs": [{"name": tensor["name"], "datatype": "FP32", "shape": [1, *chw],
                        "data": [0.5] * int(np.prod(chw))}]}  # fmt: skip
    answer = httpx.post(f"{server.url}/v2/models/{name}/infer", json=body, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["shape"][0] == 1
    metrics = httpx.get(server.url + "/metrics", timeout=5)
    assert metrics.status_code == 200 and "srvit_ready 1.0" in metrics.text
    grpc_client = tritonclient.grpc.InferenceServerClient(server.grpc_url)
    assert grpc_client.is_server_ready() and grpc_client.is_model_ready(name)
