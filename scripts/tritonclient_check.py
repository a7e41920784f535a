"""A Triton user's check of a running srvit, with nothing but tritonclient: every Fashion-MNIST test image as
PNG bytes in the BYTES input `image`, over gRPC and over HTTP, at each depth folder (srvit_fashion_d1..d4);
top-1 against the accuracy each manifest records; then gRPC against HTTP throughput at concurrency 8 and 32
on the same images, alternated, several repetitions.

    srvit serve --repo model_repo &           # HTTP :8000, gRPC :8001
    python scripts/tritonclient_check.py --http 127.0.0.1:8000 --grpc 127.0.0.1:8001

Pin the server and this script to different cores (taskset) when the throughput figures matter.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from PIL import Image

DATA = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
MODULES = {"grpc": tgrpc, "http": thttp}


def test_set(root: Path, limit: int | None) -> tuple[list[bytes], np.ndarray]:
    images = np.frombuffer(gzip.decompress((root / "t10k-images-idx3-ubyte.gz").read_bytes()), np.uint8, offset=16)
    labels = np.frombuffer(gzip.decompress((root / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
    images = images.reshape(-1, 28, 28)[:limit]
    pngs = []
    for pixels in images:
        buf = io.BytesIO()
        Image.fromarray(pixels, "L").save(buf, "PNG")
        pngs.append(buf.getvalue())
    return pngs, labels[: len(pngs)]


def run(protocol: str, url: str, model: str, pngs: list[bytes], concurrency: int) -> tuple[np.ndarray, float, int]:
    """Every image once, `concurrency` threads each with its own client; (predicted class per image, req/s,
    errors)."""
    module = MODULES[protocol]
    predicted = np.full(len(pngs), -1)
    errors, next_index, lock = [0], [0], threading.Lock()

    def worker():
        client = module.InferenceServerClient(url)
        output = module.InferRequestedOutput("logits", class_count=1)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= len(pngs):
                break
            tensor = module.InferInput("image", [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[pngs[i]]], dtype=object))
            try:
                top = client.infer(model, [tensor], outputs=[output]).as_numpy("logits")[0][0]
                predicted[i] = int(top.decode().split(":")[1])  # "value:index:label"
            except Exception:  # counted, never fatal: the figures say how many failed
                with lock:
                    errors[0] += 1
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return predicted, len(pngs) / (time.perf_counter() - t0), errors[0]


def manifest_top1(repo: Path, folder: str) -> float | None:
    accuracy = json.loads((repo / folder / "manifest.json").read_text()).get("accuracy") or {}
    return accuracy.get("top1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", default="127.0.0.1:8000")
    parser.add_argument("--grpc", default="127.0.0.1:8001")
    parser.add_argument("--model", default="srvit_fashion")
    parser.add_argument("--repo", type=Path, default=Path("model_repo"))
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=None, help="first N test images (default all 10,000)")
    parser.add_argument("--concurrency", type=int, default=32, help="for the accuracy pass")
    parser.add_argument("--throughput-images", type=int, default=3000, help="per throughput repetition")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    urls = {"grpc": args.grpc, "http": args.http}
    for protocol, url in urls.items():
        if not MODULES[protocol].InferenceServerClient(url).is_server_ready():
            raise SystemExit(f"{protocol} at {url} is not ready")
    index = thttp.InferenceServerClient(args.http).get_model_repository_index()
    depths = [m["name"] for m in index if m["name"] != args.model]
    pngs, labels = test_set(args.data, args.limit)
    print(f"{len(pngs)} Fashion-MNIST test images as PNG; folders {depths}; accuracy pass at concurrency "
          f"{args.concurrency}")  # fmt: skip
    print(f"{'folder':<20}{'protocol':<10}{'top-1':>8}{'manifest':>10}{'errors':>8}{'req/s':>8}")
    failed = False
    for folder in depths:
        reference = manifest_top1(args.repo, folder)
        for protocol, url in urls.items():
            predicted, rate, errors = run(protocol, url, folder, pngs, args.concurrency)
            top1 = float((predicted == labels).mean())
            shown = f"{reference:.4f}" if reference is not None else "-"
            print(f"{folder:<20}{protocol:<10}{top1:>8.4f}{shown:>10}{errors:>8}{rate:>8.0f}")
            compared = reference is not None and args.limit is None  # the manifest's figure is for all images
            failed |= errors > 0 or (compared and abs(top1 - reference) > 0.001)
    deepest, sample = depths[-1], pngs[: args.throughput_images]
    print(f"\nthroughput, {deepest}, {len(sample)} requests per run, {args.repeats} runs alternating gRPC and HTTP")
    for concurrency in (8, 32):
        rates = {p: [] for p in urls}
        for _ in range(args.repeats):
            for protocol, url in urls.items():
                rates[protocol].append(run(protocol, url, deepest, sample, concurrency)[1])
        for protocol, r in rates.items():
            print(f"c={concurrency:<3} {protocol:<5} req/s median {statistics.median(r):6.0f}  min {min(r):6.0f}  "
                  f"max {max(r):6.0f}")  # fmt: skip
        ratio = [g / h for g, h in zip(rates["grpc"], rates["http"], strict=True)]
        print(f"c={concurrency:<3} gRPC/HTTP per run: {', '.join(f'{x:.2f}' for x in ratio)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
