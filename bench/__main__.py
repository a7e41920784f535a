"""`python -m bench`: the same commands as `srvit bench`, without the umbrella CLI."""

from __future__ import annotations

import argparse
import sys

from bench.cli import add_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench", description="Load-test a server and raw ONNX Runtime.")
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
