"""`python -m service`: the same server as `srvit serve`, without the `cli` package."""

from __future__ import annotations

import argparse
import sys

from service.cli import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m service", description="Serve model_repo/ over HTTP.")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
