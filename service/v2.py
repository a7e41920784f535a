"""The Open Inference Protocol (KServe V2) over HTTP, as Triton's HTTP front end speaks it: health, server and
model metadata, model configuration, statistics, the repository index, and inference with the binary tensor
data, classification and parameters extensions (service/oip.py holds what gRPC shares).

A model is addressed by its logical name (depth from the `depth` request parameter, default the model's
default) or by its Triton folder name (`tiny_d2` is depth 2), so a client written against Triton serving
the same model_repo/ works unchanged. Images travel as an FP32 tensor or as encoded files in a BYTES tensor;
a body may be sent gzip- or deflate-compressed, as tritonclient can.
"""

from __future__ import annotations

import json
from functools import partial

from fastapi import APIRouter, Request, Response

from service import health, oip
from service.body import Hold, compression, is_byte_count, receive, unless_disconnected
from service.errors import BadRequest, ModelControlDisabled, PayloadTooLarge
from service.http_context import service
from service.http_errors import request_id
from service.inference import Images, InferResult, ServedModel
from service.lifecycle import Service
from service.schemas import error_responses
from service.settings import Settings

HEADER_LENGTH = "Inference-Header-Content-Length"
REPOSITORY_BODY_BYTES = 4096  # {"repository_name": ..., "ready": true}


# Every V2 route can answer these (our error body, as /classify's); inference adds INFER_ERRORS.
router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"], responses=error_responses({
    400: "bad_request (a malformed request), or model_control_disabled (load and unload)",
    404: "model_not_found",
    422: "invalid_parameter",
    503: "not_ready (starting or draining)",
}))  # fmt: skip
INFER_ERRORS = error_responses({
    413: "payload_too_large (the body, or its JSON part, past its limit)",
    415: "unsupported_media_type (Content-Encoding, or an image format outside the allowlist)",
    422: "invalid_parameter (inputs, outputs, parameters), or image_too_large (pixel limit)",
    503: "overloaded (with Retry-After) or not_ready",
    504: "deadline_exceeded: the timeout parameter passed",
})  # fmt: skip
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "description": "depth (1..max_depth, auto or adaptive), timeout (us), "
                       "priority"},
        "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "shape", "datatype"]}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"]}},
    }}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary", "description":
        f"the JSON request ({HEADER_LENGTH} bytes), then the binary tensors (binary tensor data extension)"}},
}}}  # fmt: skip


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return oip.server_metadata()


@router.get("/health/live", summary="200 while the process answers and its device loop runs")
async def live(request: Request) -> dict:
    health.check_live(service(request))
    return {"live": True}


@router.get("/health/ready", summary="200 once every model is loaded and warmed up")
async def ready(request: Request) -> dict:
    health.check_ready(service(request))
    return {"ready": True}


def described(request: Request, name: str, version: str | None) -> tuple[Service, ServedModel]:
    """The service and the named model, while models can be described (serving or draining)."""
    svc = service(request)
    health.check_described(svc)
    return svc, oip.resolve(svc.served, name, version)[0]


# Declared before /models/{name}: "stats" is not a model name.
@router.get("/models/stats", summary="Statistics of every model and depth folder (statistics extension)")
async def all_statistics(request: Request) -> dict:
    svc = service(request)
    health.check_described(svc)
    return {"model_stats": oip.all_statistics(svc.statistics, svc.served)}


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", summary="Model metadata")
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict:
    _, served = described(request, name, version)
    return oip.metadata(served, name)


@router.get("/models/{name}/ready", summary="200 when the model is ready")
@router.get("/models/{name}/versions/{version}/ready", summary="200 when the model is ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> dict:
    svc = service(request)
    health.check_ready(svc)
    oip.resolve(svc.served, name, version)
    return {"name": name, "ready": True}


@router.get("/models/{name}/config", summary="Model configuration, as Triton reads config.pbtxt")
@router.get("/models/{name}/versions/{version}/config", summary="Model configuration, as Triton reads config.pbtxt")
async def model_config(request: Request, name: str, version: str | None = None) -> dict:
    _, served = described(request, name, version)
    return oip.config_json(oip.model_config(served, name))


@router.get("/models/{name}/stats", summary="Statistics (statistics extension)")
@router.get("/models/{name}/versions/{version}/stats", summary="Statistics (statistics extension)")
async def model_statistics(request: Request, name: str, version: str | None = None) -> dict:
    svc, served = described(request, name, version)
    return {"model_stats": [oip.statistics(svc.statistics, served, name)]}


@router.post("/repository/index", summary="Every model and depth folder with its state (model repository extension)")
async def repository_index(request: Request) -> list[dict]:
    svc = service(request)
    health.check_described(svc)
    body = await receive(request, REPOSITORY_BODY_BYTES, svc.settings.body_timeout_s)
    ready_only = _object(parse_json(body) if body.strip() else None, "the index request").get("ready", False)
    if not isinstance(ready_only, bool):
        raise BadRequest(f'"ready" must be true or false, got {ready_only!r}')
    ready = health.is_ready(svc)
    return [] if ready_only and not ready else oip.repository_index(svc.served, ready)


@router.post("/repository/models/{name}/load", summary="Refused: the repository is fixed at start-up")
@router.post("/repository/models/{name}/unload", summary="Refused: the repository is fixed at start-up")
async def model_control(name: str) -> None:
    raise ModelControlDisabled(oip.MODEL_CONTROL_OFF)


INFER_SUMMARY = "Inference on images: FP32 tensor `images` [n, C, H, W] or BYTES `image` (encoded files)"


@router.post("/models/{name}/infer", summary=INFER_SUMMARY, responses=INFER_ERRORS, openapi_extra=INFER_BODY)
@router.post("/models/{name}/versions/{version}/infer", summary=INFER_SUMMARY, responses=INFER_ERRORS,
             openapi_extra=INFER_BODY)  # fmt: skip
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    svc, rid = service(request), request_id(request)
    with svc.accounting.track(rid, "v2_http") as ctx:
        served, fixed_depth = oip.resolve(svc.served, name, version)
        ctx.model, ctx.depth = served.name, fixed_depth  # a folder name's depth counts its failures too
        split = json_length(request.headers)
        body = await receive_infer(request, svc.settings, split, partial(svc.accounting.hold, ctx))
        # json.loads and np.asarray of a big JSON tensor take long enough to stall health checks
        header, images = await svc.core.offload(parse_infer, body, split, served, svc.settings.max_images_per_request)
        params = _object(header.get("parameters"), '"parameters"')
        asked = requested(header)
        wanted = oip.requested_outputs(asked, served)
        infer = oip.infer_request(ctx, params, images, served, fixed_depth)
        result = await unless_disconnected(request, svc.core.infer(infer))
        return infer_response(header, asked, params, oip.outputs(result, wanted, served.model.labels), name, result,
                              rid)  # fmt: skip


def json_length(headers) -> int | None:
    """The JSON header's length when binary tensors follow it; None when the whole body is JSON."""
    value = headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not is_byte_count(value):
        raise BadRequest(f"{HEADER_LENGTH} must be a byte count, got {value!r}")
    return int(value)


async def receive_infer(request: Request, s: Settings, split: int | None, hold: Hold) -> bytes:
    """JSON is parsed into Python objects many times its size, so the JSON part has a lower limit than a
    body of binary tensors. A compressed body counts its inflated size against the limits while inflating."""
    encoding = compression(request.headers)
    if split is not None:
        if split > s.max_json_body_bytes:
            raise _json_too_large(s.max_json_body_bytes)
        return await receive(request, s.max_body_bytes, s.body_timeout_s, encoding, hold)
    try:
        return await receive(request, s.max_json_body_bytes, s.body_timeout_s, encoding, hold)
    except PayloadTooLarge:
        raise _json_too_large(s.max_json_body_bytes) from None


def _json_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"JSON in an inference request is limited to {limit} bytes: send the tensor with the binary tensor "
        "data extension (binary_data=True in tritonclient)"
    )


def parse_infer(body: bytes, split: int | None, served: ServedModel, max_images: int) -> tuple[dict, Images]:
    """The JSON header and the request's images, from JSON data or the binary extension.
    Runs in the thread pool; every malformed shape of the JSON is a client error, never a 500."""
    split = len(body) if split is None else split
    header = parse_header(body[:split])
    return header, oip.images_of(input_tensors(header["inputs"], body[split:]), served, max_images)


def parse_json(text: bytes):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested arrays
        raise BadRequest(f"the request is not valid JSON ({e})") from e


def parse_header(text: bytes) -> dict:
    header = parse_json(text)
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not (isinstance(inputs, list) and inputs and all(isinstance(i, dict) for i in inputs)):
        raise BadRequest('send the input tensor as the protocol describes: {"inputs": [{"name", "shape", '
                         '"datatype", "data"}]}')  # fmt: skip
    _object(header.get("parameters"), '"parameters"')
    outputs = [] if header.get("outputs") is None else header["outputs"]
    if not (isinstance(outputs, list) and all(isinstance(o, dict) for o in outputs)):
        raise BadRequest('"outputs" must be a list of {"name", "parameters"} objects')
    for output in outputs:
        if not isinstance(output.get("name"), str):
            raise BadRequest(f'every requested output needs a "name" string, got {output.get("name")!r}')
        _object(output.get("parameters"), "an output's parameters")
    return header


def _object(value, what: str) -> dict:
    """An optional JSON object: absent or null reads as empty, anything but an object is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def input_tensors(inputs: list[dict], binary: bytes) -> list[oip.InputTensor]:
    """Each input's data: JSON `data`, or its `binary_data_size` bytes of what follows the header, in order."""
    tensors, at = [], 0
    for tensor in inputs:
        size = _object(tensor.get("parameters"), "an input's parameters").get("binary_data_size")
        if size is None:
            if tensor.get("datatype") == "BYTES":
                raise BadRequest(f"BYTES input {tensor.get('name')!r} must use the binary tensor data extension "
                                 "(binary_data=True in tritonclient): image files are not JSON text")  # fmt: skip
            if not isinstance(tensor.get("data"), list):
                raise BadRequest(f'input {tensor.get("name")!r} needs "data" (a list) or binary_data_size')
            raw = None
        elif not (oip.is_int(size) and 0 <= size <= len(binary) - at):
            raise BadRequest(f"binary_data_size must be a byte count within the body, got {size!r}")
        else:
            raw, at = binary[at : at + size], at + size
        tensors.append(oip.InputTensor(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"), raw,
                                       tensor.get("data")))  # fmt: skip
    return tensors


def requested(header: dict) -> dict[str, dict]:
    return {o["name"]: o.get("parameters") or {} for o in header.get("outputs") or []}


def infer_response(header: dict, asked: dict[str, dict], params: dict, outputs: list[oip.Output], name: str,
                   result: InferResult, rid: str) -> Response:  # fmt: skip
    """Each output as JSON data, or binary after the JSON header when the client asked for it that way
    (per output `binary_data`, or `binary_data_output` for a request that named no outputs)."""
    default_binary = params.get("binary_data_output", False) is True
    rendered, payload = [], []
    for output in outputs:
        binary = asked.get(output.name, {}).get("binary_data", default_binary) is True
        entry = {"name": output.name, "datatype": output.datatype, "shape": output.shape}
        if binary:
            raw = output.raw()
            payload.append(raw)
            entry["parameters"] = {"binary_data_size": len(raw)}
        elif output.datatype == "BYTES":
            entry["data"] = [v.decode() for v in output.values.ravel()]
        else:
            entry["data"] = output.values.ravel().tolist()
        rendered.append(entry)
    body = {"model_name": name, "model_version": result.model_version, "id": header.get("id", rid),
            "parameters": oip.depth_parameters(result), "outputs": rendered}  # fmt: skip
    encoded = json.dumps(body).encode()
    if not payload:
        return Response(encoded, media_type="application/json")
    headers = {HEADER_LENGTH: str(len(encoded))}
    return Response(encoded + b"".join(payload), media_type="application/octet-stream", headers=headers)
