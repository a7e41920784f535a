"""`srvit serve`: the server's own flags and handler; needs the base install only (no torch, no model library)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from service.cli import add_arguments

    add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from service.cli import main

    return main(args)
