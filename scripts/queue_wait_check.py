"""Does max_queue_wait_ms bound the queue in time? Against a running server: measure the capacity at one
depth (closed loop, concurrency 32), then offer 1.5x that open loop and report, from each answer's own
`timing_ms.queue`, the longest wait of any answered request next to the limit plus one batch.

    srvit serve --repo <repo> --max-queue-wait-ms 1000 &
    python scripts/queue_wait_check.py --url http://127.0.0.1:8000 --depth 4 --image photo.jpg

Pin the server and this script to different cores (taskset) so the load generator is not what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import httpx

from bench.loadgen import Target, closed_loop, open_loop

CLIENT_TIMEOUT_S = 300.0  # without a time bound, answers come tens of seconds late: wait for them


def capacity(target: Target, image: bytes, seconds: float, concurrency: int = 32) -> float:
    """Answered requests per second, closed loop."""
    run = asyncio.run(closed_loop(target, [image], concurrency, seconds))
    return sum(r.status == 200 for r in run.results) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--image", type=Path, required=True, help="a JPEG sent as every request's body")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--limit-ms", type=float, default=1000.0, help="the server's max_queue_wait_ms")
    parser.add_argument("--concurrency", type=int, default=32, help="of the capacity run")
    parser.add_argument("--rate", type=float, help="offer this many requests/s instead of 1.5x the measured capacity")
    args = parser.parse_args()
    image = args.image.read_bytes()
    (model,) = httpx.get(f"{args.url}/v1/models", timeout=10).raise_for_status().json()["models"]
    target = Target(args.url, str(args.depth), timeout_s=CLIENT_TIMEOUT_S)
    depth = next(d for d in model["depths"] if d["depth"] == args.depth)
    limit = depth["max_batch_size"]
    batch_ms = max(float(v) for v in depth["latency_ms"].values())  # the largest batch warm-up timed
    rate = args.rate or 1.5 * capacity(target, image, args.seconds / 2, args.concurrency)
    answers = asyncio.run(open_loop(target, [image], rate, args.seconds)).results  # a request every 1/rate s
    served = [r for r in answers if r.status == 200]
    codes = sorted({str(r.status) for r in answers})
    waits = sorted(r.queue_ms for r in served)
    refused = sum(r.status == 503 for r in answers)
    print(f"depth {args.depth}: batch limit {limit}, one full batch ~{batch_ms:.0f} ms (warm-up)")
    how = "as asked" if args.rate else "1.5x the measured capacity"
    print(f"offered {rate:.1f} req/s ({how}) for {args.seconds:.0f} s: {len(answers)} sent, "
          f"{len(served)} answered, {refused} refused 503, statuses {codes}")  # fmt: skip
    if waits:
        print(f"queue wait of answered requests ms: p50 {statistics.median(waits):.0f}  max {waits[-1]:.0f}  "
              f"(limit {args.limit_ms:.0f} + one batch {batch_ms:.0f} = {args.limit_ms + batch_ms:.0f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
