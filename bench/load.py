"""`srvit bench load`: closed- or open-loop runs against a server someone else started, one row per run."""

from __future__ import annotations

import argparse

from bench.images import load_pngs
from bench.loadgen import Target, measure
from bench.report import console, load_line, load_table, write_json


def run_load(args: argparse.Namespace) -> int:
    pngs, _ = load_pngs(args.data, args.images)
    loads = [{"rate": r} for r in args.rate] if args.rate else [{"concurrency": c} for c in args.concurrency]
    rows = []
    for depth in args.depth:
        target = Target(args.url, depth, args.model, args.timeout)
        for load in loads:
            rows.append(measure(target, pngs, **load, duration_s=args.duration, warmup_s=args.warmup))
            console.print(load_line(rows[-1]))
    console.print(load_table(rows, "srvit bench load"))
    if args.json:
        write_json(args.json, {"url": args.url, "rows": rows})
    return 0 if all(row["ok"] for row in rows) else 1
