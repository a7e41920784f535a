"""`srvit train`: one flag per TrainConfig field."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from srvit.train_config import TrainConfig  # dataclass fields become flags

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = {"int": int, "float": float, "int | None": int}.get(f.type, str)
            parser.add_argument(flag, type=kind, default=f.default)


def run(args: argparse.Namespace) -> int:
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
