"""The LitServe peer: Lightning AI's FastAPI-based model server (a `LitAPI` served by a `LitServer`).

Batching is LitServe's own: `LitAPI(max_batch_size=--max-batch, batch_timeout=--max-delay-ms / 1000)`; one inference
worker process runs decode_request, batch, predict and unbatch, fed by one uvicorn API server process. The image
arrives as LitServe documents file uploads: multipart/form-data, the file in the field "content", read in
decode_request (so the decoding happens in the inference worker, one image after another, before the batch runs).
"""

from __future__ import annotations

import functools
import signal
import sys

READY_PATH = "/health"  # LitServe's healthcheck: 200 once every inference worker has finished setup()
CLASSIFY_PATH = "/predict"  # LitAPI's default api_path
FORM_FIELD = "content"


def __getattr__(name: str):
    # LitServe pickles the LitAPI into its inference worker (a spawned process), so the class must be found by name
    # in this module; it is made on first use, as litserve is installed only in the peer's own venv.
    if name == "ClassifierAPI":
        return _classifier_api()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _classifier_api() -> type:
    import litserve as ls
    from fastapi import HTTPException

    from bench.peers.common import Classifier
    from service.errors import ServiceError

    class ClassifierAPI(ls.LitAPI):
        def __init__(self, folder: str, **kwargs):
            super().__init__(**kwargs)
            self.folder = folder

        def setup(self, device):
            self.classifier = Classifier(self.folder)

        def decode_request(self, request):
            upload = request.get(FORM_FIELD)
            if not hasattr(upload, "file"):
                raise HTTPException(400, f'send the image as the multipart/form-data file field "{FORM_FIELD}"')
            try:
                return self.classifier.preprocess(upload.file.read())
            except ServiceError as e:
                raise HTTPException(e.status, e.message) from None

        def predict(self, batch):  # LitAPI.batch has stacked decode_request's arrays: [N, C, H, W]
            return self.classifier.run(batch)

        def unbatch(self, logits):
            return list(logits)

        def encode_response(self, logits):
            return self.classifier.answer(logits)

    ClassifierAPI.__qualname__ = "ClassifierAPI"
    return ClassifierAPI


def main(argv: list[str] | None = None) -> None:
    from bench.peers.common import peer_args

    args = peer_args(argv, __doc__)

    import litserve as ls

    # Through the module's import name, not __main__: the worker unpickles the class from there.
    from bench.peers.litserve_app import ClassifierAPI

    api = ClassifierAPI(args.folder, max_batch_size=args.max_batch, batch_timeout=args.max_delay_ms / 1000)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    # SIGTERM -> SystemExit in the main process, whose `finally` stops the worker and API server processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run(host=args.host, port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
