"""The Ray Serve peer: one Ray Serve deployment (one replica) on a local, single-node Ray cluster that this process
starts and shuts down.

Batching is Ray Serve's own: `@serve.batch(max_batch_size=--max-batch, batch_wait_timeout_s=--max-delay-ms / 1000)`
on the replica's model method. The image arrives as Ray Serve's plain HTTP deployments take it, a Starlette
`Request`: the raw body (Content-Type image/png or image/jpeg), decoded in the replica before it joins a batch.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading

READY_PATH = "/ready"  # answered by the replica itself: 200 once the application is deployed
CLASSIFY_PATH = "/classify"
FORM_FIELD = None


def main(argv: list[str] | None = None) -> None:
    from bench.peers.common import peer_args

    args = peer_args(argv, __doc__)
    folder = os.path.abspath(args.folder)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report: it would try to reach Ray's servers
    import numpy as np
    import ray
    from ray import serve
    from starlette.responses import JSONResponse, PlainTextResponse

    # Ray Serve's default max_ongoing_requests (5) would cap every batch at 5: Serve's docs ask for at least
    # max_batch_size; twice that lets the next batch gather while one runs.
    @serve.deployment(num_replicas=1, max_ongoing_requests=2 * args.max_batch, ray_actor_options={"num_cpus": 1})
    class Classifier:
        def __init__(self):
            from bench.peers.common import Classifier

            self.classifier = Classifier(folder)

        @serve.batch(max_batch_size=args.max_batch, batch_wait_timeout_s=args.max_delay_ms / 1000)
        async def classify(self, images: list[np.ndarray]) -> list[dict]:
            return [self.classifier.answer(row) for row in self.classifier.run(np.stack(images))]

        async def __call__(self, request):
            from service.errors import ServiceError

            if request.method == "GET" and request.url.path == READY_PATH:
                return PlainTextResponse("ready")
            if request.method != "POST" or request.url.path != CLASSIFY_PATH:
                return PlainTextResponse("not found", status_code=404)
            try:
                image = self.classifier.preprocess(await request.body())
            except ServiceError as e:
                return JSONResponse({"error": e.message}, status_code=e.status)
            return JSONResponse(await self.classify(image))

    # A local cluster of its own, in a temporary folder: head processes (GCS, raylet and the agents, API server,
    # autoscaler monitor and log monitor Ray always starts) and Serve's controller, proxy and replica actors. No
    # dashboard UI, no metrics collection; the raylet's CPUs are the ones this process may run on.
    temp_dir = tempfile.mkdtemp(prefix="ray-")
    ray.init(
        num_cpus=len(os.sched_getaffinity(0)),
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=temp_dir,
        _system_config={"enable_metrics_collection": False},
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(Classifier.bind(), route_prefix="/")
        stop.wait()
    finally:
        ray.shutdown()  # stops every process ray.init started
        shutil.rmtree(temp_dir, ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
