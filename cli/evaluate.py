"""`srvit eval`: a checkpoint's top-1 per depth, parameters, GFLOPs and images/s."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=None, help="Fashion-MNIST IDX folder, or ImageFolder root (val/)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out images only")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from modelrepo.manifest import ManifestError
    from srvit.checkpoint import CheckpointError
    from srvit.report import eval_report, print_eval_table

    try:
        report = eval_report(args.checkpoint, args.data, args.limit)
    except (CheckpointError, ManifestError, FileNotFoundError) as e:  # ManifestError: its preprocessing
        print(f"srvit eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_eval_table(report)
    return 0
