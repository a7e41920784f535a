"""NVIDIA Triton Inference Server through PyTriton: the `tritonserver` binary nvidia-pytriton ships (2.51), its HTTP
front end and dynamic batcher (`max_batch_size`, `max_queue_delay_microseconds`), the model a Python function bound
with `@batch` that decodes and runs ONNX Runtime. The image arrives as Triton's clients send bytes: one BYTES input
in a V2 binary request; the answer is one BYTES output holding /classify's JSON.

    python -m bench.peers.pytriton_server --folder model_repo/srvit_fashion_d4 --port 8001
"""

from __future__ import annotations

import json
import socket

MODEL = "srvit"
READY_PATH = f"/v2/models/{MODEL}/ready"
CLASSIFY_PATH = f"/v2/models/{MODEL}/infer"
FORM_FIELD = None
V2 = True  # the request is a V2 binary BYTES request (bench.loadgen.Wire.v2)


def main(argv: list[str] | None = None) -> None:
    import numpy as np
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    from bench.peers.common import Classifier, peer_args

    args = peer_args(argv, __doc__)
    classifier = Classifier(args.folder)

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        answers = classifier.classify([bytes(row[0]) for row in image])  # image: [N, 1] of encoded files
        return {"answer": np.array([[json.dumps(a).encode()] for a in answers], dtype=np.object_)}

    config = TritonConfig(http_address=args.host, http_port=args.port, grpc_port=_free_port(),
                          metrics_port=_free_port(), allow_gpu_metrics=False, log_verbose=0)  # fmt: skip
    batcher = DynamicBatcher(max_queue_delay_microseconds=round(args.max_delay_ms * 1000))
    with Triton(config=config) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="answer", dtype=np.bytes_, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch, batcher=batcher),
        )
        triton.serve()  # until SIGTERM or SIGINT


def _free_port() -> int:
    """Triton opens gRPC and metrics ports too; the benchmark names only the HTTP one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
