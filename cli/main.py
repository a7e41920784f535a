"""`srvit <command>`: picks the subcommand's module and imports only that, so `srvit serve` never loads torch."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module under cli/, help). Each module has add_arguments(parser) and run(args) -> exit status.
COMMANDS = {
    "train": ("cli.train", "any-depth training (also under torchrun --nproc_per_node=N)"),
    "eval": ("cli.evaluate", "top-1 per depth, parameters, GFLOPs, images/s"),
    "export": ("cli.export", "checkpoint -> per-depth ONNX (+ TensorRT) in a Triton model repository"),
    "serve": ("cli.serve", "serve model_repo/ over HTTP"),
    "bench": ("cli.bench", "load-test a server and raw ONNX Runtime; writes docs/"),
}
EXTRAS = {"train": "train", "eval": "train", "export": "export", "serve": None, "bench": "bench"}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """Every subcommand is listed; only `command`'s module is imported and given its real arguments."""
    parser = argparse.ArgumentParser(prog="srvit", description="Train, export and serve SR-ViT models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name != command:
            continue
        try:
            chosen = importlib.import_module(module)
            chosen.add_arguments(p)
        except ImportError as e:  # keep the rest of the line so the hint, not argparse, answers
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(missing=str(e))
        else:
            p.set_defaults(func=chosen.run)
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
    extra = EXTRAS.get(command) or "export"
    print(f"srvit {command}: {why}; install the extras: pip install -e '.[{extra}]'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
