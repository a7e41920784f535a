"""The BentoML peer: a BentoML 1.4 service (`@bentoml.service`, one worker) run by `bentoml serve`.

Batching is BentoML's adaptive batching: `@bentoml.api(batchable=True, max_batch_size=--max-batch,
max_latency_ms=--max-latency-ms)`; BentoML learns its own batch window, and max_latency_ms is a deadline past which
it sheds queued requests with 503, not a wait, so --max-delay-ms has nothing to set (it is accepted and ignored).
The image arrives as BentoML documents files: multipart/form-data, a `Path` field ("images", a list as batchable
APIs take), decoded by a validator of that field before the request joins a batch.
"""

import ctypes
import functools
import json
import os
import signal
import sys

READY_PATH = "/readyz"  # BentoML's readiness probe: 200 once the worker has built the service
CLASSIFY_PATH = "/classify"  # the API method's name
FORM_FIELD = "images"

# What main() hands the service, which `bentoml serve` builds in its worker process.
_ENV = "SRVIT_BENTOML_PEER"


def __getattr__(name: str):
    # `bentoml serve bench.peers.bentoml_service:ClassifierService` looks the service up here, in each process;
    # it is made on first use, as bentoml is installed only in the peer's own venv.
    if name == "ClassifierService":
        return _classifier_service()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _classifier_service():
    from pathlib import Path
    from typing import Annotated

    import bentoml
    import numpy as np
    from pydantic import AfterValidator

    from bench.peers.common import Classifier
    from service.errors import ServiceError

    settings = json.loads(os.environ[_ENV])

    @functools.cache
    def classifier() -> Classifier:  # only in the worker: the arbiter too loads the service, never calls it
        return Classifier(settings["folder"])

    def decode(path: Path) -> np.ndarray:
        """One upload -> [C, H, W]; a bad image fails its own request (400), not the batch it would join."""
        try:
            return classifier().preprocess(path.read_bytes())
        except ServiceError as e:
            raise ValueError(e.message) from None

    @bentoml.service(workers=1)
    class ClassifierService:
        def __init__(self):
            # circus starts this worker in a session of its own, out of reach of a signal to the arbiter's group:
            # it goes when the arbiter does, even killed (prctl PR_SET_PDEATHSIG).
            ctypes.CDLL(None).prctl(1, signal.SIGTERM)
            self.classifier = classifier()  # before /readyz answers 200

        @bentoml.api(batchable=True, max_batch_size=settings["max_batch"], max_latency_ms=settings["max_latency_ms"])
        def classify(self, images: list[Annotated[Path, AfterValidator(decode)]]) -> list[dict]:
            return [self.classifier.answer(row) for row in self.classifier.run(np.stack(images))]

    # A batchable API answers each request with its slice of the batch's outputs, a list of one; the peers all
    # answer one image's {"predictions": ...}.
    ClassifierService.add_asgi_middleware(_FirstItem)
    return ClassifierService


class _FirstItem:
    """ASGI middleware: the 200 JSON body `[x]` of POST CLASSIFY_PATH becomes `x`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CLASSIFY_PATH:
            return await self.app(scope, receive, send)
        start, chunks = {}, []

        async def unwrap(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = b"".join(chunks)
                if start["status"] == 200:
                    body = json.dumps(json.loads(body)[0]).encode()
                headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
                await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
            else:
                await send(message)

        await self.app(scope, receive, unwrap)


def main(argv: list[str] | None = None) -> None:
    from bench.peers.common import peer_parser

    parser = peer_parser(__doc__)  # --max-delay-ms is ignored: BentoML learns its own wait
    parser.add_argument("--max-latency-ms", type=int, default=60_000, help="BentoML's shedding deadline (its default)")
    args = parser.parse_args(argv)

    os.environ[_ENV] = json.dumps(
        {"folder": os.path.abspath(args.folder), "max_batch": args.max_batch, "max_latency_ms": args.max_latency_ms}
    )
    os.environ["BENTOML_DO_NOT_TRACK"] = "True"  # no usage report: it would try to reach BentoML's servers
    # This process becomes BentoML's arbiter (circus), which starts the one worker and stops it on SIGTERM.
    command = [sys.executable, "-m", "bentoml", "serve", f"{__spec__.name}:ClassifierService"]
    os.execv(sys.executable, [*command, "--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    main()
