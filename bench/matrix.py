"""`srvit bench matrix`: servers with batching on and off, raw ONNX Runtime beside them, depth=auto under overload."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bench.images import load_pngs
from bench.loadgen import Target, measure
from bench.models import Graph, Model, load_models
from bench.report import console, load_line, machine_facts, setup_facts, write_report
from bench.scrape import mean_batch
from bench.servers import pinned, served

# Only what differs from the server's defaults is set; the rest is the server's defaults at the recorded commit.
BATCHING = {"on": {}, "off": {"SRVIT_MAX_BATCH_SIZE": "1"}}
TRUE = {"1", "on", "t", "true", "y", "yes"}  # how the server's settings read a boolean SRVIT_* variable


def caller_settings() -> dict[str, str]:
    """The SRVIT_* variables the matrix was started with: its servers run with them, as its raw ONNX Runtime
    runs and its recorded server settings do, so `SRVIT_MAX_QUEUE_DELAY_MS=0 srvit bench matrix` measures that."""
    return {k: v for k, v in os.environ.items() if k.startswith("SRVIT_")}


def run_matrix(args: argparse.Namespace) -> int:
    model = _pick_model(load_models(args.repo), args.model)
    pngs, _ = load_pngs(args.data, 1000)
    report = {"machine": machine_facts(), "setup": setup_facts(args, model, BATCHING, caller_settings()),
              "server_runs": [], "raw": [], "auto": []}  # fmt: skip
    _warn_if_busy(report["machine"])
    depths = sorted({model.depths[0], model.max_depth})
    with pinned(args.client_cpus):
        for batching, env in BATCHING.items():
            report["server_runs"] += server_runs(args, model, pngs, batching, env, [*depths, *_adaptive(model)])
        report["raw"] = raw_runs(args, model, report["server_runs"], depths)
        report["auto"] = auto_runs(args, model, pngs, report["server_runs"])
    write_report(report, args.out, args.tag)
    return 0


def _warn_if_busy(machine: dict) -> None:
    load, cpus = machine["loadavg_at_start"][0], machine["cpus_usable"]
    if load > 0.5 * cpus:
        console.print(f"[yellow]warning:[/] load average {load:.1f} on {cpus} CPUs: something else is running, "
                      "and these numbers will show its share, not the server's")  # fmt: skip


def _pick_model(models: dict[str, Model], name: str | None) -> Model:
    if name is None and len(models) == 1:
        return next(iter(models.values()))
    if name not in models:
        raise SystemExit(f"pick a model with --model: the repository holds {sorted(models)}")
    return models[name]


def _adaptive(model: Model) -> list[str]:
    """depth=adaptive joins the runs when the export fitted a policy."""
    return ["adaptive"] if model.adaptive else []


def server_runs(args, model: Model, pngs, batching: str, env: dict, depths: list[int | str]) -> list[dict]:
    """Closed-loop runs at every concurrency and depth on one server, with its batches and CPU time per run."""
    rows = []
    with served(args.repo, caller_settings() | env, args.server_cpus) as server:
        runtimes = server.runtimes(model.name)
        for depth in depths:
            target = Target(server.url, str(depth), model.name)
            for concurrency in args.concurrency:
                before, cpu0 = server.metrics(), server.cpu_s()
                row = measure(target, pngs, concurrency=concurrency, duration_s=args.duration, warmup_s=args.warmup)
                after, cpu1 = server.metrics(), server.cpu_s()
                total_s = args.duration + args.warmup  # both CPU times include the warm-up
                row |= {"batching": batching, "mean_batch": mean_batch(before, after, model.name, depth),
                        "server_cpu_cores": (cpu1 - cpu0) / total_s,
                        "client_cpu_cores": row["client_cpu_s"] / total_s,
                        "runtime": runtimes.get(str(depth), "several depths")}  # fmt: skip
                console.print(f"batching {batching}: " + load_line(row))
                rows.append(row)
    return rows


def raw_runs(args, model: Model, rows: list[dict], depths: list[int]) -> list[dict]:
    """ONNX Runtime alone, with the server's session options and providers, at the batch size the server
    formed at its highest concurrency, on the server's cores; the server is stopped, so nothing competes."""
    saturated = {r["depth"]: r for r in rows if r["batching"] == "on" and r["concurrency"] == max(args.concurrency)}
    out = []
    for depth in depths:
        server_row = saturated[str(depth)]
        batch = max(1, round(server_row["mean_batch"] or 1))
        with pinned(args.server_cpus):
            raw = raw_throughput(_graph(model, depth), batch, args.raw_seconds, server_row["runtime"])
        ratio = server_row["images_per_s"] / raw["images_per_s"]
        out.append({"depth": str(depth), "batch": batch, **raw, "server_images_per_s": server_row["images_per_s"],
                    "server_over_raw": ratio})  # fmt: skip
        console.print(f"raw ONNX Runtime depth {depth} batch {batch}: {raw['images_per_s']:.1f} images/s "
                      f"(server {server_row['images_per_s']:.1f}, ratio {ratio:.2f})")  # fmt: skip
    return out


def _graph(model: Model, depth: int) -> Graph:
    if depth not in model.graphs:
        raise SystemExit(
            f"{model.name} depth {depth} has only a TensorRT engine: the raw run needs its ONNX graph, "
            "re-export the model with `srvit export`"
        )
    return model.graphs[depth]


def raw_throughput(graph: Graph, batch: int, seconds: float, runtime: str) -> dict:
    """Back-to-back runs of one random batch (the graph's cost does not depend on pixel values) through an
    ONNX Runtime session opened as `srvit serve` opens this depth's graph, on the provider it reported."""
    threads, spinning = intra_op_settings(caller_settings())
    session = _session(graph, runtime, threads, spinning)
    images = np.random.default_rng(0).standard_normal((batch, *graph.manifest.chw), np.float32)
    feed = {graph.manifest.input.name: images}
    output = [graph.manifest.output.name]
    for _ in range(3):
        session.run(output, feed)
    runs, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        session.run(output, feed)
        runs += 1
    return {"images_per_s": runs * batch / elapsed, "batch_ms": elapsed / runs * 1000, "runs": runs,
            "provider": session.get_providers()[0], "intra_op_threads": threads}  # fmt: skip


def intra_op_settings(env: dict[str, str]) -> tuple[int, bool]:
    """SRVIT_INTRA_OP_THREADS and SRVIT_INTRA_OP_SPINNING as the matrix's servers got them; unset, the server's
    defaults (0: ONNX Runtime's choice; no spinning). The server does not report them over HTTP."""
    threads = int(env.get("SRVIT_INTRA_OP_THREADS", "0"))
    return threads, env.get("SRVIT_INTRA_OP_SPINNING", "false").strip().lower() in TRUE


def _session(graph: Graph, runtime: str, threads: int, spinning: bool):
    """The provider the server reported for this depth; a native TensorRT engine is no ONNX Runtime provider, so
    then ONNX Runtime's own order of what is available (TensorRT, CUDA, CPU), what the server's `auto` picks."""
    import onnxruntime as ort

    from service.runtime import session_options

    available = ort.get_available_providers()
    providers = [runtime] if runtime in available else available
    return ort.InferenceSession(str(graph.path), session_options(threads, spinning), providers)


def auto_runs(args, model: Model, pngs, rows: list[dict]) -> list[dict]:
    """An open-loop rate the deepest depth cannot sustain, with depth=auto, adaptive (when the model has a policy)
    and max depth."""
    capacity = max(r["images_per_s"] for r in rows if r["batching"] == "on" and r["depth"] == str(model.max_depth))
    rate = args.overload * capacity
    env = caller_settings() | {"SRVIT_LATENCY_TARGET_MS": f"{args.latency_target_ms:g}"}
    out = []
    with served(args.repo, env, args.server_cpus) as server:
        for depth in ("auto", *_adaptive(model), str(model.max_depth)):
            target = Target(server.url, depth, model.name)
            row = measure(target, pngs, rate=rate, duration_s=args.duration, warmup_s=args.warmup)
            row |= {"capacity_max_depth": capacity, "overload": args.overload,
                    "latency_target_ms": args.latency_target_ms}  # fmt: skip
            console.print(f"overload {args.overload}x: " + load_line(row))
            out.append(row)
    return out
