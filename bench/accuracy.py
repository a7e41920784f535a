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
    rows = []
    for depth in args.depth:
        target = Target(args.url, depth, args.model, args.timeout)
        results = asyncio.run(loadgen.sweep(target, pngs, args.concurrency))
        rows.append(accuracy_row(depth, results, labels, reference.get(depth)))
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


def accuracy_row(depth: str, results: list[loadgen.Result], labels: np.ndarray, reference: float | None) -> dict:
    answered = [(r.index, int(label)) for r, label in zip(results, labels, strict=True) if r.status == 200]
    top1 = sum(index == label for index, label in answered) / len(answered) if answered else math.nan
    errors = loadgen.summarize(loadgen.Run(results, (0.0, 1.0)))["errors"]
    diff = top1 - reference if reference is not None else None
    return {"depth": depth, "images": len(results), "answered": len(answered), "top1_http": top1,
            "top1_manifest": reference, "difference": diff, "errors": errors}  # fmt: skip
