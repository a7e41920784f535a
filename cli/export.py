"""`srvit export`: the export pipeline's own options and handler."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from export.pipeline import add_arguments

    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from export.pipeline import main

    return main(args)
