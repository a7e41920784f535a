"""`srvit bench`: the benchmark package's own subcommands (needs the `bench` extra)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.cli import add_arguments

    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from bench.cli import main

    return main(args)
