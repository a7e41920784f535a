"""The Open Inference Protocol (KServe V2) apart from its transports: what HTTP (service/v2.py) and gRPC
(service/grpc_server.py) both need, so the two answer alike.

- the input tensors a model takes: `images` (FP32 [n, C, H, W], the graph's own input) and `image` (BYTES [n] or
  [n, 1], each element an encoded JPEG/PNG/WebP/BMP/GIF file, decoded exactly as `/classify` decodes it);
- request parameters: `depth`, `timeout` (µs) and `priority` (1 highest, 0 the default level);
- outputs: `logits` as FP32, or with the classification extension as BYTES "value:index:label";
- model metadata, model configuration (from the folder's config.pbtxt), the repository index, statistics.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import json_format, text_format
from pydantic import TypeAdapter, ValidationError
from tritonclient.grpc import model_config_pb2

from modelrepo.manifest import CONFIG_FILE
from service.errors import BadRequest, InvalidParameter, ModelNotFound
from service.inference import ADAPTIVE, Depth, InferRequest, InferResult, RequestContext, ServedModel
from service.statistics import Statistics

BYTES_INPUT = "image"  # encoded image files, one per element
# The extensions this server implements, as server metadata lists them (Triton's names).
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics", "binary_tensor_data",
              "parameters", "schedule_policy")  # fmt: skip
US_PER_S = 1_000_000
MAX_TIMEOUT_US = 3600 * US_PER_S  # an hour: longer is a mistake, and huge integers would overflow float math
LENGTH = struct.Struct("<I")  # Triton's BYTES element prefix: 4-byte little-endian length
DEPTH = TypeAdapter(Depth)
MODEL_CONTROL_OFF = ("model control is off: the repository is fixed when the server starts; deploy a new "
                     "model_repo/ and restart (or roll out) the server")  # fmt: skip


def server_metadata() -> dict:
    return {"name": "srvit", "version": "1", "extensions": list(EXTENSIONS)}


# -- resolving a model name ------------------------------------------------------------------------------


def resolve(served: dict[str, ServedModel], name: str, version: str | None = None) -> tuple[ServedModel, int | None]:
    """(model, depth fixed by a Triton folder name or None); the version must be the served one if given."""
    for model in served.values():
        depth = model.model.depth_named(name)
        if model.name == name or depth is not None:
            if version not in (None, "", str(model.model.version)):
                raise ModelNotFound(f"{name} has no version {version}; served: {model.model.version}")
            return model, depth
    raise ModelNotFound(f"no model named {name!r}; served: {sorted(served)} or their Triton folder names")


# -- metadata, configuration, repository index ----------------------------------------------------------------


def metadata(served: ServedModel, name: str) -> dict:
    m = served.model.manifest
    return {
        "name": name,
        "versions": [str(served.model.version)],
        "platform": "srvit",
        "inputs": [
            {"name": m.input.name, "datatype": m.input.datatype, "shape": list(m.input.shape)},
            {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1, 1]},
        ],
        "outputs": [{"name": m.output.name, "datatype": m.output.datatype, "shape": list(m.output.shape)}],
        "parameters": {"depths": served.model.depths, "default_depth": served.default_depth},
    }


def model_config(served: ServedModel, name: str) -> model_config_pb2.ModelConfig:
    """The folder's config.pbtxt as Triton reads it; a logical name answers with its default depth's folder
    (its deepest for auto), renamed."""
    depth = served.model.depth_named(name)
    if depth is None:
        depth = served.default_depth if isinstance(served.default_depth, int) else served.model.depths[-1]
    artifacts = served.model.artifacts[depth]
    folder = next((a.folder for a in artifacts if a.manifest.triton_name == name), artifacts[0].folder)
    config = text_format.Parse(_config_text(folder), model_config_pb2.ModelConfig())
    config.name = name
    return config


# int64 fields that Triton's HTTP front end writes as JSON numbers (protobuf's JSON writes them as strings)
INT64_FIELDS = {"dims", "shape", "versions", "max_queue_delay_microseconds", "priority_levels",
                "default_priority_level", "default_timeout_microseconds", "model_version"}  # fmt: skip


@functools.cache
def _config_text(folder: Path) -> str:
    """A folder's config.pbtxt, read once: the repository is fixed while the server runs."""
    return (folder / CONFIG_FILE).read_text()


def config_json(config: model_config_pb2.ModelConfig) -> dict:
    """As Triton's HTTP front end renders a model configuration: protobuf JSON with the proto's field names,
    every scalar field present (defaults too), and int64 sizes as numbers."""
    data = json_format.MessageToDict(config, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)  # fmt: skip
    return _int64_numbers(data)


def _int64_numbers(value, key: str | None = None):
    if isinstance(value, dict):
        return {k: _int64_numbers(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_int64_numbers(v, key) for v in value]
    if key in INT64_FIELDS and isinstance(value, str):
        return int(value)
    return value


def repository_index(served: dict[str, ServedModel], ready: bool) -> list[dict]:
    """Every name a client may address: each logical model and each depth's Triton folder."""
    state = "READY" if ready else "UNAVAILABLE"
    index = []
    for model in served.values():
        version = str(model.model.version)
        for name in [model.name, *folder_names(model)]:
            index.append({"name": name, "version": version, "state": state, "reason": ""})
    return index


def folder_names(served: ServedModel) -> list[str]:
    return sorted({a.manifest.triton_name for artifacts in served.model.artifacts.values() for a in artifacts})


# -- inputs ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputTensor:
    """One input as it came: raw bytes (HTTP binary extension, gRPC raw_input_contents) or typed elements
    (HTTP JSON `data`, gRPC `contents`)."""

    name: str
    datatype: str
    shape: list
    raw: bytes | None = None
    elements: Sequence | None = None


def images_of(tensors: Sequence[InputTensor], served: ServedModel, max_images: int) -> np.ndarray | list[bytes]:
    """The request's images: an FP32 tensor [n, C, H, W] or a list of encoded files. Runs in the thread pool
    for big tensors; every malformed tensor is a client error, never a 500."""
    if len(tensors) != 1:
        raise BadRequest(f"send exactly one input: {_inputs_text(served)}; got {len(tensors)}")
    tensor = tensors[0]
    if tensor.name == BYTES_INPUT:
        return encoded_images(tensor, max_images)
    return fp32_images(tensor, served)


def _inputs_text(served: ServedModel) -> str:
    expected = served.model.manifest.input
    return f"{expected.name!r} (FP32 {list(expected.shape)}) or {BYTES_INPUT!r} (BYTES [n] or [n, 1], image files)"


def fp32_images(tensor: InputTensor, served: ServedModel) -> np.ndarray:
    expected = served.model.manifest.input
    shape = tensor.shape
    if tensor.name != expected.name:
        raise InvalidParameter(f"unknown input {tensor.name!r}: send {_inputs_text(served)}")
    if tensor.datatype != "FP32" or not _is_shape(shape, 4):
        raise InvalidParameter(
            f"input {expected.name!r} must be FP32 with shape [n, C, H, W] of integers, "
            f"as {list(expected.shape)}; got datatype {tensor.datatype!r}, shape {shape!r}"
        )
    if tuple(shape[1:]) != expected.shape[1:] or shape[0] < 1:
        raise InvalidParameter(f"input {expected.name!r} must have shape {list(expected.shape)}, got {shape}")
    try:
        with np.errstate(over="ignore"):  # a number beyond float32 becomes infinity, refused below
            data = np.frombuffer(tensor.raw, "<f4") if tensor.raw is not None else _float_elements(tensor.elements)
        data = np.ascontiguousarray(data.reshape(shape), dtype=np.float32)
    except (ValueError, TypeError, OverflowError) as e:
        raise BadRequest(f"input data does not fill shape {shape} ({e})") from e
    if not np.isfinite(data).all():  # inf or NaN would come back as NaN logits, which JSON cannot carry
        raise BadRequest("input data must be finite numbers (no NaN or infinity)")
    return data


def _float_elements(elements) -> np.ndarray:
    """JSON `data` (flat or nested lists) or gRPC's typed fp32_contents as float32. JSON elements must be
    numbers: booleans, strings, nulls and lists of the wrong shape are refused, never converted (numpy alone
    would read [true, 0.5] as [1.0, 0.5]); an integer beyond int64 is still a number."""
    if not isinstance(elements, list):
        return np.asarray(elements, dtype=np.float32)  # typed contents: floats by construction
    try:
        flat = np.asarray(elements, dtype=object).ravel()
    except ValueError as e:  # ragged nesting numpy cannot even hold as objects
        raise BadRequest(f"input data must be a list of numbers ({e})") from None
    kinds = set(map(type, flat))
    if not kinds <= {int, float}:
        shown = sorted(k.__name__ for k in kinds - {int, float})
        raise BadRequest(f"input data must be numbers, got elements of type {', '.join(shown)}")
    try:
        return flat.astype(np.float64).astype(np.float32)  # past float32's range: infinity, refused by the caller
    except OverflowError:  # an integer past float64's range
        raise BadRequest("input data must be finite numbers within float32's range") from None


def encoded_images(tensor: InputTensor, max_images: int) -> list[bytes]:
    """BYTES [n] or [n, 1]: n encoded files, from length-prefixed raw bytes or a list of bytes elements."""
    shape = tensor.shape
    if tensor.datatype != "BYTES" or not (_is_shape(shape, 1) or (_is_shape(shape, 2) and shape[1] == 1)):
        raise InvalidParameter(f"input {BYTES_INPUT!r} must be BYTES with shape [n] or [n, 1] (one image file per "
                               f"element); got datatype {tensor.datatype!r}, shape {shape!r}")  # fmt: skip
    n = shape[0]
    if not 1 <= n <= max_images:
        raise InvalidParameter(f"input {BYTES_INPUT!r} holds {n} images; send 1 to {max_images} per request")
    files = split_bytes(tensor.raw, n) if tensor.raw is not None else list(tensor.elements or ())
    if len(files) != n or not all(isinstance(f, bytes) for f in files):
        raise BadRequest(f"input {BYTES_INPUT!r} has shape {shape} but carries {len(files)} byte strings")
    return files


def split_bytes(raw: bytes, most: int) -> list[bytes]:
    """Triton's BYTES serialization: each element is a 4-byte little-endian length, then that many bytes.
    Stops once there are more than `most` (the shape's count), so 16 MiB of empty elements costs nothing."""
    elements, at = [], 0
    while at < len(raw) and len(elements) <= most:
        if at + LENGTH.size > len(raw):
            raise BadRequest("BYTES data ends inside an element's 4-byte length prefix")
        (size,) = LENGTH.unpack_from(raw, at)
        at += LENGTH.size
        if at + size > len(raw):
            raise BadRequest(f"a BYTES element declares {size} bytes but only {len(raw) - at} follow")
        elements.append(raw[at : at + size])
        at += size
    return elements


def join_bytes(elements: Iterable[bytes]) -> bytes:
    return b"".join(LENGTH.pack(len(e)) + e for e in elements)


def _is_shape(shape, rank: int) -> bool:
    return isinstance(shape, list | tuple) and len(shape) == rank and all(map(is_int, shape))


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- parameters ----------------------------------------------------------------------------------------------


def infer_request(ctx: RequestContext, params: dict, images: np.ndarray | list[bytes], served: ServedModel,
                  fixed_depth: int | None, deadline_s: float | None = None) -> InferRequest:  # fmt: skip
    """Depth from the folder name, else the `depth` parameter, else (None) the model's default. The timeout is
    the `timeout` parameter or the transport's deadline (gRPC), whichever is sooner."""
    depth = fixed_depth or (None if "depth" not in params else depth_param(params["depth"]))
    timeouts = [t for t in (timeout_s(params.get("timeout")), deadline_s) if t is not None]
    return InferRequest(ctx, images, served.name, depth, min(timeouts, default=None), predictions=False,
                        priority=priority_param(params.get("priority")))  # fmt: skip


def timeout_s(timeout_us) -> float | None:
    """The reserved `timeout` parameter, in microseconds; absent or 0 means none, as in Triton."""
    if timeout_us is None:
        return None
    number = isinstance(timeout_us, int | float) and not isinstance(timeout_us, bool)
    if not (number and 0 <= timeout_us <= MAX_TIMEOUT_US):  # NaN fails both comparisons
        raise InvalidParameter(
            f"parameter timeout must be a number of microseconds from 0 to {MAX_TIMEOUT_US}, got {timeout_us!r}"
        )
    return timeout_us / US_PER_S or None


def priority_param(value) -> int | None:
    """Triton's `priority`: 1 is the highest level, 0 (or none) the default; see PriorityPolicy for the rest."""
    if value is None or (is_int(value) and value == 0):  # not false or 0.0
        return None
    if not (is_int(value) and value > 0):
        raise InvalidParameter(f"parameter priority must be a non-negative integer (1 is the highest), got {value!r}")
    return value


def depth_param(value) -> Depth:
    try:
        return DEPTH.validate_python(value, strict=True)  # 2, "auto" or "adaptive"; not true, "2" or 2.0
    except ValidationError:
        raise InvalidParameter(f"parameter depth must be an integer, 'auto' or 'adaptive', got {value!r}") from None


def depth_parameters(result) -> dict[str, int | str | float]:
    """The response parameters that say which depths answered: `depth_used` (the deepest any image used);
    for depth=adaptive also per image, comma-separated in input order, `depths_used` and `depth_reasons`,
    and `gflops`, the compute the request's images took in all."""
    params: dict[str, int | str | float] = {"depth_used": max(image.depth for image in result.images)}
    if result.depth_requested == ADAPTIVE:
        params["depths_used"] = ",".join(str(image.depth) for image in result.images)
        params["depth_reasons"] = ",".join(image.depth_reason for image in result.images)
    if all(image.gflops is not None for image in result.images):
        params["gflops"] = sum(image.gflops for image in result.images)
    return params


# -- outputs -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One output tensor of the answer: FP32 logits [n, classes] or BYTES classifications [n, k]."""

    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray  # float32, or an object array of bytes

    def raw(self) -> bytes:
        if self.datatype == "BYTES":
            return join_bytes(self.values.ravel())
        return self.values.astype("<f4").tobytes()


def requested_outputs(requested: dict[str, dict], served: ServedModel) -> dict[str, int | None]:
    """Output name -> classification count (None: the tensor itself). None requested: every output."""
    out_name = served.model.manifest.output.name
    if not requested:
        return {out_name: None}
    wanted = {}
    for name, params in requested.items():
        if name != out_name:
            raise InvalidParameter(f"unknown output {name!r}: this model's output is {out_name!r}")
        k = params.get("classification")
        if k is not None and not (is_int(k) and k >= 1):
            raise InvalidParameter(f"parameter classification must be a positive integer, got {k!r}")
        wanted[name] = k
    return wanted


def outputs(result: InferResult, wanted: dict[str, int | None], labels: Sequence[str]) -> list[Output]:
    logits = result.logits
    answers = []
    for name, k in wanted.items():
        if k is None:
            answers.append(Output(name, "FP32", list(logits.shape), logits))
        else:
            values = classification(logits, labels, k)
            answers.append(Output(name, "BYTES", list(values.shape), values))
    return answers


def classification(logits: np.ndarray, labels: Sequence[str], k: int) -> np.ndarray:
    """Triton's classification extension: per image the k largest values of the output, largest first, each
    "value:index:label" with the raw output value (here a logit, not a probability) printed as C's %f."""
    k = min(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    rows = [[f"{row[i]:f}:{i}:{labels[i]}".encode() for i in top] for row, top in zip(logits, order, strict=True)]
    return np.array(rows, dtype=object)


# -- statistics ----------------------------------------------------------------------------------------------


def statistics(stats: Statistics, served: ServedModel, name: str) -> dict:
    """A depth folder's name reports its depth; a logical name reports the sum over its depths."""
    return stats.collect(served.name, served.model.depth_named(name)).to_dict(name, str(served.model.version))


def all_statistics(stats: Statistics, served: dict[str, ServedModel]) -> list[dict]:
    return [statistics(stats, model, name) for model in served.values() for name in [model.name, *folder_names(model)]]
