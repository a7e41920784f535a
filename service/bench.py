"""`srvit bench`: load a running server, check its accuracy over HTTP, or run the benchmark matrix end to end."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from service import loadgen
from service.loadgen import Target

BATCH_SIZE_METRIC = "srvit_batch_size_images"  # histogram of formed batches, labels model and depth
READY_TIMEOUT_S = 300.0  # start-up times every depth at several batch sizes: slow on two busy cores

console = Console()


# -- arguments --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="mode", required=True)
    load = sub.add_parser("load", help="closed-loop (--concurrency) or open-loop (--rate) load on a running server")
    _client_options(load)
    load.add_argument("--concurrency", type=_ints, default=[1, 8, 32], help="workers per run, e.g. 1,8,32")
    load.add_argument("--rate", type=_floats, default=None, help="open loop instead: requests/s per run, e.g. 50,100")
    load.add_argument("--depth", type=_depths, default=["1"], help="depths per run, e.g. 1,4,auto")
    load.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    load.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each run")
    load.add_argument("--images", type=int, default=1000, help="distinct test images cycled through")
    load.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")

    acc = sub.add_parser("accuracy", help="top-1 of every test image sent over HTTP, next to the manifest's")
    _client_options(acc)
    acc.add_argument("--depth", type=_depths, default=["1", "2", "3", "4"], help="depths to check, e.g. 1,2,3,4")
    acc.add_argument("--concurrency", type=int, default=16)
    acc.add_argument("--limit", type=int, default=None, help="only the first N test images")
    acc.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")

    matrix = sub.add_parser("matrix", help="start servers, run the benchmark matrix, write docs/benchmarks/")
    matrix.add_argument("--repo", type=Path, default=Path("model_repo"), help="model repository to serve")
    matrix.add_argument("--model", default=None, help="model name in the repository (default: the only one)")
    matrix.add_argument("--data", type=Path, default=loadgen.FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder")
    matrix.add_argument("--concurrency", type=_ints, default=[1, 8, 32], help="workers per run, e.g. 1,8,32")
    matrix.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    matrix.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    matrix.add_argument("--latency-target-ms", type=float, default=100.0, help="SRVIT_LATENCY_TARGET_MS, auto run")
    matrix.add_argument("--overload", type=float, default=1.5, help="auto run: offered rate / max-depth capacity")
    matrix.add_argument("--raw-seconds", type=float, default=5.0, help="raw ONNX Runtime time per depth")
    matrix.add_argument("--server-cpus", type=_cpus, default=None, help="pin the server to these CPUs, e.g. 1-3")
    matrix.add_argument("--client-cpus", type=_cpus, default=None, help="pin this load generator, e.g. 0")
    matrix.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="folder for <tag>.json and .md")
    matrix.add_argument("--tag", default="cpu", help="file name stem of the results")


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", default=None, help="model name (default: the server's default)")
    p.add_argument("--data", type=Path, default=loadgen.FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request, seconds")


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers like 1,8,32, got {text!r}")
    return values


def _floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"need positive numbers like 50,100, got {text!r}")
    return values


def _depths(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v != "auto" and not (v.isdigit() and int(v) >= 1) for v in values):
        raise argparse.ArgumentTypeError(f"need depths like 1,4,auto, got {text!r}")
    return values


def _cpus(text: str) -> set[int]:
    """'0,2-3' -> {0, 2, 3}, the taskset notation."""
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def main(args: argparse.Namespace) -> int:
    return {"load": run_load, "accuracy": run_accuracy, "matrix": run_matrix}[args.mode](args)


# -- load -------------------------------------------------------------------------------------------


def load_pngs(data: Path, count: int | None = None) -> tuple[list[bytes], np.ndarray]:
    """The first `count` Fashion-MNIST test images as PNG files, and their labels."""
    images, labels = loadgen.fashion_mnist_test(data)
    images, labels = images[:count], labels[:count]
    return [loadgen.encode_png(image) for image in images], labels


def measure(target: Target, pngs: list[bytes], *, concurrency: int | None = None, rate: float | None = None,
            duration_s: float, warmup_s: float) -> dict:  # fmt: skip
    """One run, closed loop at `concurrency` or open loop at `rate`, summarized."""
    if rate is not None:
        run = asyncio.run(loadgen.open_loop(target, pngs, rate, duration_s, warmup_s))
    else:
        run = asyncio.run(loadgen.closed_loop(target, pngs, concurrency, duration_s, warmup_s))
    loop = {"concurrency": concurrency} if rate is None else {"rate": rate}
    return {"depth": target.depth, **loop, **loadgen.summarize(run)}


def run_load(args: argparse.Namespace) -> int:
    pngs, _ = load_pngs(args.data, args.images)
    loads = [{"rate": r} for r in args.rate] if args.rate else [{"concurrency": c} for c in args.concurrency]
    rows = []
    for depth in args.depth:
        target = Target(args.url, depth, args.model, args.timeout)
        for load in loads:
            rows.append(measure(target, pngs, **load, duration_s=args.duration, warmup_s=args.warmup))
            console.print(_load_line(rows[-1]))
    console.print(load_table(rows, "srvit bench load"))
    if args.json:
        _write_json(args.json, {"url": args.url, "rows": rows})
    return 0 if all(row["ok"] for row in rows) else 1


def _load_line(row: dict) -> str:
    lat = row["latency_ms"]
    load = f"c={row['concurrency']}" if "concurrency" in row else f"rate={row['rate']:g}/s"
    return (
        f"depth={row['depth']} {load}: {row['images_per_s']:.1f} images/s, p50 {_num(lat['p50'])} ms, "
        f"p99 {_num(lat['p99'])} ms, errors {row['errors'] or 0}"
    )


def load_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("depth", "load", "images/s", "p50 ms", "p95 ms", "p99 ms", "errors", "depth mix"):
        table.add_column(column, justify="right")
    for row in rows:
        lat = row["latency_ms"]
        load = f"c={row['concurrency']}" if "concurrency" in row else f"{row['rate']:g}/s"
        table.add_row(
            row["depth"], load, f"{row['images_per_s']:.1f}", *(_num(lat[p]) for p in ("p50", "p95", "p99")),
            _errors(row["errors"]), _mix(row["depth_mix"]),
        )  # fmt: skip
    return table


def _num(value: float | None) -> str:
    """One decimal, or '-' where there is nothing to show (no answers, no batch)."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _errors(errors: dict) -> str:
    return " ".join(f"{status}:{n}" for status, n in errors.items()) or "0"


def _mix(mix: dict) -> str:
    return " ".join(f"d{d}:{share:.0%}" for d, share in mix.items())


# -- accuracy ---------------------------------------------------------------------------------------


def run_accuracy(args: argparse.Namespace) -> int:
    pngs, labels = load_pngs(args.data, args.limit)
    reference = manifest_accuracy(args.url, args.model)
    rows = []
    for depth in args.depth:
        target = Target(args.url, depth, args.model, args.timeout)
        results = asyncio.run(loadgen.sweep(target, pngs, args.concurrency))
        rows.append(accuracy_row(depth, results, labels, reference.get(depth)))
    console.print(accuracy_table(rows))
    if args.json:
        _write_json(args.json, {"url": args.url, "rows": rows})
    return 0 if all(row["errors"] == {} for row in rows) else 1


def manifest_accuracy(url: str, model: str | None) -> dict[str, float]:
    """{depth: top-1} as the export measured it, from GET /v1/models; depths without a measurement are absent."""
    listed = httpx.get(f"{url}/v1/models", timeout=10).raise_for_status().json()["models"]
    entry = next((m for m in listed if model in (None, m["name"])), None)
    if entry is None:
        raise SystemExit(f"model {model!r} is not served at {url}; it serves {[m['name'] for m in listed]}")
    found = {}
    for depth in entry.get("depths", []):
        accuracy = depth.get("accuracy")
        if accuracy and accuracy.get("top1") is not None:
            found[str(depth["depth"])] = accuracy["top1"]
    return found


def accuracy_row(depth: str, results: list[loadgen.Result], labels: np.ndarray, reference: float | None) -> dict:
    answered = [(r.index, int(label)) for r, label in zip(results, labels, strict=True) if r.status == 200]
    top1 = sum(index == label for index, label in answered) / len(answered) if answered else math.nan
    errors = loadgen.summarize(loadgen.Run(results, (0.0, 1.0)))["errors"]
    diff = top1 - reference if reference is not None else None
    return {"depth": depth, "images": len(results), "answered": len(answered), "top1_http": top1,
            "top1_manifest": reference, "difference": diff, "errors": errors}  # fmt: skip


def accuracy_table(rows: list[dict]) -> Table:
    table = Table(title="top-1 over HTTP vs the export's own measurement")
    for column in ("depth", "images", "top-1 (HTTP)", "top-1 (manifest)", "difference", "errors"):
        table.add_column(column, justify="right")
    for row in rows:
        ref, diff = row["top1_manifest"], row["difference"]
        table.add_row(
            row["depth"], str(row["images"]), f"{row['top1_http']:.4f}", "-" if ref is None else f"{ref:.4f}",
            "-" if diff is None else f"{diff:+.4f}", _errors(row["errors"]),
        )  # fmt: skip
    return table


# -- servers started here ---------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    env: dict[str, str]
    log: Path

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=10).raise_for_status().text

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process so far (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(repo: Path, port: int) -> list[str]:
    """`srvit serve` through this interpreter, so it runs the same installation as the benchmark."""
    return [sys.executable, "-m", "srvit.cli", "serve", "--repo", str(repo), "--host", "127.0.0.1", "--port", str(port)]


@contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """This process, and whatever it starts meanwhile, on `cpus` only; the previous mask afterwards."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@contextmanager
def served(repo: Path, env: dict[str, str], cpus: set[int] | None = None,
           ready_timeout_s: float = READY_TIMEOUT_S) -> Iterator[Server]:  # fmt: skip
    """A `srvit serve` subprocess with exactly these SRVIT_* settings (the caller's own are dropped), ready."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SRVIT_")}
    log = Path(tempfile.mkstemp(prefix="srvit-serve-", suffix=".log")[1])
    with pinned(cpus), log.open("wb") as out:  # the server and every thread it starts inherit the mask
        process = subprocess.Popen(serve_command(repo, port), env=clean | env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, env, log)
    try:
        wait_ready(server, ready_timeout_s)
        yield server
    finally:
        stop(process)


def wait_ready(server: Server, timeout_s: float, path: str = "/readyz") -> None:
    """Until GET `path` answers 200; a process that exits or outstays `timeout_s` raises with its log's tail."""
    name = Path(str(server.process.args[0])).name
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.process.returncode}:\n{_tail(server.log)}")
        try:
            if httpx.get(f"{server.url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{name} was not ready after {timeout_s:.0f} s:\n{_tail(server.log)}")


def stop(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM (the server drains), then SIGKILL if it outstays `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def batch_histogram(metrics_text: str, model: str, depth: int) -> tuple[float, float]:
    """(sum, count) of the formed-batch-size histogram for one (model, depth), 0 before any batch ran."""
    total = count = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != BATCH_SIZE_METRIC:
            continue
        for sample in family.samples:
            if sample.labels.get("model") == model and sample.labels.get("depth") == str(depth):
                if sample.name.endswith("_sum"):
                    total = sample.value
                elif sample.name.endswith("_count"):
                    count = sample.value
    return total, count


def mean_batch(before: str, after: str, model: str, depth: int) -> float | None:
    """Mean images per batch formed between two /metrics scrapes."""
    (s0, c0), (s1, c1) = batch_histogram(before, model, depth), batch_histogram(after, model, depth)
    return (s1 - s0) / (c1 - c0) if c1 > c0 else None


# -- matrix -----------------------------------------------------------------------------------------

# Only what differs from the server's defaults is set; the defaults themselves are recorded from Settings.
BATCHING = {"on": {}, "off": {"SRVIT_MAX_BATCH_SIZE": "1"}}
SERVER_SETTINGS = ("max_batch_size", "max_queue_delay_ms", "max_queue_images", "intra_op_threads", "intra_op_spinning",
                   "preprocess_threads", "providers", "log_level")  # fmt: skip


def caller_settings() -> dict[str, str]:
    """The SRVIT_* variables the matrix was started with: its servers run with them, as its raw ONNX Runtime
    runs and its recorded server settings do, so `SRVIT_MAX_QUEUE_DELAY_MS=0 srvit bench matrix` measures that."""
    return {k: v for k, v in os.environ.items() if k.startswith("SRVIT_")}


def run_matrix(args: argparse.Namespace) -> int:
    from service.repository import load_repository

    model = _pick_model(load_repository(args.repo), args.model)
    pngs, _ = load_pngs(args.data, 1000)
    report = {"machine": machine_facts(), "setup": setup_facts(args, model), "server_runs": [], "raw": [], "auto": []}
    _warn_if_busy(report["machine"])
    depths = sorted({model.depths[0], model.max_depth})
    with pinned(args.client_cpus):
        for batching, env in BATCHING.items():
            report["server_runs"] += server_runs(args, model, pngs, batching, env, depths)
        report["raw"] = raw_runs(args, model, report["server_runs"], depths)
        report["auto"] = auto_runs(args, model, pngs, report["server_runs"])
    write_report(report, args.out, args.tag)
    return 0


def _warn_if_busy(machine: dict) -> None:
    load, cpus = machine["loadavg_at_start"][0], machine["cpus_usable"]
    if load > 0.5 * cpus:
        console.print(f"[yellow]warning:[/] load average {load:.1f} on {cpus} CPUs: something else is running, "
                      "and these numbers will show its share, not the server's")  # fmt: skip


def _pick_model(models: dict, name: str | None):
    if name is None and len(models) == 1:
        return next(iter(models.values()))
    if name not in models:
        raise SystemExit(f"pick a model with --model: the repository holds {sorted(models)}")
    return models[name]


def server_runs(args, model, pngs, batching: str, env: dict, depths: list[int]) -> list[dict]:
    """Closed-loop runs at every concurrency and depth on one server, with its batches and CPU time per run."""
    rows = []
    with served(args.repo, caller_settings() | env, args.server_cpus) as server:
        for depth in depths:
            target = Target(server.url, str(depth), model.name)
            for concurrency in args.concurrency:
                before, cpu0 = server.metrics(), server.cpu_s()
                row = measure(target, pngs, concurrency=concurrency, duration_s=args.duration, warmup_s=args.warmup)
                after, cpu1 = server.metrics(), server.cpu_s()
                total_s = args.duration + args.warmup  # both CPU times include the warm-up
                row |= {"batching": batching, "mean_batch": mean_batch(before, after, model.name, depth),
                        "server_cpu_cores": (cpu1 - cpu0) / total_s,
                        "client_cpu_cores": row["client_cpu_s"] / total_s}  # fmt: skip
                console.print(f"batching {batching}: " + _load_line(row))
                rows.append(row)
    return rows


def raw_runs(args, model, rows: list[dict], depths: list[int]) -> list[dict]:
    """ONNX Runtime alone, with the server's session options and providers, at the batch size the server
    formed at its highest concurrency, on the server's cores; the server is stopped, so nothing competes."""
    saturated = {r["depth"]: r for r in rows if r["batching"] == "on" and r["concurrency"] == max(args.concurrency)}
    out = []
    for depth in depths:
        server_row = saturated[str(depth)]
        batch = max(1, round(server_row["mean_batch"] or 1))
        with pinned(args.server_cpus):
            raw = raw_throughput(model.artifacts[depth], batch, args.raw_seconds)
        ratio = server_row["images_per_s"] / raw["images_per_s"]
        out.append({"depth": str(depth), "batch": batch, **raw, "server_images_per_s": server_row["images_per_s"],
                    "server_over_raw": ratio})  # fmt: skip
        console.print(f"raw ONNX Runtime depth {depth} batch {batch}: {raw['images_per_s']:.1f} images/s "
                      f"(server {server_row['images_per_s']:.1f}, ratio {ratio:.2f})")  # fmt: skip
    return out


def raw_throughput(artifacts, batch: int, seconds: float) -> dict:
    """Back-to-back runs of one random batch (the graph's cost does not depend on pixel values) through the
    runtime `srvit serve` would open for this depth, with the same settings."""
    import onnxruntime as ort

    from service.runtime import OrtRuntime, choose_providers
    from service.settings import Settings

    settings = Settings()
    artifact = next(a for a in artifacts if a.platform == "onnxruntime_onnx")
    providers = choose_providers(settings.providers, ort.get_available_providers())
    runtime = OrtRuntime(artifact, providers, settings.intra_op_threads, settings.intra_op_spinning)
    images = np.random.default_rng(0).standard_normal((batch, *artifact.manifest["input"]["shape"][1:]), np.float32)
    for _ in range(3):
        runtime.run(images)
    runs, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        runtime.run(images)
        runs += 1
    runtime.close()
    return {"images_per_s": runs * batch / elapsed, "batch_ms": elapsed / runs * 1000, "runs": runs,
            "provider": runtime.provider, "intra_op_threads": settings.intra_op_threads}  # fmt: skip


def auto_runs(args, model, pngs, rows: list[dict]) -> list[dict]:
    """An open-loop rate the deepest depth cannot sustain, once with depth=auto and once at max depth."""
    capacity = max(r["images_per_s"] for r in rows if r["batching"] == "on" and r["depth"] == str(model.max_depth))
    rate = args.overload * capacity
    env = caller_settings() | {"SRVIT_LATENCY_TARGET_MS": f"{args.latency_target_ms:g}"}
    out = []
    with served(args.repo, env, args.server_cpus) as server:
        for depth in ("auto", str(model.max_depth)):
            target = Target(server.url, depth, model.name)
            row = measure(target, pngs, rate=rate, duration_s=args.duration, warmup_s=args.warmup)
            row |= {"capacity_max_depth": capacity, "overload": args.overload,
                    "latency_target_ms": args.latency_target_ms}  # fmt: skip
            console.print(f"overload {args.overload}x: " + _load_line(row))
            out.append(row)
    return out


# -- report -----------------------------------------------------------------------------------------


def machine_facts() -> dict:
    import onnxruntime as ort

    return {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "loadavg_at_start": os.getloadavg(),
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except OSError:
        return None
    return out.stdout.strip() or None


def setup_facts(args, model) -> dict:
    from service.settings import Settings

    defaults = Settings().model_dump(mode="json")
    shared = (
        f"server on CPUs {_cpu_list(args.server_cpus)}, load generator on CPUs {_cpu_list(args.client_cpus)}"
        if args.server_cpus or args.client_cpus
        else "server and load generator share every CPU (no pinning)"
    )
    return {
        "model": model.name,
        "depths": model.depths,
        "max_depth": model.max_depth,
        "checkpoint": model.manifest.get("checkpoint"),
        "server_defaults": {k: defaults[k] for k in SERVER_SETTINGS},
        "batching_env": BATCHING,
        "cores": {
            "server": sorted(args.server_cpus or []),
            "client": sorted(args.client_cpus or []),
            "sharing": shared,
        },
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "load_generator": "aiohttp.ClientSession, one process; closed loop = N workers each with one request in "
        "flight; open loop = evenly spaced sends, latency from when a request was due",
        "images": "Fashion-MNIST test images 0..999, PNG-encoded once before the runs",
    }


def _cpu_list(cpus: set[int] | None) -> str:
    return ",".join(map(str, sorted(cpus))) if cpus else "all"


def write_report(report: dict, out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / f"{tag}.json", report)
    (out / f"{tag}.md").write_text(markdown(report))
    console.print(f"wrote {out / f'{tag}.json'} and {out / f'{tag}.md'}")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite(data), indent=2, allow_nan=False) + "\n")


def finite(value):
    """NaN (a percentile of no answers) as null, so the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def markdown(report: dict) -> str:
    m, s = report["machine"], report["setup"]
    lines = [
        f"# Benchmark: {s['model']} on {m['cpu']}",
        "",
        f"{m['logical_cpus']} logical CPUs ({m['cpus_usable']} usable), load average at start "
        f"{m['loadavg_at_start'][0]:.2f}, ONNX Runtime {m['onnxruntime']}, Python {m['python']}, {m['date']}. "
        f"Cores: {s['cores']['sharing']}. Server defaults: "
        + ", ".join(f"{k}={v}" for k, v in s["server_defaults"].items())
        + f". Each run: {s['warmup_s']:g} s warm-up, {s['duration_s']:g} s measured.",
        "",
        "## Server, closed loop",
        "",
        "| batching | depth | concurrency | images/s | p50 ms | p99 ms | mean batch | server CPU cores | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["server_runs"]:
        lat, batch = r["latency_ms"], r["mean_batch"]
        lines.append(
            f"| {r['batching']} | {r['depth']} | {r['concurrency']} | {r['images_per_s']:.1f} | {_num(lat['p50'])} "
            f"| {_num(lat['p99'])} | {_num(batch)} | {r['server_cpu_cores']:.2f} "
            f"| {_errors(r['errors'])} |"
        )
    lines += ["", "## Raw ONNX Runtime at the batch size the server formed", "",
              "| depth | batch | raw images/s | server images/s | server / raw |",
              "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in report["raw"]:
        lines.append(
            f"| {r['depth']} | {r['batch']} | {r['images_per_s']:.1f} | {r['server_images_per_s']:.1f} "
            f"| {r['server_over_raw']:.2f} |"
        )
    lines += ["", "## Overload: open loop above max-depth capacity", "",
              "| depth | offered req/s | answered images/s | p50 ms | p95 ms | p99 ms | depth mix | errors "
              "| client send lag p99 ms |", "|---|---:|---:|---:|---:|---:|---|---|---:|"]  # fmt: skip
    for r in report["auto"]:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['depth']} | {r['rate']:.1f} | {r['images_per_s']:.1f} | {_num(lat['p50'])} | {_num(lat['p95'])} "
            f"| {_num(lat['p99'])} | {_mix(r['depth_mix'])} | {_errors(r['errors'])} | {_num(r['send_lag_ms_p99'])} |"
        )
    return "\n".join(lines) + "\n"
