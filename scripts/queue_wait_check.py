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
import time
from pathlib import Path

import aiohttp


async def classify(session: aiohttp.ClientSession, url: str, image: bytes, depth: int) -> tuple[int, dict]:
    async with session.post(f"{url}/classify", params={"depth": str(depth)}, data=image,
                            headers={"Content-Type": "image/jpeg"}) as r:  # fmt: skip
        return r.status, await r.json()


async def models(url: str) -> list[dict]:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/v1/models") as r:
        return (await r.json())["models"]


async def capacity(url: str, image: bytes, depth: int, seconds: float, concurrency: int = 32) -> float:
    """Answered requests per second, closed loop."""
    done, stop = [0], time.perf_counter() + seconds

    async def worker(session):
        while time.perf_counter() < stop:
            status, _ = await classify(session, url, image, depth)
            done[0] += status == 200

    async with aiohttp.ClientSession() as session:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(session) for _ in range(concurrency)])
        return done[0] / (time.perf_counter() - t0)


async def overload(url: str, image: bytes, depth: int, rate: float, seconds: float) -> list[tuple[int, dict]]:
    """Open loop: a request every 1/rate s whatever the answers."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks, t0 = [], time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
            tasks.append(asyncio.ensure_future(classify(session, url, image, depth)))
        return await asyncio.gather(*tasks)


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
    (model,) = asyncio.run(models(args.url))
    depth = next(d for d in model["depths"] if d["depth"] == args.depth)
    limit = depth["max_batch_size"]
    batch_ms = max(float(v) for v in depth["latency_ms"].values())  # the largest batch warm-up timed
    rate = args.rate or 1.5 * asyncio.run(capacity(args.url, image, args.depth, args.seconds / 2, args.concurrency))
    answers = asyncio.run(overload(args.url, image, args.depth, rate, args.seconds))
    served = [body for status, body in answers if status == 200]
    codes = sorted({status for status, _ in answers})
    waits = sorted(body["timing_ms"]["queue"] for body in served)
    refused = sum(status == 503 for status, _ in answers)
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
