"""`srvit bench` flags (load, accuracy, matrix) and the dispatch to the module that runs each."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.accuracy import run_accuracy
from bench.load import run_load
from bench.matrix import run_matrix
from bench.memory import run_memory
from bench.model_level import add_model_level_parser, run_model_level
from bench.peer_bench import PEERS, run_peers
from bench.soak import run_soak
from modelrepo.idx import FASHION_MNIST_DIR


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
    acc.add_argument(
        "--depth", type=_depths, default=["1", "2", "3", "4"], help="depths to check, e.g. 1,2,3,4,adaptive"
    )
    acc.add_argument("--concurrency", type=int, default=16)
    acc.add_argument("--limit", type=int, default=None, help="only the first N test images")
    acc.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")

    matrix = sub.add_parser("matrix", help="start servers, run the benchmark matrix, write docs/benchmarks/")
    matrix.add_argument("--repo", type=Path, default=Path("model_repo"), help="model repository to serve")
    matrix.add_argument("--model", default=None, help="model name in the repository (default: the only one)")
    matrix.add_argument("--data", type=Path, default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder")
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

    peers = sub.add_parser("peers", help="start srvit and its peers (Triton, Ray Serve, BentoML, LitServe, naive), "
                           "benchmark them side by side, write docs/benchmarks/")  # fmt: skip
    peers.add_argument("--quick", action="store_true", help="a few minutes: fashion, pinned, c=1 and 32, no tuning")
    peers.add_argument("--peers", type=_names, default=None, help=f"only these, of {','.join(p.name for p in PEERS)}")
    peers.add_argument("--repo", type=Path, default=Path("model_repo"), help="the repository holding srvit_fashion")
    peers.add_argument("--data", type=Path, default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder")
    peers.add_argument("--small-dir", type=Path, default=Path("runs/peers"),
                       help="where srvit_small_patch16_224 (random weights) is exported, or reused from")  # fmt: skip
    peers.add_argument("--no-model-level", action="store_true", help="skip the model-level runs of the full run")
    peers.add_argument("--out", type=Path, default=Path("docs/benchmarks"), help="folder for <tag>.json, .md, plots")
    peers.add_argument("--tag", default=None, help="file name stem of the results (default: peers or peers-quick)")

    add_model_level_parser(sub)

    memory = sub.add_parser("memory", help="start a server, send rounds of 12 MP photos and abuse, report its memory")
    memory.add_argument("--repo", type=Path, default=Path("model_repo"), help="model repository to serve")
    memory.add_argument("--model", default=None, help="model name in the repository (default: the only one)")
    memory.add_argument("--rounds", type=int, default=5)
    memory.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024, help="the server's body limit")
    memory.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server, e.g. MALLOC_ARENA_MAX=2")
    memory.add_argument("--json", type=Path, default=None, help="also write the rounds to this JSON file")

    soak = sub.add_parser("soak", help="start a server, send mixed traffic with faults on every protocol, check it")
    soak.add_argument("--repo", type=Path, default=Path("model_repo"), help="model repository to serve")
    soak.add_argument("--model", default=None, help="model name in the repository (default: the only one)")
    soak.add_argument("--minutes", type=float, default=15.0, help="length of the measured soak")
    soak.add_argument("--workers", type=int, default=16, help="clients sending at once (bursts come on top)")
    soak.add_argument("--seed", type=int, default=0, help="seed of the traffic mix")
    soak.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    soak.add_argument("--json", type=Path, default=None, help="also write the report to this JSON file")


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", default=None, help="model name (default: the server's default)")
    p.add_argument("--data", type=Path, default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX folder")
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
    if not values or any(v not in ("auto", "adaptive") and not (v.isdigit() and int(v) >= 1) for v in values):
        raise argparse.ArgumentTypeError(f"need depths like 1,4,auto,adaptive, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    known = {p.name for p in PEERS}
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names or set(names) - known:
        raise argparse.ArgumentTypeError(f"need peer names from {','.join(sorted(known))}, got {text!r}")
    return names


def _cpus(text: str) -> set[int]:
    """'0,2-3' -> {0, 2, 3}, the taskset notation."""
    cpus = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def main(args: argparse.Namespace) -> int:
    modes = {"load": run_load, "accuracy": run_accuracy, "matrix": run_matrix, "memory": run_memory,
             "soak": run_soak, "peers": run_peers, "model-level": run_model_level}  # fmt: skip
    return modes[args.mode](args)
