"""`srvit bench peers`: srvit against the servers users would pick instead, each started by the benchmark in its own
virtual environment (`scripts/peers-venv.sh`), given the same ONNX graph, images, preprocessing and cores.

Two workloads: the embedded `srvit_fashion` (overhead-bound: HTTP, decoding and Python dominate) and
`srvit_small_patch16_224` at 224 px with random weights, exported here by the same pipeline (model-bound), fed real
photographs. Each server runs closed-loop cells and an open-loop overload at 1.5x its own capacity; peers serve the
one depth they are given, srvit every depth, `auto` and `adaptive`. One cell per server is cross-checked by `wrk`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from bench.images import load_pngs
from bench.loadgen import SRVIT, Target, Wire, measure
from bench.matrix import raw_throughput
from bench.models import load_models
from bench.peers.common import depth_folder
from bench.photos import jpegs
from bench.report import console, load_line, machine_facts, write_json
from bench.scrape import mean_batch
from bench.servers import Server, free_port, pinned, served, stop, wait_ready
from bench.wrk import run_wrk

ROOT = Path(__file__).resolve().parent.parent
FASHION, SMALL = "srvit_fashion", "srvit_small_patch16_224"
LATENCY_TARGET_MS = 100.0  # srvit's `auto` and `adaptive` target in every run, as the README's example sets it
PINNED = {"server": {1}, "client": {0}}  # the server on core 1, the load generator (and wrk) on core 0
SATURATED = 32  # the concurrency the frontier and the headline compare at
SMALL_CONCURRENCY = 8  # the model-bound cells: a batch of 8 at depth 4 takes about a second there
PHOTO_SIZES = ((320, 240), (640, 480), (1024, 768), (2048, 1536))  # JPEGs cycled through in the model-bound runs


@dataclass(frozen=True)
class Peer:
    """A peer server: the module in bench/peers/ that serves it, the venv it runs in, the package whose version
    is reported, and the batch-wait values (ms) tried to find its best configuration (empty: it does not batch)."""

    name: str
    module: str
    venv: str  # relative to the repository root
    package: str
    delays_ms: tuple[float, ...]
    default_delay_ms: float = 0.0

    @property
    def python(self) -> Path:
        return ROOT / self.venv / "bin" / "python"

    @property
    def wire(self) -> Wire:
        """Where and how it takes an image, from the module's constants (the module imports no framework at the
        top, so this process can read them)."""
        m = importlib.import_module(self.module)
        return Wire(m.CLASSIFY_PATH, m.FORM_FIELD, getattr(m, "V2", False), srvit=False)

    def version(self) -> str:
        code = f"import importlib.metadata as m; print(m.version({self.package!r}))"
        return subprocess.run([self.python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


# The batch-wait values tried span each framework's own default: Triton 0, Ray Serve 10 ms, LitServe 0
# (batch_timeout). BentoML's adaptive batcher learns its own wait (its max_latency_ms is a deadline, past which it
# answers 503): nothing to tune.
PEERS = (
    Peer("triton", "bench.peers.pytriton_server", ".venv-peers/pytriton", "nvidia-pytriton", (0, 1, 5), 0),
    Peer("ray-serve", "bench.peers.ray_serve", ".venv-peers/ray", "ray", (1, 5, 10), 10),
    Peer("bentoml", "bench.peers.bentoml_service", ".venv-peers/bentoml", "bentoml", ()),
    Peer("litserve", "bench.peers.litserve_app", ".venv-peers/litserve", "litserve", (0, 1, 5), 0),
    Peer("naive", "bench.peers.naive", ".venv-peers/naive", "fastapi", ()),
)


@dataclass(frozen=True)
class Plan:
    """What one run measures: `srvit bench peers --quick` is a few minutes, the full run about an hour."""

    concurrency: tuple[int, ...]
    duration_s: float
    warmup_s: float
    placements: tuple[str, ...]  # "pinned", "shared"
    rounds: int  # the headline cells (fashion, pinned, c=1 and c=32, max depth) are measured this many times
    tune: bool  # try each peer's batch-wait values first and keep its best
    small_depths: tuple[int, ...]  # depths of the model-bound workload (empty: skip it)
    wrk: bool
    overload: float = 1.5
    small_duration_s: float = 20.0  # each model-bound cell: enough batches of seconds each


QUICK = Plan((1, 32), 3.0, 1.0, ("pinned",), 1, False, (), True)
FULL = Plan((1, 8, 32, 64), 8.0, 2.0, ("pinned", "shared"), 3, True, (1, 2, 3, 4), True)


def run_peers(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    peers = [p for p in PEERS if args.peers is None or p.name in args.peers]
    missing = [p.name for p in peers if not p.python.exists()]
    if missing:
        raise SystemExit(f"no virtual environment for {missing}: run `make bench-peers-venvs` first")
    cores = {"pinned": {k: sorted(v) for k, v in PINNED.items()}, "shared": "server and client on every CPU"}
    machine = machine_facts()
    report = {"machine": machine, "plan": plan.__dict__, "latency_target_ms": LATENCY_TARGET_MS, "cores": cores,
              "servers": {"srvit": {"version": machine["git_commit"] or "unknown", "config": srvit_env()}},
              "runs": [], "tuning": [], "wrk": [], "raw": [], "top1": {}}  # fmt: skip
    for peer in peers:
        report["servers"][peer.name] = {"package": peer.package, "version": peer.version(), "module": peer.module}
    workloads = {FASHION: args.repo}
    if plan.small_depths:
        workloads[SMALL] = small_repo(args.small_dir)
    for name, repo in workloads.items():
        report["top1"][name] = top1(repo, name)
    tag = args.tag or ("peers-quick" if args.quick else "peers")
    bench = Bench(plan, report, args.out / f"{tag}.json")
    pngs, _ = load_pngs(args.data, 1000)
    delays = bench.tune(peers, args.repo, pngs) if plan.tune else {p.name: p.default_delay_ms for p in peers}
    for peer in peers:
        report["servers"][peer.name]["config"] = {"max_batch": 32, "max_delay_ms": delays[peer.name]}
    bench.fashion(peers, delays, args.repo, pngs)
    if plan.small_depths:
        bench.small(peers, delays, workloads[SMALL])
    if not args.quick and not args.no_model_level:
        bench.model_level(workloads, args.small_dir)
    bench.save()
    from bench.peer_report import write_peer_report

    write_peer_report(report, args.out, tag)
    return 0


class Bench:
    def __init__(self, plan: Plan, report: dict, path: Path):
        self.plan, self.report, self.path = plan, report, path

    def save(self) -> None:
        """After every server: a run that dies late keeps what it measured."""
        write_json(self.path, self.report)

    # -- the configurations tried -------------------------------------------------------------------

    def tune(self, peers: list[Peer], repo: Path, pngs: list[bytes]) -> dict[str, float]:
        """Each batching peer at each of its batch-wait values, fashion at max depth, pinned, c=32: its best
        throughput (then lowest p99) is the configuration every later run uses."""
        folder = _deepest(repo, FASHION)
        best = {}
        for peer in peers:
            best[peer.name] = peer.default_delay_ms
            tried = []
            for delay in peer.delays_ms:
                with peer_served(peer, folder, PINNED["server"], delay) as server, pinned(PINNED["client"]):
                    row = measure(Target(server.url, "4", wire=peer.wire), pngs, concurrency=32,
                                  duration_s=self.plan.duration_s, warmup_s=self.plan.warmup_s)  # fmt: skip
                row |= {"server": peer.name, "max_delay_ms": delay}
                console.print(f"tuning {peer.name} delay {delay:g} ms: " + load_line(row))
                tried.append(row)
            if tried:
                self.report["tuning"] += tried
                best[peer.name] = max(tried, key=lambda r: (r["images_per_s"], -r["latency_ms"]["p99"]))["max_delay_ms"]
                self.save()
        return best

    # -- the overhead-bound workload -----------------------------------------------------------------

    def fashion(self, peers: list[Peer], delays: dict[str, float], repo: Path, pngs: list[bytes]) -> None:
        max_depth = max(load_models(repo)[FASHION].depths)
        folder = depth_folder(repo, FASHION, max_depth)
        for placement in self.plan.placements:
            for round_ in range(1, (self.plan.rounds if placement == "pinned" else 1) + 1):
                # Later rounds repeat only the headline cells, servers in a rotated order.
                cells = self.plan.concurrency if round_ == 1 else (1, 32)
                order = [None, *peers]
                order = order[round_ - 1 :] + order[: round_ - 1]
                for peer in order:
                    tag = {"workload": FASHION, "placement": placement, "round": round_}
                    if peer is None:
                        self.srvit_cells(repo, pngs, placement, tag, cells, max_depth, full=round_ == 1)
                    else:
                        self.peer_cells(peer, delays[peer.name], folder, pngs, placement, tag,
                                        cells, max_depth, overload=round_ == 1, wrk=round_ == 1)  # fmt: skip
                    self.save()

    def srvit_cells(self, repo: Path, images, placement: str, tag: dict, cells, max_depth: int,
                    full: bool) -> None:  # fmt: skip
        """srvit's cells: max depth at every concurrency; with `full`, also the other depths, auto and adaptive at
        c=1 and the highest concurrency (the frontier), the overload, and wrk's cross-check."""
        cpus = _cpus(placement)
        model = tag["workload"]
        with served(repo, srvit_env(), cpus["server"]) as server, pinned(cpus["client"]):
            rows = self.closed(server, images, tag | {"server": "srvit"}, str(max_depth), cells, model)
            if full:
                extra = [str(d) for d in range(1, max_depth)] + ["auto", "adaptive"]
                for depth in extra:
                    self.closed(server, images, tag | {"server": "srvit"}, depth, (1, SATURATED), model)
                capacity = max(r["images_per_s"] for r in rows)
                for depth in ("auto", "adaptive", str(max_depth)):
                    self.open(server, images, tag | {"server": "srvit"}, depth, capacity, model)
                if self.plan.wrk and placement == "pinned":
                    self.wrk(server, SRVIT, images[0], tag | {"server": "srvit"}, model, str(max_depth))

    def peer_cells(self, peer: Peer, delay: float, folder: Path, images, placement: str, tag: dict, cells,
                   depth: int, overload: bool, wrk: bool) -> list[dict]:  # fmt: skip
        cpus = _cpus(placement)
        with peer_served(peer, folder, cpus["server"], delay) as server, pinned(cpus["client"]):
            rows = self.closed(server, images, tag | {"server": peer.name}, str(depth), cells, None, peer.wire)
            if overload:
                capacity = max(r["images_per_s"] for r in rows)
                self.open(server, images, tag | {"server": peer.name}, str(depth), capacity, None, peer.wire)
            if wrk and self.plan.wrk and placement == "pinned":
                self.wrk(server, peer.wire, images[0], tag | {"server": peer.name}, None, str(depth))
        return rows

    def closed(self, server: Server, images, tag: dict, depth: str, cells, model: str | None,
               wire: Wire = SRVIT, duration_s: float | None = None) -> list[dict]:  # fmt: skip
        rows = []
        for concurrency in cells:
            before = server.metrics() if wire.srvit else None
            row = measure(Target(server.url, depth, model, timeout_s=60, wire=wire), images, concurrency=concurrency,
                          duration_s=duration_s or self.plan.duration_s, warmup_s=self.plan.warmup_s)  # fmt: skip
            if before is not None and depth.isdigit():
                row["mean_batch"] = mean_batch(before, server.metrics(), model, int(depth))
            row |= tag | {"kind": "closed"}
            console.print(f"{tag['workload']} {tag['placement']} {tag['server']}: " + load_line(row))
            rows.append(row)
        self.report["runs"] += rows
        return rows

    def open(self, server: Server, images, tag: dict, depth: str, capacity: float, model: str | None,
             wire: Wire = SRVIT) -> None:  # fmt: skip
        rate = self.plan.overload * capacity
        target = Target(server.url, depth, model, timeout_s=60, wire=wire)
        row = measure(target, images, rate=rate, duration_s=self.plan.duration_s, warmup_s=self.plan.warmup_s,
                      within_ms=LATENCY_TARGET_MS)  # fmt: skip
        row |= tag | {"kind": "overload", "capacity": capacity, "overload": self.plan.overload}
        console.print(f"{tag['workload']} {tag['placement']} {tag['server']} {self.plan.overload}x: " + load_line(row))
        self.report["runs"].append(row)

    def wrk(self, server: Server, wire: Wire, image: bytes, tag: dict, model: str | None, depth: str) -> None:
        target = Target(server.url, depth, model, wire=wire)
        row = run_wrk(target, image, concurrency=32, duration_s=self.plan.duration_s, cpus=PINNED["client"])
        row |= tag | {"depth": depth, "concurrency": 32}
        console.print(f"wrk {tag['server']}: {row['requests_per_s']:.1f} req/s, p99 {row['latency_ms']['p99']:.1f} ms")
        self.report["wrk"].append(row)

    def model_level(self, workloads: dict[str, Path], small_dir: Path) -> None:
        """ONNX Runtime against PyTorch eager and torch.compile, per depth and batch, on every core (nothing else
        runs then). The model-bound model's calls take seconds at batch 32: fewer, shorter repetitions, and no
        torch.compile (21-97 s of compiling per cell, 9 minutes in all, measured here)."""
        from bench.model_level import measure_model

        checkpoints = {FASHION: ROOT / "srvit" / "checkpoints" / f"{FASHION}.safetensors",
                       SMALL: small_dir / f"{SMALL}.safetensors"}  # fmt: skip
        options = {FASHION: {}, SMALL: {"seconds": 1.0, "repetitions": 3, "compile": False}}
        self.report["model_level"] = {}
        for name, repo in workloads.items():
            self.report["model_level"][name] = measure_model(checkpoints[name], repo, name, **options[name])
            self.save()

    # -- the model-bound workload --------------------------------------------------------------------

    def small(self, peers: list[Peer], delays: dict[str, float], repo: Path) -> None:
        """Every depth, pinned, at SMALL_CONCURRENCY for each server (a depth-4 image costs tens of ms on one core:
        the throughput, not the queue, is what is compared), and ONNX Runtime alone at the batch srvit formed.
        Random weights: no accuracy, no adaptive policy, so no auto or adaptive here."""
        photos = [jpeg for size in PHOTO_SIZES for jpeg in jpegs(size, 8)]
        depths, cells = self.plan.small_depths, (SMALL_CONCURRENCY,)
        tag = {"workload": SMALL, "placement": "pinned", "round": 1, "server": "srvit"}
        # Batches of at most SMALL_CONCURRENCY, for srvit and every peer (no larger batch can form here): a batch of 32
        # at depth 3 takes over 15 s on one core, and srvit refuses to start with a batch its device timeout (30 s)
        # could call hung, naming this setting. Start-up then measures batches of 1 and 8 only. And a queue-wait bound
        # above one batch's run (seconds here): the default 1 s bound would refuse all but the batch running.
        env = srvit_env() | {"SRVIT_MAX_BATCH_SIZE": str(SMALL_CONCURRENCY),
                             "SRVIT_WARMUP_BATCH_SIZES": f"1,{SMALL_CONCURRENCY}",
                             "SRVIT_MAX_QUEUE_WAIT_MS": "30000"}  # fmt: skip
        with served(repo, env, PINNED["server"], ready_timeout_s=900) as server, pinned(PINNED["client"]):
            for depth in depths:
                self.closed(server, photos, tag, str(depth), cells, SMALL, duration_s=self.plan.small_duration_s)
        self.save()
        for peer in peers:
            for depth in depths:
                folder = depth_folder(repo, SMALL, depth)
                with (
                    peer_served(peer, folder, PINNED["server"], delays[peer.name], SMALL_CONCURRENCY) as server,
                    pinned(PINNED["client"]),
                ):
                    self.closed(server, photos, tag | {"server": peer.name}, str(depth), cells, None, peer.wire,
                                duration_s=self.plan.small_duration_s)  # fmt: skip
                self.save()
        self.raw(repo)

    def raw(self, repo: Path) -> None:
        model = load_models(repo)[SMALL]
        for row in [r for r in self.report["runs"] if r["workload"] == SMALL and r["server"] == "srvit"
                    and r["kind"] == "closed" and r["depth"].isdigit()]:  # fmt: skip
            batch = max(1, round(row.get("mean_batch") or 1))
            with pinned(PINNED["server"]):
                raw = raw_throughput(
                    model.graphs[int(row["depth"])], batch, self.plan.duration_s, "CPUExecutionProvider"
                )
            ratio = row["images_per_s"] / raw["images_per_s"]
            raw |= {"workload": SMALL, "depth": row["depth"], "batch": batch,
                    "server_images_per_s": row["images_per_s"], "server_over_raw": ratio}  # fmt: skip
            console.print(f"raw ONNX Runtime {SMALL} depth {row['depth']} batch {batch}: {raw['images_per_s']:.1f}/s")
            self.report["raw"].append(raw)


# -- servers -----------------------------------------------------------------------------------------


def srvit_env() -> dict[str, str]:
    """srvit as the README runs it, with the latency target its `auto` example sets."""
    return {"SRVIT_LATENCY_TARGET_MS": f"{LATENCY_TARGET_MS:g}"}


@contextmanager
def peer_served(peer: Peer, folder: Path, cpus: set[int] | None, delay_ms: float, max_batch: int = 32,
                ready_timeout_s: float = 180.0) -> Iterator[Server]:  # fmt: skip
    """A peer's server process (and all it starts, in its own process group) serving `folder`, ready."""
    module = importlib.import_module(peer.module)
    port = free_port()
    log = Path(tempfile.mkstemp(prefix=f"peer-{peer.name}-", suffix=".log")[1])
    command = [str(peer.python), "-m", peer.module, "--folder", str(folder), "--host", "127.0.0.1", "--port",
               str(port), "--max-batch", str(max_batch), "--max-delay-ms", f"{delay_ms:g}"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SRVIT_", "VIRTUAL_ENV"))}
    env |= {"PYTHONPATH": str(ROOT), "PATH": f"{peer.python.parent}:{env.get('PATH', '')}"}
    with pinned(cpus), log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", process, {}, log)
    try:
        wait_ready(server, ready_timeout_s, module.READY_PATH)
        yield server
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """SIGTERM to the whole process group (Ray starts a raylet and workers), SIGKILL to what outstays it."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    stop(process, timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _cpus(placement: str) -> dict[str, set[int] | None]:
    return PINNED if placement == "pinned" else {"server": None, "client": None}


def _deepest(repo: Path, model: str) -> Path:
    return depth_folder(repo, model, max(load_models(repo)[model].depths))


# -- workloads ---------------------------------------------------------------------------------------


def top1(repo: Path, name: str) -> dict[str, float | None]:
    """Top-1 per depth from the manifests (None: random weights, nothing measured) and the adaptive policy's
    expected top-1 on the check half, when the export fitted one."""
    out = {}
    for depth, graph in sorted(load_models(repo)[name].graphs.items()):
        accuracy = graph.manifest.accuracy
        out[str(depth)] = accuracy["top1"] if accuracy else None
        if graph.manifest.adaptive is not None:
            out["adaptive"] = graph.manifest.adaptive.expected["check"]["top1"]
    return out


def small_repo(folder: Path) -> Path:
    """srvit_small_patch16_224 with random weights (seed 0), exported by `srvit export`'s pipeline into
    `folder/repo`; an export already there from the same checkpoint is reused."""
    repo, checkpoint = folder / "repo", folder / f"{SMALL}.safetensors"
    if (repo / f"{SMALL}_d4" / "manifest.json").exists() and checkpoint.exists():
        return repo
    import torch

    from export.pipeline import export_checkpoint
    from srvit.checkpoint import save_checkpoint
    from srvit.data import Preprocessing
    from srvit.registry import create_model

    console.print(f"exporting {SMALL} (random weights) into {repo}: a few minutes")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = create_model(SMALL).eval()
    labels = [f"class_{i}" for i in range(model.cfg.num_classes)]
    save_checkpoint(checkpoint, model, {"labels": labels, "preprocessing": Preprocessing.imagenet(224).to_dict()})
    export_checkpoint(checkpoint, SMALL, repo, data=None, parity_images=8, max_batch=32)
    return repo
