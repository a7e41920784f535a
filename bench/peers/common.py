"""What every peer server shares, so that only the serving framework differs between them: one depth's folder of
the model repository (its ONNX graph, manifest and labels), srvit's own image preprocessing, the same ONNX Runtime
session settings srvit uses on CPU, and the same answer, srvit's /classify `predictions`.

Peers run in their own virtual environments (`scripts/peers-venv.sh`) with the repository root on PYTHONPATH: this
module needs numpy, Pillow and onnxruntime only (and imports `service.preprocess` and `modelrepo.manifest`, which
need no more).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from modelrepo.manifest import Manifest
from service.errors import ServiceError
from service.preprocess import Preprocessor

# ServiceError is what a bad image raises: its `status` is the 4xx to answer with.
__all__ = ["Classifier", "ServiceError", "depth_folder", "peer_args", "session_options"]

TOP_K = 5
MAX_PIXELS = 40_000_000  # srvit's default SRVIT_MAX_PIXELS
MAX_BATCH = 32  # every batching peer's largest batch: srvit's batcher's default (SRVIT_MAX_BATCH_SIZE)


class Classifier:
    """One depth of one model: bytes -> [C, H, W] (srvit's Preprocessor), a batch -> logits (ONNX Runtime),
    logits -> the top-5 answer. Thread-safe: ONNX Runtime sessions may be run from several threads."""

    def __init__(self, folder: Path | str):
        folder = Path(folder)
        self.manifest = Manifest.from_dict(json.loads((folder / "manifest.json").read_text()))
        self.labels = list(self.manifest.labels)
        self.preprocess = Preprocessor(self.manifest.preprocessing, MAX_PIXELS)
        self.session = ort.InferenceSession(
            str(folder / self.manifest.model_file), session_options(), ["CPUExecutionProvider"]
        )
        self.input_name = self.manifest.input.name
        self.run(np.zeros((1, *self.preprocess.shape), np.float32))  # the first run allocates: not a request's

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 [N, C, H, W] -> logits [N, classes]."""
        return self.session.run(None, {self.input_name: batch})[0]

    def answer(self, logits: np.ndarray) -> dict:
        """One image's logits -> {"predictions": [{index, label, probability}] * TOP_K}, best first."""
        e = np.exp(logits - logits.max())
        probabilities = e / e.sum()
        best = np.argsort(-probabilities)[:TOP_K]
        return {
            "predictions": [
                {"index": int(i), "label": self.labels[i], "probability": float(probabilities[i])} for i in best
            ]
        }

    def classify(self, images: list[bytes]) -> list[dict]:
        """Decode, stack, run once, answer each: a batching peer's whole model function."""
        logits = self.run(np.stack([self.preprocess(data) for data in images]))
        return [self.answer(row) for row in logits]


def session_options() -> ort.SessionOptions:
    """srvit's CPU session settings (service/runtime.session_options with its defaults): ONNX Runtime's own thread
    count for the cores the process may use, no spinning, one graph at a time, every graph optimization. Written out
    here because service.runtime imports onnx (through service.repository), which the peers' venvs do not hold."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 0
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def depth_folder(repo: Path | str, model: str, depth: int) -> Path:
    """`<repo>/<model>_d<depth>`, the layout `srvit export` writes."""
    return Path(repo) / f"{model}_d{depth}"


def peer_args(argv: list[str] | None, doc: str) -> argparse.Namespace:
    """The flags every peer module takes (the benchmark starts each the same way); a peer that does not batch
    ignores the batch flags."""
    return peer_parser(doc).parse_args(argv)


def peer_parser(doc: str) -> argparse.ArgumentParser:
    """peer_args' parser, for a peer with a flag of its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--folder", required=True, help="one depth's folder of the model repository")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="largest batch")
    parser.add_argument("--max-delay-ms", type=float, default=0.0, help="how long a batch may wait to fill")
    return parser
