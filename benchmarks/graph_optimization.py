"""Does simplifying the exported graphs pay? The exported graph vs onnxslim's vs ONNX Runtime's offline-optimized one.

Every variant runs the way the server runs it (ONNX Runtime CPU, the server's session options), in one process, one
after the other, on the same real test images; parity is against the exported graph. Needs `pip install onnxslim`.

    python benchmarks/graph_optimization.py --repo model_repo --model srvit_fashion --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from service.runtime import session_options
from srvit.data import FASHION_MNIST_DIR, fashion_mnist_dataset


def session(path: Path, threads: int) -> tuple[ort.InferenceSession, float]:
    t0 = time.perf_counter()
    s = ort.InferenceSession(str(path), session_options(threads, spinning=False), ["CPUExecutionProvider"])
    return s, time.perf_counter() - t0


def offline_optimized(src: Path, dst: Path) -> Path:
    options = session_options(0, spinning=False)
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, ["CPUExecutionProvider"])
    return dst


def slimmed(src: Path, dst: Path) -> Path:
    import onnxslim

    onnx.save(onnxslim.slim(onnx.load(str(src))), str(dst))
    return dst


def images_per_s(s: ort.InferenceSession, x: np.ndarray, batch: int, seconds: float) -> float:
    """Median of five timed slices, each running back-to-back batches for seconds / 5."""
    feed = {"images": x[:batch]}
    s.run(None, feed)
    rates = []
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            s.run(None, feed)
            n += batch
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def count_nodes(path: Path) -> int:
    return len(onnx.load(str(path)).graph.node)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", type=Path, default=Path("model_repo"))
    p.add_argument("--model", default="srvit_fashion")
    p.add_argument("--depths", default="1,4")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's choice)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per (variant, batch)")
    p.add_argument("--out", type=Path, default=None, help="write graph_optimization.md here")
    args = p.parse_args()
    x = fashion_mnist_dataset(FASHION_MNIST_DIR, "test", 256).tensors[0].numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in map(int, args.depths.split(",")):
            exported = args.repo / f"{args.model}_d{depth}" / "1" / "model.onnx"
            variants = {
                "exported": exported,
                "onnxslim": slimmed(exported, Path(tmp) / f"slim_d{depth}.onnx"),
                "ORT offline": offline_optimized(exported, Path(tmp) / f"ort_d{depth}.onnx"),
            }
            reference = session(exported, args.threads)[0].run(None, {"images": x})[0]
            for name, path in variants.items():
                s, load_s = session(path, args.threads)
                diff = float(np.abs(s.run(None, {"images": x})[0] - reference).max())
                rate1 = images_per_s(s, x, 1, args.seconds)
                rate32 = images_per_s(s, x, 32, args.seconds)
                rows.append((depth, name, count_nodes(path), path.stat().st_size, load_s, diff, rate1, rate32))
    header = "| depth | graph | nodes | size KiB | load ms | max abs diff | images/s batch 1 | images/s batch 32 |"
    lines = [header, "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for depth, name, nodes, size, load_s, diff, r1, r32 in rows:
        lines.append(f"| {depth} | {name} | {nodes} | {size / 1024:.0f} | {load_s * 1000:.0f} | {diff:.1e} | "
                     f"{r1:.0f} | {r32:.0f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    if args.out:
        threads = args.threads or "auto"
        meta = f"ONNX Runtime {ort.__version__}, intra-op threads {threads}, 256 Fashion-MNIST test images"
        (args.out / "graph_optimization.md").write_text(f"# Graph simplification, measured\n\n{meta}.\n\n{table}\n")


if __name__ == "__main__":
    main()
