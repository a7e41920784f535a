"""depth=adaptive against the deepest depth, served: throughput at saturation, a lone request's latency, and an
open-loop overload at 1.5x the deepest depth's capacity under a latency target.

    python scripts/adaptive_check.py --repo model_repo --runs 3 --json runs/adaptive_check.json

Each placement starts its own `srvit serve` (the README's settings, SRVIT_LATENCY_TARGET_MS as given: under load,
adaptive images go no deeper than the depth auto has been pushed down to, so a generous target shows the policy
unhindered): pinned runs
the server on core 1 and this load generator on core 0; shared lets both use every core. Closed-loop cells are
repeated `--runs` times in turn (depth 4, adaptive, depth 4, ...), so a slow moment hits both; the overload is
offered to depth 4, auto and adaptive in turn on the same server, 1.5x the median depth-4 throughput at
concurrency 32.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

from bench.images import load_pngs
from bench.loadgen import Target, measure, open_loop, percentile
from bench.servers import pinned, served
from modelrepo.idx import FASHION_MNIST_DIR

PLACEMENTS = {"pinned": ({1}, {0}), "shared": (None, None)}  # server cores, client cores


def closed_cells(url: str, model: str, pngs, depths, runs: int, seconds: float) -> list[dict]:
    rows = []
    for run in range(runs):
        for depth in depths:
            for concurrency in (1, 32):
                row = measure(Target(url, depth, model), pngs, concurrency=concurrency, duration_s=seconds,
                              warmup_s=1.0)  # fmt: skip
                rows.append({"run": run, **row})
                lat, mix = row["latency_ms"], {d: round(share, 3) for d, share in row["depth_mix"].items()}
                print(f"  run {run} depth {depth} c={concurrency}: {row['images_per_s']:.1f} images/s, "
                      f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.1f} ms, mix {mix}", flush=True)  # fmt: skip
    return rows


def overload(url: str, model: str, pngs, rate: float, seconds: float, target_ms: float, runs: int,
             depths: list[str]) -> list[dict]:  # fmt: skip
    rows = []
    for depth in [d for _ in range(runs) for d in depths]:
        run = asyncio.run(open_loop(Target(url, depth, model, timeout_s=60), pngs, rate, seconds, 2.0))
        sent = len(run.results)
        ok = sorted(r.latency_s * 1000 for r in run.results if r.status == 200)
        within = sum(ms <= target_ms for ms in ok)
        statuses = sorted({str(r.status) for r in run.results})
        row = {"depth": depth, "rate": rate, "sent": sent, "answered": len(ok), "within_target": within,
               "answered_share": len(ok) / sent, "within_target_share": within / sent,
               "p50_ms": percentile(ok, 50), "p95_ms": percentile(ok, 95), "p99_ms": percentile(ok, 99),
               "statuses": {s: sum(str(r.status) == s for r in run.results) for s in statuses}}  # fmt: skip
        rows.append(row)
        print(f"  overload {rate:.0f} req/s depth {depth}: answered {len(ok)}/{sent} ({row['answered_share']:.1%}), "
              f"within {target_ms:g} ms {row['within_target_share']:.1%}, p50 {row['p50_ms']:.1f} p95 "
              f"{row['p95_ms']:.1f} p99 {row['p99_ms']:.1f} ms, statuses {row['statuses']}", flush=True)  # fmt: skip
    return rows


def summary(rows: list[dict], depth: str, concurrency: int, key: str) -> list[float]:
    return [r[key] if key == "images_per_s" else r["latency_ms"][key] for r in rows
            if r["depth"] == depth and r["concurrency"] == concurrency]  # fmt: skip


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path("model_repo"))
    parser.add_argument("--model", default="srvit_fashion")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="per closed-loop cell")
    parser.add_argument("--overload-seconds", type=float, default=20.0)
    parser.add_argument("--overload-runs", type=int, default=3, help="depth 4, auto, adaptive in turn, this often")
    parser.add_argument("--latency-target-ms", type=float, default=100.0)
    parser.add_argument("--placements", default="pinned,shared")
    parser.add_argument("--no-overload", action="store_true", help="closed-loop cells only")
    parser.add_argument("--closed-depths", type=_list, default=["4", "adaptive"], help="must include 4 and adaptive")
    parser.add_argument("--overload-depths", type=_list, default=["4", "auto", "adaptive"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    pngs, _ = load_pngs(FASHION_MNIST_DIR, 1000)
    env = {"SRVIT_LATENCY_TARGET_MS": f"{args.latency_target_ms:g}"}
    report = {}
    for placement in args.placements.split(","):
        server_cpus, client_cpus = PLACEMENTS[placement]
        print(f"{placement}: server on {server_cpus or 'every core'}, client on {client_cpus or 'every core'}")
        with served(args.repo, env, server_cpus) as server, pinned(client_cpus):
            rows = closed_cells(server.url, args.model, pngs, args.closed_depths, args.runs, args.seconds)
            capacity = statistics.median(summary(rows, "4", 32, "images_per_s"))
            loaded = [] if args.no_overload else overload(server.url, args.model, pngs, 1.5 * capacity,
                                                          args.overload_seconds, args.latency_target_ms,
                                                          args.overload_runs, args.overload_depths)  # fmt: skip
        report[placement] = {"closed": rows, "overload": loaded, "capacity_depth4": capacity}
        for what, c, key in (("throughput c=32", 32, "images_per_s"), ("p50 c=1", 1, "p50")):
            d4, ad = summary(rows, "4", c, key), summary(rows, "adaptive", c, key)
            ratios = [a / b for a, b in zip(ad, d4, strict=True)]
            print(f"{placement} {what}: depth 4 {min(d4):.2f}-{max(d4):.2f} (median {statistics.median(d4):.2f}), "
                  f"adaptive {min(ad):.2f}-{max(ad):.2f} (median {statistics.median(ad):.2f}); adaptive / depth 4 "
                  f"per run {', '.join(f'{r:.2f}' for r in ratios)}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
