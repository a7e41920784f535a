"""The serving image's install, for real: what docker/Dockerfile copies, pip-installed without extras into a fresh
venv (no torch, no model library, no benchmark tools), serves the embedded model with `srvit serve`."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from containerfiles import ROOT, instructions
from PIL import Image

from bench import servers

FAST = ["--warmup-batch-sizes", "1", "--warmup-runs", "1", "--intra-op-threads", "1", "--shutdown-delay-s", "0"]

ABSENT = ("torch", "srvit", "export", "bench", "aiohttp", "httpx", "rich")


def build_context(dest: Path) -> Path:
    """The build stage's COPY sources (model_repo/ is copied later, into the final stage)."""
    for keyword, args in instructions():
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, _ = args.split()
        for source in sources:
            src = ROOT / source.rstrip("/")
            if src.is_dir():
                shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy(src, dest / src.name)
    return dest


@pytest.fixture(scope="module")
def serving_venv(tmp_path_factory) -> Path:
    """A fresh venv with the base install only, made by the running interpreter as the image's python makes one."""
    context = build_context(tmp_path_factory.mktemp("context"))
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    result = subprocess.run([*pip, str(context)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return venv


def test_the_base_install_has_no_training_export_or_benchmark_packages(serving_venv, tmp_path):
    code = f"import importlib.util as u; print([m for m in {ABSENT!r} if u.find_spec(m)])"
    python = str(serving_venv / "bin" / "python")  # run outside the checkout, whose folders would be importable
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_base_install_serves_the_embedded_model(serving_venv, tmp_path):
    srvit = str(serving_venv / "bin" / "srvit")
    help_ = subprocess.run([srvit, "serve", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--latency-target-ms" in help_.stdout, help_.stderr
    port = servers.free_port()
    log = tmp_path / "serve.log"
    grpc_port = str(servers.free_port())  # the base install serves gRPC too
    argv = [srvit, "serve", "--repo", str(ROOT / "model_repo"), "--port", str(port), "--grpc-port", grpc_port, *FAST]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SRVIT_")}
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    server = servers.Server(f"http://127.0.0.1:{port}", process, env, log)
    image = io.BytesIO()
    Image.new("L", (28, 28), 128).save(image, format="PNG")
    try:
        servers.wait_ready(server, 120)
        r = httpx.post(f"{server.url}/classify", content=image.getvalue(), headers={"Content-Type": "image/png"},
                       timeout=30)  # fmt: skip
    finally:
        servers.stop(process)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "srvit_fashion" and r.json()["depth_used"] == 4 and process.returncode == 0
