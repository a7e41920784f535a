"""The `srvit` command: train, eval, export, serve, bench. Heavy imports happen inside each subcommand."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def _add_train(sub) -> None:
    from srvit.train_config import TrainConfig  # dataclass fields become flags

    p = sub.add_parser("train", help=COMMANDS["train"][1])
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            p.add_argument(flag, type=kind, default=f.default)
    p.set_defaults(func=_run_train)


def _run_train(args) -> int:
    from srvit.checkpoint import CheckpointError
    from srvit.train import train
    from srvit.train_config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    try:
        path = train(TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}))
    except CheckpointError as e:  # a run folder to resume that does not fit
        print(f"srvit train: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help=COMMANDS["eval"][1])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", type=Path, default=None, help="Fashion-MNIST IDX folder or ImageFolder root (with val/)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out images only")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from srvit.checkpoint import CheckpointError
    from srvit.report import eval_report, print_eval_table

    try:
        report = eval_report(args.checkpoint, args.data, args.limit)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"srvit eval: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_eval_table(report)
    return 0


def _add_export(sub) -> None:
    from export.pipeline import add_arguments

    p = sub.add_parser("export", help=COMMANDS["export"][1])
    add_arguments(p)
    p.set_defaults(func=lambda a: __import__("export.pipeline", fromlist=["main"]).main(a))


def _add_serve(sub) -> None:
    from service.cli import add_arguments

    p = sub.add_parser("serve", help=COMMANDS["serve"][1])
    add_arguments(p)
    p.set_defaults(func=lambda a: __import__("service.cli", fromlist=["main"]).main(a))


def _add_bench(sub) -> None:
    from service.bench import add_arguments

    p = sub.add_parser("bench", help=COMMANDS["bench"][1])
    add_arguments(p)
    p.set_defaults(func=lambda a: __import__("service.bench", fromlist=["main"]).main(a))


COMMANDS = {
    "train": (_add_train, "any-depth training (also under torchrun --nproc_per_node=N)"),
    "eval": (_add_eval, "top-1 per depth, parameters, GFLOPs, images/s"),
    "export": (_add_export, "checkpoint -> per-depth ONNX (+ TensorRT) in a Triton model repository"),
    "serve": (_add_serve, "serve model_repo/ over HTTP"),
    "bench": (_add_bench, "load-test a server and raw ONNX Runtime; writes docs/"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """Only the chosen subcommand imports its module, so `srvit serve` never loads torch."""
    parser = argparse.ArgumentParser(prog="srvit", description="Train, export and serve SR-ViT models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, help_) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_)
            continue
        try:
            add(sub)
        except ImportError as e:  # keep the rest of the line so the hint, not argparse, answers
            stub = sub.add_parser(name, help=help_)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(missing=str(e))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if getattr(args, "missing", None):
        return _missing_extras(args.command, args.missing)
    try:
        return args.func(args)
    except ModuleNotFoundError as e:  # train and eval import torch only when they run
        return _missing_extras(args.command, str(e))


def _missing_extras(command: str, why: str) -> int:
    print(f"srvit {command}: {why}; install the extras: pip install -e '.[export]'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
