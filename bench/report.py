"""What the benchmark writes: console lines and rich tables, machine and setup facts, the JSON and Markdown report."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


# -- console ----------------------------------------------------------------------------------------


def load_line(row: dict) -> str:
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


def accuracy_table(rows: list[dict]) -> Table:
    table = Table(title="top-1 over HTTP vs the export's own measurement")
    columns = ("depth", "images", "top-1 (HTTP)", "top-1 (manifest)", "difference", "GFLOPs/image", "vs deepest",
               "errors")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        ref, diff = row["top1_manifest"], row["difference"]
        gflops, share = row.get("gflops_per_image"), row.get("compute_vs_deepest")
        table.add_row(
            row["depth"], str(row["images"]), f"{row['top1_http']:.4f}", "-" if ref is None else f"{ref:.4f}",
            "-" if diff is None else f"{diff:+.4f}", "-" if gflops is None else f"{gflops:.4f}",
            "-" if share is None else f"{share:.3f}", _errors(row["errors"]),
        )  # fmt: skip
    return table


def _num(value: float | None) -> str:
    """One decimal, or '-' where there is nothing to show (no answers, no batch)."""
    return "-" if value is None or not math.isfinite(value) else f"{value:.1f}"


def _errors(errors: dict) -> str:
    return " ".join(f"{status}:{n}" for status, n in errors.items()) or "0"


def _mix(mix: dict) -> str:
    return " ".join(f"d{d}:{share:.0%}" for d, share in mix.items())


# -- facts ------------------------------------------------------------------------------------------


def machine_facts() -> dict:
    import onnxruntime as ort

    return {
        "cpu": cpu_model(),
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


def cpu_model() -> str:
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


def setup_facts(args, model, batching_env: dict, server_env: dict[str, str]) -> dict:
    """The server's settings are its defaults at `git_commit` plus `server_env`: the benchmark reaches the
    server over HTTP only, and the server does not report its settings there."""
    shared = (
        f"server on CPUs {_cpu_list(args.server_cpus)}, load generator on CPUs {_cpu_list(args.client_cpus)}"
        if args.server_cpus or args.client_cpus
        else "server and load generator share every CPU (no pinning)"
    )
    return {
        "model": model.name,
        "depths": model.depths,
        "max_depth": model.max_depth,
        "checkpoint": model.checkpoint,
        "server_env": server_env,
        "batching_env": batching_env,
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


# -- files ------------------------------------------------------------------------------------------


def write_report(report: dict, out: Path, tag: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{tag}.json", report)
    (out / f"{tag}.md").write_text(markdown(report))
    console.print(f"wrote {out / f'{tag}.json'} and {out / f'{tag}.md'}")


def write_json(path: Path, data: dict) -> None:
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


def _settings_text(setup: dict) -> str:
    """Reports written before `server_env` recorded the settings themselves, as `server_defaults`."""
    if "server_env" not in setup:
        return "Server defaults: " + ", ".join(f"{k}={v}" for k, v in setup["server_defaults"].items())
    env = ", ".join(f"{k}={v}" for k, v in setup["server_env"].items())
    return "Server settings: the defaults at this commit" + (f", with {env}" if env else "")


def markdown(report: dict) -> str:
    m, s = report["machine"], report["setup"]
    lines = [
        f"# Benchmark: {s['model']} on {m['cpu']}",
        "",
        f"{m['logical_cpus']} logical CPUs ({m['cpus_usable']} usable), load average at start "
        f"{m['loadavg_at_start'][0]:.2f}, ONNX Runtime {m['onnxruntime']}, Python {m['python']}, {m['date']}. "
        f"Cores: {s['cores']['sharing']}. "
        + _settings_text(s)
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
