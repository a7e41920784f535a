"""deploy/kubernetes/ checked offline as a cluster would check it: kustomize renders both overlays, every object
passes the Kubernetes schemas strictly, checkov finds nothing, and what the manifests say about srvit (its command,
port, probes, settings, grace period, user) holds for the real server."""

from __future__ import annotations

import re
import subprocess

import httpx
import pytest
import yaml
from containerfiles import FAST_START, check_settings, dockerfile_cmd, image_user, serve, tool, with_option
from manifests import ADAPTER_CONFIG, KUBERNETES_VERSION, OVERLAYS, ROOT, container, env, objects, probes, render

from bench import servers
from service.cli import GRACEFUL_CLOSE_S

KINDS = {"Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "gpu": ROOT / "docker" / "Dockerfile.gpu"}


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request, tmp_path_factory) -> tuple[str, str, dict[str, dict]]:
    """(overlay name, rendered YAML file, {kind: object})."""
    rendered = render(request.param)
    path = tmp_path_factory.mktemp(request.param) / "rendered.yaml"
    path.write_text(rendered)
    return request.param, str(path), objects(rendered)


def server_container(objs: dict[str, dict]) -> dict:
    return container(objs["Deployment"]["spec"]["template"]["spec"], "srvit")


# -- the tools ---------------------------------------------------------------------------------------


def test_both_overlays_render_every_object(overlay):
    _, _, objs = overlay
    assert set(objs) == KINDS
    assert {o["metadata"].get("namespace") for kind, o in objs.items() if kind != "Namespace"} == {"srvit"}


def kubernetes_validate(path: str) -> subprocess.CompletedProcess:
    validate = tool("kubernetes-validate", "pip install kubernetes-validate")
    return subprocess.run([validate, "--strict", "-k", KUBERNETES_VERSION, path], capture_output=True, text=True)


def test_every_object_passes_kubernetes_validate_strict(overlay):
    _, path, objs = overlay
    result = kubernetes_validate(path)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = set(re.findall(r"passed for resource (\w+)/", result.stdout))
    assert passed == {kind.lower() for kind in objs}, result.stdout  # each was checked, none only warned about


def test_strict_validation_rejects_a_misspelt_field(overlay, tmp_path):
    """The check above can fail: a probe misspelt as `readinesProbe` would otherwise be dropped silently."""
    _, _, objs = overlay
    deployment = objs["Deployment"]
    c = server_container({"Deployment": deployment})
    c["readinesProbe"] = c.pop("readinessProbe")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(deployment))
    result = kubernetes_validate(str(tmp_path / "bad.yaml"))
    assert result.returncode != 0 and "readinesProbe" in result.stdout + result.stderr


def test_checkov_fails_no_check_on_the_rendered_manifests_and_the_dockerfiles(overlay):
    name, path, objs = overlay
    checkov = tool("checkov", "make .venv-checkov/bin/checkov")
    argv = [checkov, "--quiet", "--compact", "--skip-download", "--framework", "kubernetes", "dockerfile",
            "-f", path, "-f", str(DOCKERFILES[name])]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, env={"BC_SKIP_MAPPING": "TRUE", "PATH": "/usr/bin"})
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    summaries = re.findall(r"Passed checks: (\d+), Failed checks: (\d+), Skipped checks: (\d+)", result.stdout)
    assert len(summaries) == 2, result.stdout  # one per framework: both really ran
    assert all(int(passed) > 50 and int(failed) == 0 for passed, failed, _ in summaries), summaries
    for kind, obj in objs.items():  # every skip says why, inline, where it applies
        for key, value in obj["metadata"].get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                check, _, why = value.partition("=")
                assert re.fullmatch(r"CKV2?_\w+", check) and len(why.split()) >= 5, f"{kind}: {value}"


# -- srvit's side of the manifests --------------------------------------------------------------------


def test_container_runs_the_images_command_with_real_settings(overlay):
    name, _, objs = overlay
    c = server_container(objs)
    assert "command" not in c and "args" not in c  # the image's CMD: srvit serve on 0.0.0.0:8000, PID 1
    cmd = dockerfile_cmd(DOCKERFILES[name])
    port = cmd[cmd.index("--port") + 1]
    settings = check_settings(env(c))
    http, grpc = c["ports"]
    assert (http["name"], str(http["containerPort"])) == ("http", port)
    assert (grpc["name"], grpc["containerPort"]) == ("grpc", settings.grpc_port) and settings.grpc_port
    annotations = objs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (port, "/metrics")
    service_ports = objs["Service"]["spec"]["ports"]
    assert [(p["name"], p["targetPort"]) for p in service_ports] == [("http", "http"), ("grpc", "grpc")]
    assert service_ports[1]["appProtocol"] == "kubernetes.io/h2c"
    policy_ports = objs["NetworkPolicy"]["spec"]["ingress"][0]["ports"]
    assert [p["port"] for p in policy_ports] == ["http", "grpc"]


def test_grace_period_outlasts_the_shutdown_delay_and_the_drain(overlay):
    _, _, objs = overlay
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    settings = check_settings(env(server_container(objs)))
    assert (
        pod["terminationGracePeriodSeconds"] > settings.shutdown_delay_s + settings.drain_timeout_s + GRACEFUL_CLOSE_S
    )


def test_pods_run_locked_down_as_the_images_user(overlay):
    name, _, objs = overlay
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    c = server_container(objs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == image_user(DOCKERFILES[name]) != 0
    assert pod["automountServiceAccountToken"] is False
    security = c["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}  # uploads spool there: writable despite the above
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][bound])


def test_onnx_runtime_threads_match_the_cpu_limit(overlay):
    _, _, objs = overlay
    c = server_container(objs)
    assert int(env(c)["SRVIT_INTRA_OP_THREADS"]) <= int(c["resources"]["limits"]["cpu"])


def test_gpu_overlay_asks_for_one_gpu_and_the_gpu_image(overlay):
    name, _, objs = overlay
    c = server_container(objs)
    gpus = {bound: c["resources"][bound].get("nvidia.com/gpu") for bound in ("requests", "limits")}
    if name == "gpu":
        assert gpus == {"requests": "1", "limits": "1"}
        assert c["image"].split(":")[0].endswith("srvit-gpu")
        assert env(c)["SRVIT_PROVIDERS"].split(",")[0] == "tensorrt"
        pod = objs["Deployment"]["spec"]["template"]["spec"]
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    else:
        assert gpus == {"requests": None, "limits": None} and "SRVIT_PROVIDERS" not in env(c)


def test_selectors_autoscaler_and_disruption_budget_agree(overlay):
    _, _, objs = overlay
    deployment, hpa, pdb = objs["Deployment"], objs["HorizontalPodAutoscaler"], objs["PodDisruptionBudget"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        pdb["spec"]["selector"]["matchLabels"],
        objs["Service"]["spec"]["selector"],
        objs["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= pod_labels.items()
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "srvit"}
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]  # a drain always leaves one serving
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_autoscalers_metric_is_the_one_prometheus_adapter_exposes(overlay):
    _, _, objs = overlay
    (rule,) = yaml.safe_load(ADAPTER_CONFIG.read_text())["rules"]
    pods = [m["pods"] for m in objs["HorizontalPodAutoscaler"]["spec"]["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == [rule["name"]["as"]]
    assert 0 < float(pods[0]["target"]["averageValue"].removesuffix("m")) / 1000 < 1  # a share of requests


@pytest.fixture(scope="module")
def deployed(tiny_repo, tmp_path_factory):
    """The CPU overlay's container as Kubernetes would start it: the image's CMD with the manifest's settings,
    moved to loopback and a free port."""
    objs = objects(render("cpu"))
    c = server_container(objs)
    port = servers.free_port()
    argv = with_option(with_option(dockerfile_cmd(DOCKERFILES["cpu"]), "--host", "127.0.0.1"), "--port", str(port))
    variables = env(c) | FAST_START | {"SRVIT_REPO": str(tiny_repo)}
    server = serve(argv, variables, tmp_path_factory.mktemp("deployed") / "serve.log", port)
    yield server, c
    servers.stop(server.process)


def test_every_probe_gets_200_from_a_ready_server(deployed):
    server, c = deployed
    found = probes(c)
    assert set(found) == {"startupProbe", "livenessProbe", "readinessProbe"}
    for kind, probe in found.items():
        assert probe["httpGet"]["port"] == "http"
        response = httpx.get(server.url + probe["httpGet"]["path"], timeout=probe["timeoutSeconds"])
        assert response.status_code == 200, (kind, response.text)
    assert found["readinessProbe"]["httpGet"]["path"] == "/readyz"  # turns unready on SIGTERM, before refusing
