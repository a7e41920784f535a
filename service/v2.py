"""The Open Inference Protocol (KServe v2) subset Triton's clients need: health, model metadata, FP32 tensor infer.

A model is addressed by its logical name (depth from the `depth` request parameter, default the model's
default) or by its Triton folder name (`tiny_d2` is depth 2), so a client written against Triton serving
the same model_repo/ works unchanged. Tensors travel as JSON or with the binary tensor data extension.
"""

from __future__ import annotations

import json

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import TypeAdapter, ValidationError

from service import health
from service.body import check_encoding, is_byte_count, receive, unless_disconnected
from service.errors import BadRequest, InvalidParameter, ModelNotFound, PayloadTooLarge
from service.http_context import service
from service.http_errors import request_id
from service.inference import Depth, InferRequest, InferResult, RequestContext, ServedModel
from service.lifecycle import Service
from service.settings import Settings

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])

HEADER_LENGTH = "Inference-Header-Content-Length"
US_PER_S = 1_000_000
MAX_TIMEOUT_US = 3600 * US_PER_S  # an hour: longer is a mistake, and huge integers would overflow float math


@router.get("", summary="Server metadata")
async def server_metadata() -> dict:
    return {"name": "srvit", "version": "1", "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="200 while the process answers and its device loop runs")
async def live(request: Request) -> dict:
    health.check_live(service(request))
    return {"live": True}


@router.get("/health/ready", summary="200 once every model is loaded and warmed up")
async def ready(request: Request) -> dict:
    health.check_ready(service(request))
    return {"ready": True}


def resolve(svc: Service, name: str, version: str | None = None) -> tuple[ServedModel, int | None]:
    """(model, depth fixed by a Triton folder name or None); the version must be the served one if given."""
    for served in svc.served.values():
        depth = served.model.depth_named(name)
        if served.name == name or depth is not None:
            if version is not None and version != str(served.model.version):
                raise ModelNotFound(f"{name} has no version {version}; served: {served.model.version}")
            return served, depth
    raise ModelNotFound(f"no model named {name!r}; served: {sorted(svc.served)} or their Triton folder names")


@router.get("/models/{name}", summary="Model metadata")
@router.get("/models/{name}/versions/{version}", summary="Model metadata")
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict:
    svc = service(request)
    health.check_described(svc)
    served, _ = resolve(svc, name, version)
    m = served.model.manifest
    return {
        "name": name,
        "versions": [str(served.model.version)],
        "platform": "srvit",
        "inputs": [{"name": m.input.name, "datatype": m.input.datatype, "shape": list(m.input.shape)}],
        "outputs": [{"name": m.output.name, "datatype": m.output.datatype, "shape": list(m.output.shape)}],
        "parameters": {"depths": served.model.depths, "default_depth": served.default_depth},
    }


@router.get("/models/{name}/ready", summary="200 when the model is ready")
@router.get("/models/{name}/versions/{version}/ready", summary="200 when the model is ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> dict:
    svc = service(request)
    health.check_ready(svc)
    resolve(svc, name, version)
    return {"name": name, "ready": True}


@router.post("/models/{name}/infer", summary="Inference on an FP32 image tensor [n, C, H, W]")
@router.post("/models/{name}/versions/{version}/infer", summary="Inference on an FP32 image tensor [n, C, H, W]")
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    svc, rid = service(request), request_id(request)
    with svc.accounting.track(rid) as ctx:
        served, fixed_depth = resolve(svc, name, version)
        ctx.model = served.name
        split = json_length(request.headers)
        body = await receive_infer(request, svc.settings, split)
        # json.loads and np.asarray of a big JSON tensor take long enough to stall health checks
        header, images = await svc.core.offload(parse_infer, body, split, served)
        infer = infer_request(ctx, header, images, served, fixed_depth)
        result = await unless_disconnected(request, svc.core.infer(infer))
        return infer_response(header, served, name, result, rid)


def json_length(headers) -> int | None:
    """The JSON header's length when binary tensors follow it; None when the whole body is JSON."""
    value = headers.get(HEADER_LENGTH)
    if value is None:
        return None
    if not is_byte_count(value):
        raise BadRequest(f"{HEADER_LENGTH} must be a byte count, got {value!r}")
    return int(value)


async def receive_infer(request: Request, s: Settings, split: int | None) -> bytes:
    """JSON is parsed into Python objects many times its size, so the JSON part has a lower limit than a
    body of binary tensors."""
    check_encoding(request.headers)
    if split is not None:
        if split > s.max_json_body_bytes:
            raise _json_too_large(s.max_json_body_bytes)
        return await receive(request, s.max_body_bytes, s.body_timeout_s)
    try:
        return await receive(request, s.max_json_body_bytes, s.body_timeout_s)
    except PayloadTooLarge:
        raise _json_too_large(s.max_json_body_bytes) from None


def _json_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"JSON in an inference request is limited to {limit} bytes: send the tensor with the binary tensor "
        "data extension (binary_data=True in tritonclient)"
    )


def parse_infer(body: bytes, split: int | None, served: ServedModel) -> tuple[dict, np.ndarray]:
    """The JSON header and the one FP32 input as [n, C, H, W], from JSON data or the binary extension.
    Runs in the thread pool; every malformed shape of the JSON is a client error, never a 500."""
    split = len(body) if split is None else split
    header = parse_header(body[:split])
    return header, _tensor(header["inputs"][0], body[split:], served)


def parse_header(text: bytes) -> dict:
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested arrays
        raise BadRequest(f"the inference request is not valid JSON ({e})") from e
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not (isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], dict)):
        raise BadRequest('send one input tensor as the protocol describes: {"inputs": [{"name", "shape", '
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


def _tensor(tensor: dict, binary: bytes, served: ServedModel) -> np.ndarray:
    expected = served.model.manifest.input
    shape = tensor.get("shape")
    if tensor.get("datatype") != "FP32" or not _is_shape(shape):
        raise InvalidParameter(f"input must be FP32 with shape [n, C, H, W] of integers, as {list(expected.shape)}; "
                               f"got datatype {tensor.get('datatype')!r}, shape {shape!r}")  # fmt: skip
    if tensor.get("name") != expected.name or tuple(shape[1:]) != expected.shape[1:] or shape[0] < 1:
        raise InvalidParameter(f"input must be named {expected.name!r} with shape {list(expected.shape)}")
    return _tensor_data(tensor, binary, shape)


def _tensor_data(tensor: dict, binary: bytes, shape: list[int]) -> np.ndarray:
    size = _object(tensor.get("parameters"), "the input's parameters").get("binary_data_size")
    if size is not None and not (_is_int(size) and size >= 0):
        raise BadRequest(f"binary_data_size must be a byte count, got {size!r}")
    try:
        with np.errstate(over="ignore"):  # a number beyond float32 becomes infinity, refused below
            data = np.frombuffer(binary[:size], "<f4") if size is not None else np.asarray(tensor["data"], np.float32)
        data = np.ascontiguousarray(data.reshape(shape), dtype=np.float32)
    except (KeyError, ValueError, TypeError, OverflowError) as e:
        raise BadRequest(f"input data does not fill shape {shape} ({e})") from e
    if not np.isfinite(data).all():  # inf or NaN would come back as NaN logits, which JSON cannot carry
        raise BadRequest("input data must be finite numbers (no NaN or infinity)")
    return data


def _is_shape(shape) -> bool:
    return isinstance(shape, list) and len(shape) == 4 and all(map(_is_int, shape))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def infer_request(ctx: RequestContext, header: dict, images: np.ndarray, served: ServedModel,
                  fixed_depth: int | None) -> InferRequest:  # fmt: skip
    """Depth from the folder name, else the `depth` parameter, else (None) the model's default."""
    params = header.get("parameters") or {}
    depth = fixed_depth or (None if "depth" not in params else _depth_param(params["depth"]))
    timeout_s = _timeout_s(params.get("timeout"))
    return InferRequest(ctx, images, served.name, depth, timeout_s, predictions=False)


def _timeout_s(timeout_us) -> float | None:
    """The reserved `timeout` parameter, in microseconds; absent or 0 means none, as in Triton."""
    if timeout_us is None:
        return None
    number = isinstance(timeout_us, int | float) and not isinstance(timeout_us, bool)
    if not (number and 0 <= timeout_us <= MAX_TIMEOUT_US):  # NaN fails both comparisons
        raise InvalidParameter(
            f"parameter timeout must be a number of microseconds from 0 to {MAX_TIMEOUT_US}, got {timeout_us!r}"
        )
    return timeout_us / US_PER_S or None


DEPTH = TypeAdapter(Depth)


def _depth_param(value) -> Depth:
    try:
        return DEPTH.validate_python(value)
    except ValidationError:
        raise InvalidParameter(f"parameter depth must be an integer or 'auto', got {value!r}") from None


def infer_response(header: dict, served: ServedModel, name: str, result: InferResult, rid: str) -> Response:
    """JSON data, or binary after the JSON header when the client asked for its output that way."""
    wanted = {o.get("name"): o.get("parameters") or {} for o in header.get("outputs") or []}
    out_name = served.model.manifest.output.name
    binary = wanted.get(out_name, {}).get("binary_data", False)
    logits = result.logits
    output = {"name": out_name, "datatype": "FP32", "shape": list(logits.shape)}
    payload = logits.astype("<f4").tobytes() if binary else b""
    output |= {"parameters": {"binary_data_size": len(payload)}} if binary else {"data": logits.ravel().tolist()}
    depth_used = result.images[0].depth  # one depth per request until depth=adaptive
    body = {"model_name": name, "model_version": result.model_version, "id": header.get("id", rid),
            "parameters": {"depth_used": depth_used}, "outputs": [output]}  # fmt: skip
    encoded = json.dumps(body).encode()
    headers = {HEADER_LENGTH: str(len(encoded))} if binary else None
    kind = "application/octet-stream" if binary else "application/json"
    return Response(encoded + payload, media_type=kind, headers=headers)
