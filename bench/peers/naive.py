"""The naive server: FastAPI and uvicorn with the model called inside an async endpoint, so each request runs alone
from decode to answer (no batching, no thread pool): what a first server looks like. The image is the request body.

    python -m bench.peers.naive --folder model_repo/srvit_fashion_d4 --port 8001
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint's `Request` annotation, imported in main().
READY_PATH = "/ready"
CLASSIFY_PATH = "/classify"
FORM_FIELD = None


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from bench.peers.common import Classifier, ServiceError, peer_args

    args = peer_args(argv, __doc__)
    classifier = Classifier(args.folder)
    app = FastAPI()

    @app.get(READY_PATH)
    def ready() -> dict:
        return {"ready": True}

    @app.post(CLASSIFY_PATH)
    async def classify(request: Request):
        try:
            return classifier.classify([await request.body()])[0]
        except ServiceError as e:  # a bad image: srvit's preprocessing names its 4xx status
            return JSONResponse({"error": e.message}, status_code=e.status)

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
