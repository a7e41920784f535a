"""The HTTP endpoints: POST /classify, GET /v1/models, /healthz, /readyz and /metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.datastructures import QueryParams

from service.body import IMAGE_FIELD, MULTIPART, RAW_TYPES, read_body, unless_disconnected
from service.classifier import RequestContext
from service.errors import InferenceFailed, InvalidParameter, NotReady, ServiceError
from service.http_errors import invalid_parameter, request_id
from service.lifecycle import DRAINING, READY, Service
from service.schemas import Classification, Classifications, ClassifyParams, ErrorBody, ModelList, Status

router = APIRouter()

ERRORS = {
    400: "invalid_image (not a decodable image) or bad_request (bad multipart)",
    404: "model_not_found",
    408: "request_timeout: the body did not arrive within body_timeout_s",
    413: "payload_too_large",
    415: "unsupported_media_type: content type, Content-Encoding or image format",
    422: "invalid_parameter (depth, top_k, model, timeout_ms) or image_too_large (pixel limit)",
    503: "overloaded (with Retry-After) or not_ready (starting or draining)",
    504: "deadline_exceeded: timeout_ms passed",
}


def _classify_openapi() -> dict:
    """The body is read by hand (to cap it while streaming), so its shapes are declared here for /docs."""
    binary = {"type": "string", "format": "binary"}
    params = {name: {"type": "string", "description": f.description} for name, f in ClassifyParams.model_fields.items()}
    multipart = {
        "type": "object",
        "properties": {IMAGE_FIELD: {"type": "array", "items": binary, "description": "one or more images"}, **params},
        "required": [IMAGE_FIELD],
    }
    content = {kind: {"schema": binary} for kind in RAW_TYPES} | {MULTIPART: {"schema": multipart}}
    query = [{"name": n, "in": "query", "required": False, "schema": s} for n, s in params.items()]
    return {"requestBody": {"required": True, "content": content}, "parameters": query}


def service(request: Request) -> Service:
    return request.app.state.service


@router.post(
    "/classify",
    response_model=Classification | Classifications,
    responses={status: {"model": ErrorBody, "description": text} for status, text in ERRORS.items()},
    openapi_extra=_classify_openapi(),
    summary="Classify one image (raw body) or several (multipart `image` parts)",
    description="One image answers with one Classification; a multipart body with several `image` parts answers "
    "`{results: [...]}` in part order. Parameters go in the query string, or as form fields of a multipart body.",
)
async def classify(request: Request) -> JSONResponse:
    svc, loop = service(request), asyncio.get_running_loop()
    ctx = RequestContext(request_id(request), loop.time())
    status = 500
    try:
        with svc.request() as classifier:
            s = svc.settings
            body = await read_body(request, s.max_body_bytes, s.body_timeout_s, s.max_images_per_request)
            params = classify_params(request.query_params, body.fields)
            results = await unless_disconnected(request, classifier.classify(params, body.images, ctx))
        status = 200
    except ServiceError as error:
        status = error.status
        raise
    finally:
        svc.metrics.request(ctx.model, ctx.depth, status, loop.time() - ctx.received_at)
    if len(results) == 1:
        return JSONResponse(results[0])
    return JSONResponse({"results": results, "request_id": ctx.request_id})


def classify_params(query: QueryParams, fields: dict[str, str]) -> ClassifyParams:
    """Query string and form fields, validated together; a parameter given twice is ambiguous, so refused."""
    repeated = sorted({k for k in query if len(query.getlist(k)) > 1} | (set(query) & set(fields)))
    if repeated:
        raise InvalidParameter(f"parameter(s) {repeated} given more than once: give each once")
    try:
        return ClassifyParams.model_validate({**dict(query), **fields})
    except ValidationError as e:
        raise invalid_parameter(e) from None


@router.get("/v1/models", response_model=ModelList, summary="Served models, depths, accuracy and latency")
async def models(request: Request) -> dict:
    svc = service(request)
    if not (svc.ready or svc.state == DRAINING):
        raise NotReady(f"the server is {svc.state}: retry shortly")
    return {"models": [model_info(svc, name) for name in svc.served]}


def model_info(svc: Service, name: str) -> dict:
    served = svc.served[name]
    model, profile = served.model, svc.device.profiles[name].to_dict()
    return {
        "name": name,
        "version": str(model.version),
        "max_depth": model.max_depth,
        "default_depth": served.default_depth,
        "auto_depth": served.auto.current,
        "labels": len(model.labels),
        "input_shape": model.manifest["input"]["shape"],
        "depths": [depth_info(svc, model, depth, profile[str(depth)]) for depth in model.depths],
    }


def depth_info(svc: Service, model, depth: int, latency_ms: dict) -> dict:
    key = (model.name, depth)
    return {
        "depth": depth,
        "accuracy": model.accuracy(depth),
        "latency_ms": latency_ms,
        "runtime": svc.device.runtimes[key].provider,
        "max_batch_size": svc.device.limits[key],
    }


@router.get("/healthz", response_model=Status, summary="Liveness: the process answers and its device loop runs")
async def healthz(request: Request) -> dict:
    svc = service(request)
    if svc.state == READY and not svc.device.batcher.running:
        raise InferenceFailed("the batch executor stopped; restart the server")
    return {"status": "live"}


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}},
            summary="Readiness: 200 once every depth is warmed up and while the batch executor runs; 503 while "
            "starting or draining, or after the executor stopped")  # fmt: skip
async def readyz(request: Request) -> dict:
    svc = service(request)
    if not svc.ready:
        stopped = svc.state == READY  # ready in name, but its batch executor is gone
        raise NotReady("the batch executor stopped; restart the server" if stopped else f"the server is {svc.state}")
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(service(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
