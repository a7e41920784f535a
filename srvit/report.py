"""`srvit eval`: a checkpoint's per-depth report (top-1, GFLOPs, images/s) as a dict and as a table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table
from torch.utils.data import Dataset, Subset

from srvit import data as D
from srvit.checkpoint import load_checkpoint
from srvit.evaluate import count_parameters, evaluate_depths, gflops, images_per_second, router_usage


def held_out(meta: dict, data: Path | None, limit: int | None) -> tuple[Dataset, str]:
    """The checkpoint's held-out split: Fashion-MNIST test, or an ImageFolder's val/."""
    dataset = meta.get("training", {}).get("dataset", "")
    root = Path(data) if data else (D.FASHION_MNIST_DIR if dataset == "fashion-mnist" else None)
    if root is None and dataset.startswith("imagefolder:"):
        root = Path(dataset.removeprefix("imagefolder:"))
    if root is None:
        raise FileNotFoundError("no held-out data known for this checkpoint: pass --data DIR")
    if any(root.glob("t10k-images-idx3-ubyte*")):
        return D.fashion_mnist_dataset(root, "test", limit), "fashion-mnist test"
    pre = D.Preprocessing.from_dict(meta["preprocessing"])
    ds = D.ImageFolder(root / "val", pre, train=False)
    return (Subset(ds, range(min(limit, len(ds)))) if limit else ds), f"{root}/val"


def eval_report(checkpoint: Path, data: Path | None = None, limit: int | None = None) -> dict:
    model, meta = load_checkpoint(checkpoint)
    ds, split = held_out(meta, data, limit)
    top1 = evaluate_depths(model, ds)
    depths = [
        {
            "depth": d,
            "top1": top1[d],
            "gflops": round(gflops(model, d), 4),
            "images_per_s": round(images_per_second(model, d)),
        }
        for d in range(1, model.cfg.max_depth + 1)
    ]
    return {
        "checkpoint": str(checkpoint),
        "model": meta.get("model"),
        "parameters": count_parameters(model),
        "split": split,
        "images": len(ds),
        "depths": depths,
        "router_usage_at_max_depth": router_usage(model, ds),
    }


def print_eval_table(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    size = f"{report['parameters'] / 1e6:.3f}M parameters"
    title = f"{report['model']}: {size}, {report['images']} images of {report['split']}"
    table = Table(title=title)
    for col in ("depth", "top-1 %", "GFLOPs", "images/s"):
        table.add_column(col, justify="right")
    for row in report["depths"]:
        table.add_row(str(row["depth"]), f"{100 * row['top1']:.2f}", f"{row['gflops']:.4f}", f"{row['images_per_s']:,}")
    console.print(table)
    usage = report["router_usage_at_max_depth"]
    line = f"router weight per step at max depth: all tokens {usage['all_tokens']}"
    console.print(line + (f", class token {usage['class_token']}" if "class_token" in usage else ""))
