"""The HTTP endpoints: POST /classify, GET /v1/models, /healthz, /readyz and /metrics."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.datastructures import QueryParams

from service import health
from service.body import IMAGE_FIELD, MULTIPART, RAW_TYPES, read_body, unless_disconnected
from service.errors import InvalidParameter
from service.http_context import service
from service.http_errors import invalid_parameter, request_id
from service.inference import ImageResult, InferRequest, InferResult
from service.schemas import (
    Classification,
    Classifications,
    ClassifyParams,
    ErrorBody,
    ModelList,
    Status,
    error_responses,
)

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
    fields = ClassifyParams.model_json_schema()["properties"]
    params = {name: _param_schema(name, field) for name, field in fields.items()}
    multipart = {
        "type": "object",
        "properties": {IMAGE_FIELD: {"type": "array", "items": binary, "description": "one or more images"}, **params},
        "required": [IMAGE_FIELD],
    }
    content = {kind: {"schema": binary} for kind in RAW_TYPES} | {MULTIPART: {"schema": multipart}}
    query = [{"name": n, "in": "query", "required": False, "schema": s} for n, s in params.items()]
    return {"requestBody": {"required": True, "content": content}, "parameters": query}


def _param_schema(name: str, field: dict) -> dict:
    """A parameter's own schema: its values without the `null` that stands for leaving it out (an empty
    `depth=` is refused), depth's integers from 1."""
    kinds = [k for k in field.get("anyOf", [field]) if k.get("type") != "null"]
    kinds = [k | {"minimum": 1} if name == "depth" and k.get("type") == "integer" else k for k in kinds]
    return {"description": field["description"], **(kinds[0] if len(kinds) == 1 else {"anyOf": kinds})}


@router.post(
    "/classify",
    response_model=Classification | Classifications,
    responses=error_responses(ERRORS),
    openapi_extra=_classify_openapi(),
    summary="Classify one image (raw body) or several (multipart `image` parts)",
    description="One image answers with one Classification; a multipart body with several `image` parts answers "
    "`{results: [...]}` in part order. Parameters go in the query string, or as form fields of a multipart body.",
)
async def classify(request: Request) -> JSONResponse:
    svc, rid = service(request), request_id(request)
    with svc.accounting.track(rid, "classify") as ctx:
        s = svc.settings
        hold = partial(svc.accounting.hold, ctx)
        body = await read_body(request, s.max_body_bytes, s.body_timeout_s, s.max_images_per_request, hold)
        params = classify_params(request.query_params, body.fields)
        timeout_s = None if params.timeout_ms is None else params.timeout_ms / 1000
        infer = InferRequest(ctx, body.images, params.model, params.depth, timeout_s, params.top_k)
        result = await unless_disconnected(request, svc.core.infer(infer))
        answers = [classification(result, image, rid) for image in result.images]
    if len(answers) == 1:
        return JSONResponse(answers[0])
    return JSONResponse({"results": answers, "request_id": rid})


def classification(result: InferResult, image: ImageResult, rid: str) -> dict:
    """One image's answer, as the `Classification` schema documents it."""
    t = result.timing
    return {
        "model": result.model,
        "model_version": result.model_version,
        "depth_requested": result.depth_requested,
        "depth_used": image.depth,
        "depth_reason": image.depth_reason,
        "depths_run": list(image.depths_run),
        "gflops": image.gflops,
        "predictions": image.predictions,
        "timing_ms": {"queue": t.queue_ms, "inference": t.inference_ms, "total": t.total_ms},
        "request_id": rid,
    }


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
    health.check_described(svc)
    return {"models": svc.describe()}


@router.get("/healthz", response_model=Status, summary="Liveness: the process answers and its device loop runs")
async def healthz(request: Request) -> dict:
    health.check_live(service(request))
    return {"status": "live"}


@router.get("/readyz", response_model=Status, responses={503: {"model": ErrorBody}},
            summary="Readiness: 200 once every depth is warmed up and while the batch executor runs; 503 while "
            "starting or draining, or after the executor stopped")  # fmt: skip
async def readyz(request: Request) -> dict:
    health.check_ready(service(request))
    return {"status": "ready"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(service(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
