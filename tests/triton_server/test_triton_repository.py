"""A real tritonserver reads model_repo/: every config.pbtxt gets past Triton's own parsing and validation, and each
model then fails only because the server has no onnxruntime backend."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import tritonclient.http as triton_http

from bench import servers

ROOT = Path(__file__).resolve().parents[2]
MODEL_REPO = ROOT / "model_repo"
VENV = ROOT / ".venv-pytriton"
INSTALL = "run `make .venv-pytriton` (or `bash scripts/pytriton-venv.sh`)"
READY_TIMEOUT_S = 60.0  # Triton opens HTTP only once every model's load has been tried: under a second here
# nvidia-pytriton's wheel ships tritonserver with the Python backend only; a model whose config Triton accepts fails
# at this point of loading, after its config was parsed, validated and normalised.
MISSING_BACKEND = "unable to find backend library for backend 'onnxruntime'"
# Triton 2.51's log lines for the two ways a folder fails: its config.pbtxt does not parse or validate (Triton then
# lists the folder in the repository index without a state or reason), or the model it describes does not load.
CONFIG_ERROR = re.compile(r"""Poll failed for model directory '(?P<model>[^']+)': (?P<reason>.*)"$""", re.MULTILINE)
LOAD_ERROR = re.compile(r"""failed to load '(?P<model>[^']+)' version \d+: (?P<reason>.*)"$""", re.MULTILINE)
SERVER_VERSION = re.compile(r"^\| server_version +\| (\S+)", re.MULTILINE)
# Found by the venv's interpreter without importing pytriton (its __init__ imports numpy, zmq, sh, tritonclient).
FIND_PACKAGE = "import importlib.util; print(importlib.util.find_spec('pytriton').origin)"
# Every model loaded once at start-up; a config must stand as written (no backend auto-completes it); the server
# stays up after failed loads so its repository index can be read; loopback HTTP only, no gRPC, metrics or memory pools.
FLAGS = ["--model-control-mode=none", "--disable-auto-complete-config", "--exit-on-error=false",
         "--exit-timeout-secs=5", "--http-address=127.0.0.1", "--allow-grpc=false", "--allow-metrics=false",
         "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]  # fmt: skip


@dataclass(frozen=True)
class Tritonserver:
    """Where nvidia-pytriton keeps the server, found as pytriton.utils.distribution finds it."""

    package: Path  # site-packages/pytriton

    @property
    def binary(self) -> Path:
        return self.package / "tritonserver" / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.package / "tritonserver" / "backends"

    @property
    def libs(self) -> Path:
        """auditwheel's folder of bundled libraries (libtritonserver, libcudart, ...)."""
        return self.package.parent / "nvidia_pytriton.libs"


@dataclass(frozen=True)
class Verdict:
    stage: str  # "config": Triton refused config.pbtxt; "load": it accepted the config and the load failed
    reason: str


@pytest.fixture(scope="module")
def tritonserver() -> Tritonserver:
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"no {VENV.name}: {INSTALL}; it holds the tritonserver binary this test starts", pytrace=False)
    found = subprocess.run([python, "-c", FIND_PACKAGE], capture_output=True, text=True)
    server = Tritonserver(Path(found.stdout.strip()).parent)
    if found.returncode != 0 or not os.access(server.binary, os.X_OK):
        pytest.fail(f"{VENV.name} has no nvidia-pytriton tritonserver: {INSTALL}\n{found.stderr}", pytrace=False)
    return server


def command(server: Tritonserver, repo: Path, port: int) -> list[str]:
    return [str(server.binary), f"--model-repository={repo}", f"--backend-directory={server.backends}",
            f"--http-port={port}", *FLAGS]  # fmt: skip


def environment(server: Tritonserver) -> dict[str, str]:
    """As pytriton's TritonServer._get_env: the bundled libraries appended to LD_LIBRARY_PATH (the binary's RPATH
    names them too; the backends it loads have only this)."""
    library_path = os.pathsep.join(filter(None, [os.environ.get("LD_LIBRARY_PATH"), str(server.libs)]))
    return os.environ | {"LD_LIBRARY_PATH": library_path}


def load_attempts(server: Tritonserver, repo: Path, log: Path) -> tuple[dict[str, Verdict], list[str]]:
    """({model folder: why Triton did not load it}, the folders its repository index lists), from one start."""
    port = servers.free_port()
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(command(server, repo, port), env=environment(server), stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    try:
        servers.wait_ready(servers.Server(f"http://127.0.0.1:{port}", process, {}, log), READY_TIMEOUT_S,
                           "/v2/health/live")  # fmt: skip
        version = SERVER_VERSION.search(log.read_text(errors="replace"))
        print(f"\ntritonserver {version and version[1]} tried every model in {time.monotonic() - started:.2f} s")
        index = triton_http.InferenceServerClient(f"127.0.0.1:{port}").get_model_repository_index()
    finally:
        servers.stop(process, timeout_s=10)
    return verdicts(log.read_text(errors="replace")), [entry["name"] for entry in index]


def verdicts(log: str) -> dict[str, Verdict]:
    found = {m["model"]: Verdict("config", m["reason"]) for m in CONFIG_ERROR.finditer(log)}
    return found | {m["model"]: Verdict("load", m["reason"]) for m in LOAD_ERROR.finditer(log)}


def model_folders(repo: Path) -> set[str]:
    return {path.name for path in repo.iterdir() if path.is_dir()}


def copy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "model_repo"
    shutil.copytree(MODEL_REPO, repo)
    assert model_folders(repo), f"{MODEL_REPO} has no model folders"
    return repo


def report(seen: dict[str, Verdict]) -> None:
    for model, verdict in sorted(seen.items()):
        print(f"  {model}: {verdict.stage}: {verdict.reason}")


def failed_only_for_the_backend(verdict: Verdict | None) -> bool:
    return verdict is not None and verdict.stage == "load" and MISSING_BACKEND in verdict.reason


def other_outcomes(seen: dict[str, Verdict], folders: set[str]) -> dict[str, Verdict | None]:
    """The folders whose config did not pass or whose load failed for another reason (None: Triton said nothing)."""
    return {f: seen.get(f) for f in sorted(folders) if not failed_only_for_the_backend(seen.get(f))}


def test_every_model_config_passes_triton_and_only_the_backend_is_missing(tritonserver, tmp_path):
    repo = copy_repo(tmp_path)
    seen, index = load_attempts(tritonserver, repo, tmp_path / "tritonserver.log")
    report(seen)
    folders = model_folders(repo)
    assert set(index) == folders
    assert other_outcomes(seen, folders) == {}


def misspell_max_batch_size(config: str) -> str:
    return re.sub(r"^max_batch_size:", "max_batch_sizes:", config, count=1, flags=re.MULTILINE)


def prefer_a_batch_above_the_max(config: str) -> str:
    """A preferred batch size twice max_batch_size: text that parses, values Triton's validation refuses."""
    max_batch = int(re.search(r"^max_batch_size: (\d+)", config, re.MULTILINE)[1])
    return re.sub(r"preferred_batch_size: \[[^\]]*\]", f"preferred_batch_size: [ {2 * max_batch} ]", config, count=1)


# (how one folder's config.pbtxt is damaged, what Triton's reason for refusing it says)
DAMAGES = [
    pytest.param(misspell_max_batch_size, "failed to read text proto", id="unknown-field"),
    pytest.param(prefer_a_batch_above_the_max, "preferred size must be <= max batch size", id="invalid-value"),
]


@pytest.mark.parametrize(("damage", "expected"), DAMAGES)
def test_a_config_triton_refuses_is_reported_as_a_config_error(tritonserver, tmp_path, damage, expected):
    repo = copy_repo(tmp_path)
    broken, *others = sorted(model_folders(repo))
    config = repo / broken / "config.pbtxt"
    text = config.read_text()
    assert damage(text) != text, f"{damage.__name__} found nothing to change in {config}"
    config.write_text(damage(text))
    seen, _ = load_attempts(tritonserver, repo, tmp_path / "tritonserver.log")
    report(seen)
    assert other_outcomes(seen, {broken, *others}) == {broken: seen.get(broken)}
    assert seen[broken].stage == "config" and expected in seen[broken].reason
