"""`srvit bench accuracy`: top-1 of test images sent over HTTP, next to the export's own measurement."""

from __future__ import annotations

import argparse
import asyncio
import math

import numpy as np

from bench import loadgen
from bench.images import load_pngs
from bench.loadgen import Target
from bench.report import accuracy_table, console, write_json
from bench.servers import served_model


def run_accuracy(args: argparse.Namespace) -> int:
    pngs, labels = load_pngs(args.data, args.limit)
    reference = manifest_accuracy(args.url, args.model)
    deepest = deepest_gflops(args.url, args.model)
    rows = []
    for depth in args.depth:
        target = Target(args.url, depth, args.model, args.timeout)
        results = asyncio.run(loadgen.sweep(target, pngs, args.concurrency))
        rows.append(accuracy_row(depth, results, labels, reference.get(depth), deepest))
    console.print(accuracy_table(rows))
    if args.json:
        write_json(args.json, {"url": args.url, "rows": rows})
    return 0 if all(row["errors"] == {} for row in rows) else 1


def manifest_accuracy(url: str, model: str | None) -> dict[str, float]:
    """{depth: top-1} as the export measured it, from GET /v1/models; depths without a measurement are absent."""
    try:
        entry = served_model(url, model)
    except LookupError as e:
        raise SystemExit(str(e)) from None
    found = {}
    for depth in entry.get("depths", []):
        accuracy = depth.get("accuracy")
        if accuracy and accuracy.get("top1") is not None:
            found[str(depth["depth"])] = accuracy["top1"]
    return found


def deepest_gflops(url: str, model: str | None) -> float | None:
    """GFLOPs per image at the model's deepest depth, from GET /v1/models; None for an export without FLOPs."""
    return served_model(url, model)["depths"][-1].get("gflops")


def accuracy_row(depth: str, results: list[loadgen.Result], labels: np.ndarray, reference: float | None,
                 deepest_gflops: float | None = None) -> dict:  # fmt: skip
    """Top-1 of the answers, and the mean compute the server reported per answered image (GFLOPs, and as a
    fraction of the deepest depth's)."""
    ok = [(r, int(label)) for r, label in zip(results, labels, strict=True) if r.status == 200]
    top1 = sum(r.index == label for r, label in ok) / len(ok) if ok else math.nan
    errors = loadgen.summarize(loadgen.Run(results, (0.0, 1.0)))["errors"]
    diff = top1 - reference if reference is not None else None
    spent = [r.gflops for r, _ in ok]
    gflops = float(np.mean(spent)) if spent and None not in spent else None
    share = gflops / deepest_gflops if gflops is not None and deepest_gflops else None
    return {"depth": depth, "images": len(results), "answered": len(ok), "top1_http": top1,
            "top1_manifest": reference, "difference": diff, "gflops_per_image": gflops,
            "compute_vs_deepest": share, "errors": errors}  # fmt: skip
