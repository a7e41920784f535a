"""`srvit bench model-level`: the model alone, no server: images/s of ONNX Runtime (srvit's session settings),
PyTorch eager and torch.compile per depth and batch, next to the machine's GEMM peak measured in the same run.

Why: the server can be no faster than the graph it runs. This says what the graph costs (the depth knob's price,
how close each runtime gets to the machine's peak) and whether exporting to ONNX Runtime pays off against plain
PyTorch, the project's claim checked in `TARGETS`. torch, srvit and onnx are imported only when a run starts:
the bench extra alone installs none of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.report import cpu_model

BATCHES = (1, 8, 32)
RUNTIMES = ("onnxruntime", "eager", "compile")
PEAK_RUNTIMES = ("onnxruntime", "numpy", "torch")
PEAK_N = 2048  # one n x n fp32 GEMM: 17 GFLOP, long enough to reach the BLAS kernels' steady state
PARITY_RTOL = 1e-3  # of the largest logit: beyond this, eager and ONNX Runtime are not running the same model
TARGETS = {1: 1.3, 32: 1.1}  # batch -> ONNX Runtime images/s over PyTorch eager's, at every depth
SEED = 0


# -- timing ---------------------------------------------------------------------------------------


def time_runs(fn: Callable[[], object], items: int, seconds: float, repetitions: int) -> dict:
    """Items/s of `fn` (which handles `items` at a call): a tenth of `seconds` of warm-up, then `repetitions`
    timed runs of seconds/repetitions each; every one of them at least one call."""
    _run_for(fn, seconds / 10)
    rates = []
    for _ in range(repetitions):
        calls, elapsed = _run_for(fn, seconds / repetitions)
        rates.append(calls * items / elapsed)
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates}


def _run_for(fn: Callable[[], object], seconds: float) -> tuple[int, float]:
    start = time.perf_counter()
    calls = 0
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls, elapsed


# -- the model at each depth ----------------------------------------------------------------------


def repo_depths(repo: Path, model: str) -> dict:
    """Depth -> its manifest, for every `<model>_d<depth>` folder the repository holds."""
    from bench.peers.common import depth_folder
    from modelrepo.manifest import Manifest

    found = {}
    for depth in range(1, 65):
        path = depth_folder(repo, model, depth) / "manifest.json"
        if path.is_file():
            found[depth] = Manifest.from_dict(json.loads(path.read_text()))
    if not found:
        raise SystemExit(f"{repo} holds no {model}_d<depth>/manifest.json: export the model first (srvit export)")
    return found


def ort_session(path: Path):
    import onnxruntime as ort

    from bench.peers.common import session_options

    return ort.InferenceSession(str(path), session_options(), ["CPUExecutionProvider"])


def ort_threads(path: Path) -> int | None:
    """Threads ONNX Runtime's intra-op pool runs on with srvit's settings (intra_op_num_threads 0 lets it pick):
    the workers a session starts, plus the calling thread. None where /proc is not there to count them."""
    if not Path("/proc/self/task").is_dir():
        return None
    before = len(os.listdir("/proc/self/task"))
    session = ort_session(path)
    workers = len(os.listdir("/proc/self/task")) - before
    del session
    return workers + 1


def compile_model(module, images):
    """torch.compile of one depth at one batch, and the seconds its first call took (the compilation)."""
    import torch

    torch._dynamo.reset()  # each cell compiles afresh: 12 cells would pass dynamo's recompile limit otherwise
    compiled = torch.compile(module, dynamic=False)
    start = time.perf_counter()
    with torch.inference_mode():
        compiled(images)
    return compiled, time.perf_counter() - start


def measure_cell(net, manifest, session, batch: int, seconds: float, repetitions: int, compile_state: dict):
    """One depth at one batch: every runtime's images/s, and how far their logits are from eager's. `session`
    runs that depth's graph (`ort_session`); `net` is the model from the checkpoint."""
    import torch

    from srvit.model import FixedDepth

    images = np.random.default_rng(SEED).standard_normal((batch, *manifest.chw), dtype=np.float32)
    tensor = torch.from_numpy(images)
    name = manifest.input.name
    module = FixedDepth(net, manifest.depth).eval()

    def eager():
        with torch.inference_mode():
            return module(tensor)

    reference = eager().numpy()
    scale = max(1.0, float(np.abs(reference).max()))
    diff = {"onnxruntime": float(np.abs(session.run(None, {name: images})[0] - reference).max())}
    if diff["onnxruntime"] > PARITY_RTOL * scale:
        raise SystemExit(
            f"depth {manifest.depth}, batch {batch}: ONNX Runtime's logits are {diff['onnxruntime']:.3g} from "
            f"PyTorch's (largest logit {scale:.3g}): not the same model. Was --repo exported from --checkpoint?"
        )
    cell = {"depth": manifest.depth, "batch": batch, "flops_per_image": manifest.flops, "max_abs_diff": diff}
    cell["onnxruntime"] = time_runs(lambda: session.run(None, {name: images}), batch, seconds, repetitions)
    cell["eager"] = time_runs(eager, batch, seconds, repetitions)
    if compile_state["enabled"] and compile_state["error"] is None:
        cell["compile"] = measure_compiled(module, tensor, reference, batch, seconds, repetitions, compile_state)
    return cell


def measure_compiled(module, tensor, reference, batch, seconds, repetitions, compile_state) -> dict | None:
    """torch.compile's images/s and compilation seconds; on failure, the reason goes in `compile_state` and
    compilation is not tried again (it fails the same way for every cell)."""
    import torch

    try:
        compiled, compile_s = compile_model(module, tensor)
    except Exception as e:  # a missing C++ compiler, an unsupported op: recorded, not fatal
        compile_state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        return None

    def run():
        with torch.inference_mode():
            return compiled(tensor)

    result = time_runs(run, batch, seconds, repetitions)
    result["compile_s"] = compile_s
    result["max_abs_diff"] = float(np.abs(run().numpy() - reference).max())
    return result


# -- the machine's peak ---------------------------------------------------------------------------


def matmul_graph(n: int) -> bytes:
    """One ONNX MatMul node, [n, n] x [n, n] fp32."""
    import onnx
    from onnx import TensorProto, helper

    a, b = (helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in ("a", "b"))
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "peak", [a, b], [c])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # the newest every supported onnxruntime reads
    onnx.checker.check_model(model)
    return model.SerializeToString()


def measure_peak(n: int, seconds: float, repetitions: int) -> dict:
    """GFLOP/s of one n x n GEMM in ONNX Runtime, numpy and torch; the peak is the best repetition of any."""
    import onnxruntime as ort
    import torch

    from bench.peers.common import session_options

    rng = np.random.default_rng(SEED)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    session = ort.InferenceSession(matmul_graph(n), session_options(), ["CPUExecutionProvider"])
    runs = dict(zip(PEAK_RUNTIMES, (lambda: session.run(None, {"a": a, "b": b}), lambda: a @ b,
                                    lambda: torch.matmul(ta, tb)), strict=True))  # fmt: skip
    gflop = 2 * n**3 / 1e9
    peak = {"n": n, "gflop_per_matmul": gflop}
    for runtime, fn in runs.items():
        rate = time_runs(fn, 1, seconds, repetitions)
        peak[runtime] = {key: rate[key] * gflop for key in ("median", "min", "max")}
    best = max(runs, key=lambda r: peak[r]["max"])
    peak["gflops"], peak["best"] = peak[best]["max"], best  # a ceiling: the best repetition, least disturbed
    return peak


# -- the whole run --------------------------------------------------------------------------------


def measure_model(checkpoint, repo, model, batches=BATCHES, seconds=2.0, repetitions=5, compile=True) -> dict:
    """Every depth the repository holds x every batch x every runtime, the peak, and what follows from them."""
    import onnxruntime as ort
    import torch

    from bench.peers.common import depth_folder
    from srvit.checkpoint import load_checkpoint

    manifests = repo_depths(Path(repo), model)
    net, _ = load_checkpoint(Path(checkpoint))
    first = min(manifests)
    folder = depth_folder(repo, model, first)
    results = {
        "model": model, "checkpoint": str(checkpoint), "repo": str(repo), "batches": list(batches),
        "seconds": seconds, "repetitions": repetitions, "machine": machine(),
        "threads": {"onnxruntime": ort_threads(folder / manifests[first].model_file),
                    "torch": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
    }  # fmt: skip
    say(f"peak: {PEAK_N}x{PEAK_N} fp32 GEMM in ONNX Runtime, numpy, torch")
    results["peak"] = measure_peak(PEAK_N, seconds, repetitions)
    compile_state = {"enabled": compile, "error": None}
    results["cells"] = []
    for depth, manifest in sorted(manifests.items()):
        session = ort_session(depth_folder(repo, model, depth) / manifest.model_file)
        for batch in batches:
            say(f"depth {depth}, batch {batch}")
            cell = measure_cell(net, manifest, session, batch, seconds, repetitions, compile_state)
            results["cells"].append(cell)
            say("  " + ", ".join(f"{r} {cell[r]['median']:.1f}/s" for r in RUNTIMES if cell.get(r)))
    results["compile"] = {"enabled": compile, "error": compile_state["error"]}
    results.update(derive(results))
    return results


def machine() -> dict:
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "cpus_usable": len(cpus),
            "loadavg_at_start": os.getloadavg(), "python": platform.python_version()}  # fmt: skip


def say(text: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(text, highlight=False)


# -- what follows from the measurements -----------------------------------------------------------


def derive(results: dict) -> dict:
    """GFLOP/s and fraction of peak per cell, cost vs depth, and the targets met or missed."""
    peak = results["peak"]["gflops"]
    achieved = []
    for cell in results["cells"]:
        for runtime in RUNTIMES:
            if cell.get(runtime) and cell["flops_per_image"]:
                gflops = cell[runtime]["median"] * cell["flops_per_image"] / 1e9
                achieved.append({"depth": cell["depth"], "batch": cell["batch"], "runtime": runtime,
                                 "gflops": gflops, "fraction_of_peak": gflops / peak})  # fmt: skip
    return {"achieved": achieved, "cost_vs_depth": cost_vs_depth(results["cells"]), "targets": targets(results)}


def cost_vs_depth(cells: list[dict]) -> list[dict]:
    """Per runtime and batch: images/s at the shallowest depth over images/s at each depth."""
    rows = []
    for runtime in RUNTIMES:
        for batch in sorted({c["batch"] for c in cells}):
            line = {c["depth"]: c[runtime]["median"] for c in cells if c["batch"] == batch and c.get(runtime)}
            if line:
                base = line[min(line)]
                rows.append({"runtime": runtime, "batch": batch, "cost": {str(d): base / v for d, v in line.items()}})
    return rows


def targets(results: dict) -> list[dict]:
    """ONNX Runtime over eager at each targeted batch, every depth; `met` is None for a batch not measured."""
    rows = []
    for batch, target in TARGETS.items():
        cells = [c for c in results["cells"] if c["batch"] == batch]
        ratios = {str(c["depth"]): c["onnxruntime"]["median"] / c["eager"]["median"] for c in cells}
        met = all(r >= target for r in ratios.values()) if ratios else None
        rows.append({"batch": batch, "target": target, "ratios": ratios, "met": met})
    return rows


# -- the report -----------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    """The run as tables: images/s with spread, GFLOP/s and fraction of peak, cost vs depth, peak, targets."""
    peak, th = results["peak"], results["threads"]
    m = results["machine"]
    lines = [
        f"# Model level: {results['model']}",
        "",
        f"{m['cpu']}, {m['cpus_usable']} usable CPUs, load {m['loadavg_at_start'][0]:.2f} at start; threads: "
        f"ONNX Runtime {th['onnxruntime']}, torch {th['torch']}. {results['repetitions']} repetitions over "
        f"about {results['seconds']:g} s per cell, random normal inputs. torch {results['versions']['torch']}, "
        f"onnxruntime {results['versions']['onnxruntime']}.",
        "",
        *images_table(results),
        "",
        *achieved_table(results),
        "",
        *cost_table(results),
        "",
        f"**Peak**: {peak['gflops']:.1f} GFLOP/s ({peak['best']}'s best repetition), {peak['n']}x{peak['n']} fp32 "
        "GEMM, median (min-max): "
        + ", ".join(f"{r} {peak[r]['median']:.1f} ({peak[r]['min']:.1f}-{peak[r]['max']:.1f})" for r in PEAK_RUNTIMES),
        "",
        *targets_lines(results),
    ]
    if results["compile"]["error"]:
        lines += ["", f"torch.compile failed: `{results['compile']['error']}`"]
    elif not results["compile"]["enabled"]:
        lines += ["", "torch.compile not measured (--no-compile)."]
    return "\n".join(lines) + "\n"


def images_table(results: dict) -> list[str]:
    runtimes = [r for r in RUNTIMES if any(c.get(r) for c in results["cells"])]
    head = "| depth | batch | " + " | ".join(f"{r} images/s (min-max)" for r in runtimes)
    lines = [head + " | ORT/eager | max abs diff vs eager |", "|---" * (len(runtimes) + 4) + "|"]
    for c in results["cells"]:
        rates = " | ".join(f"{c[r]['median']:.1f} ({c[r]['min']:.1f}-{c[r]['max']:.1f})" for r in runtimes)
        diffs = ", ".join(f"{r} {d:.1e}" for r, d in all_diffs(c).items())
        ratio = c["onnxruntime"]["median"] / c["eager"]["median"]
        lines.append(f"| {c['depth']} | {c['batch']} | {rates} | {ratio:.2f} | {diffs} |")
    return lines


def all_diffs(cell: dict) -> dict:
    diffs = dict(cell["max_abs_diff"])
    if cell.get("compile"):
        diffs["compile"] = cell["compile"]["max_abs_diff"]
    return diffs


def achieved_table(results: dict) -> list[str]:
    if not results["achieved"]:
        return ["No FLOPs in the manifests (format /1): GFLOP/s not computed."]
    runtimes = [r for r in RUNTIMES if any(a["runtime"] == r for a in results["achieved"])]
    achieved = {(a["depth"], a["batch"], a["runtime"]): a for a in results["achieved"]}
    lines = ["GFLOP/s (fraction of peak), from the median images/s and the manifest's FLOPs per image.", ""]
    lines += ["| depth | batch | " + " | ".join(runtimes) + " | compile s |", "|---" * (len(runtimes) + 3) + "|"]
    for c in results["cells"]:
        keys = [(c["depth"], c["batch"], r) for r in runtimes]
        shares = [f"{achieved[k]['gflops']:.2f} ({achieved[k]['fraction_of_peak']:.0%})" if k in achieved else ""
                  for k in keys]  # fmt: skip
        compile_s = f"{c['compile']['compile_s']:.1f}" if c.get("compile") else ""
        lines.append(f"| {c['depth']} | {c['batch']} | " + " | ".join(shares) + f" | {compile_s} |")
    return lines


def cost_table(results: dict) -> list[str]:
    depths = sorted({c["depth"] for c in results["cells"]})
    lines = ["Cost vs depth: images/s at depth 1 over images/s at depth d.", ""]
    lines += ["| runtime | batch | " + " | ".join(f"d={d}" for d in depths) + " |", "|---" * (len(depths) + 2) + "|"]
    for row in results["cost_vs_depth"]:
        costs = " | ".join(f"{row['cost'][str(d)]:.2f}" if str(d) in row["cost"] else "" for d in depths)
        lines.append(f"| {row['runtime']} | {row['batch']} | {costs} |")
    return lines


def targets_lines(results: dict) -> list[str]:
    lines = ["Targets (ONNX Runtime images/s over PyTorch eager's, every depth):", ""]
    for t in results["targets"]:
        verdict = {True: "met", False: "missed", None: "not measured"}[t["met"]]
        ratios = ", ".join(f"d{d} {r:.2f}x" for d, r in t["ratios"].items())
        lines.append(f"- batch {t['batch']}, >= {t['target']}x: **{verdict}**" + (f" ({ratios})" if ratios else ""))
    return lines


# -- command line ---------------------------------------------------------------------------------


def add_model_level_parser(sub) -> None:
    p = sub.add_parser("model-level", help="the model alone: ONNX Runtime vs PyTorch eager vs torch.compile")
    p.add_argument("--checkpoint", type=Path, default=Path("srvit/checkpoints/srvit_fashion.safetensors"))
    p.add_argument("--repo", type=Path, default=Path("model_repo"), help="the repository exported from it")
    p.add_argument("--model", default="srvit_fashion", help="model name in the repository")
    p.add_argument("--batches", type=_batches, default=list(BATCHES), help="batch sizes, e.g. 1,8,32")
    p.add_argument("--seconds", type=float, default=2.0, help="timed seconds per cell and runtime")
    p.add_argument("--repetitions", type=int, default=5, help="timed runs per cell; median and min-max reported")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--markdown", type=Path, default=None, help="also write the tables to this Markdown file")


def _batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"need positive integers like 1,8,32, got {text!r}")
    return values


def run_model_level(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    results = measure_model(args.checkpoint, args.repo, args.model, args.batches, args.seconds, args.repetitions,
                            compile=args.compile)  # fmt: skip
    results["wall_s"] = time.perf_counter() - start
    text = markdown(results)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return 0
