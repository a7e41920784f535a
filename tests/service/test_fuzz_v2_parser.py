"""Properties of the Open Inference Protocol request parser (service/v2.py, service/oip.py) on generated,
mutated and hostile requests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service import oip, v2
from service.autodepth import AutoDepth, Policy
from service.errors import ServiceError
from service.inference import RequestContext, ServedModel
from service.loading import default_depth, make_preprocessor
from service.repository import load_repository
from service.settings import Settings

REPO = Path(__file__).parents[2] / "model_repo"
MODEL = "srvit_fashion"
MAX_IMAGES = Settings.model_fields["max_images_per_request"].default
MAX_PIXELS = Settings.model_fields["max_pixels"].default
CLIENT_ERRORS = {400, 413, 415, 422}
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip


@pytest.fixture(scope="module")
def served() -> ServedModel:
    """The embedded model as the server serves it: its manifest's input [-1, 1, 28, 28], default depth 4."""
    model = load_repository(REPO)[MODEL]
    auto = AutoDepth(model.depths, Policy(target_ms=100.0))
    return ServedModel(model, make_preprocessor(model, MAX_PIXELS), default_depth(None, model.depths), auto)


# -- strategies --------------------------------------------------------------------------------------------

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6)
           | st.sampled_from(["FP32", "BYTES", "FP16", "INT64", "images", "image", "auto", ""]))  # fmt: skip
JUNK = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=8)  # fmt: skip
PARAMETERS = st.fixed_dictionaries(
    {},
    optional={
        "depth": st.integers(1, 4) | st.just("auto"),
        "timeout": st.integers(0, 10**7),  # µs
        "priority": st.integers(0, 3),
        "binary_data_output": st.booleans(),
    },
)
OUTPUTS = st.lists(st.fixed_dictionaries({"name": st.just("logits")}, optional={"parameters": st.fixed_dictionaries(
    {}, optional={"classification": st.integers(1, 10), "binary_data": st.booleans()})}), max_size=1)  # fmt: skip
FILES = st.lists(st.binary(max_size=64), min_size=1, max_size=4)  # BYTES elements: anything, empty included


@st.composite
def valid_requests(draw) -> tuple[dict, bytes, np.ndarray | list[bytes]]:
    """(JSON header, binary tail, the images they carry) as a correct client sends them: FP32 as JSON data or
    binary, or BYTES files."""
    kind = draw(st.sampled_from(["fp32_json", "fp32_binary", "bytes"]))
    header = {"parameters": draw(PARAMETERS), "outputs": draw(OUTPUTS)}
    if kind == "bytes":
        files = draw(FILES)
        tail = oip.join_bytes(files)
        shape = draw(st.sampled_from([[len(files)], [len(files), 1]]))
        tensor = {"name": "image", "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(tail)}}
        return header | {"inputs": [tensor]}, tail, files
    n = draw(st.integers(1, 3))
    x = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal((n, 1, 28, 28), dtype=np.float32)
    tensor = {"name": "images", "datatype": "FP32", "shape": list(x.shape)}
    if kind == "fp32_json":
        return header | {"inputs": [tensor | {"data": x.ravel().tolist()}]}, b"", x
    return header | {"inputs": [tensor | {"parameters": {"binary_data_size": x.nbytes}}]}, x.tobytes(), x


def places(doc, at: tuple = ()):
    """Every position below the top of a JSON document, except the elements of a tensor's long `data` list."""
    if at:
        yield at
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        if key != "data":
            yield from places(value, (*at, key))


def put(doc, at: tuple, value, delete: bool = False):
    """A copy of `doc` with the value at `at` replaced (or deleted)."""
    if not at:
        return value
    doc = dict(doc) if isinstance(doc, dict) else list(doc)
    if len(at) == 1 and delete:
        del doc[at[0]]
    else:
        doc[at[0]] = put(doc[at[0]], at[1:], value, delete)
    return doc


@st.composite
def mutated(draw, header: dict, tail: bytes) -> dict:
    """One to three edits anywhere in the header: wrong types, missing keys, nested junk, huge or negative
    numbers, datatype strings, byte counts that lie about the tail; or one junk element in `data`."""
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.sampled_from(list(places(header))))
        value = draw(JUNK | st.integers(-10, len(tail) + 10) | st.lists(st.integers(-2, 2**64), max_size=5))
        header = put(header, at, value, delete=draw(st.booleans()))
    tensors = header.get("inputs") if isinstance(header, dict) else None
    if isinstance(tensors, list) and tensors and isinstance(tensors[0], dict) and "data" in tensors[0]:
        data = tensors[0]["data"]
        if isinstance(data, list) and data and draw(st.booleans()):
            header = put(header, ("inputs", 0, "data", draw(st.integers(0, len(data) - 1))), draw(JUNK))
    return header


@st.composite
def bodies(draw) -> tuple[bytes, int | None]:
    """(body, Inference-Header-Content-Length): a mutated header and a tail that may be cut or padded, split
    where the header ends, or at any other byte count a client might claim."""
    header, tail, _ = draw(valid_requests())
    header = draw(mutated(header, tail))
    if draw(st.booleans()):
        tail = tail[: draw(st.integers(0, len(tail)))] + draw(st.binary(max_size=8))
    text = json.dumps(header).encode()
    split = draw(st.sampled_from(["honest", "honest", "none", "lie"]))
    if split == "lie":
        return text + tail, draw(st.integers(0, len(text) + len(tail) + 4))
    return (text, None) if split == "none" else (text + tail, len(text))


# -- what the adapter does before the core sees the request ------------------------------------------------


def adapt(body: bytes, split: int | None, served: ServedModel):
    """service.v2.infer up to `svc.core.infer`: the parsed header, the core's request, the wanted outputs."""
    header, images = v2.parse_infer(body, split, served, MAX_IMAGES)
    params = header.get("parameters") or {}
    wanted = oip.requested_outputs(v2.requested(header), served)
    return header, oip.infer_request(RequestContext("fuzz", 0.0), params, images, served, None), wanted


def outcome(body: bytes, split: int | None, served: ServedModel):
    """The adapted request, or the error the client is told; any other exception escapes and fails."""
    try:
        return adapt(body, split, served)
    except ServiceError as e:
        return e


def accepted(result) -> str:
    """What reached the core, in a line."""
    images = result[1].images
    if isinstance(images, np.ndarray):
        return f"FP32 {images.shape} starting {images.ravel()[:4]}"
    return f"{len(images)} files"


def assert_client_error(result) -> None:
    assert isinstance(result, ServiceError), f"expected a client error, the request was accepted as {accepted(result)}"
    assert result.status in CLIENT_ERRORS, f"{type(result).__name__} has status {result.status}"


def assert_consistent(result, served: ServedModel) -> None:
    """The images are what the single input declared (its shape and count, the model's [C, H, W]), the
    parameters what the header says, the outputs the model's own."""
    header, request, wanted = result
    (tensor,) = header["inputs"]
    images = request.images
    if isinstance(images, np.ndarray):
        assert (tensor["name"], tensor["datatype"]) == ("images", "FP32")
        assert images.dtype == np.float32 and images.shape == tuple(tensor["shape"])
        assert images.shape[1:] == served.model.manifest.input.shape[1:] and np.isfinite(images).all()
    else:
        assert (tensor["name"], tensor["datatype"]) == ("image", "BYTES")
        assert all(isinstance(f, bytes) for f in images) and len(images) == tensor["shape"][0] <= MAX_IMAGES
    params = header.get("parameters") or {}
    timeout = params.get("timeout")
    assert request.depth == params.get("depth")
    assert request.timeout_s == (timeout / oip.US_PER_S if timeout else None)
    assert request.priority == (params.get("priority") or None)
    assert list(wanted) == [served.model.manifest.output.name]
    assert all(k is None or (oip.is_int(k) and k >= 1) for k in wanted.values())


# -- properties --------------------------------------------------------------------------------------------


@FUZZ
@given(request=valid_requests())
def test_a_valid_request_is_parsed_as_sent(served, request):
    """Every well-formed request is accepted, with its own images, depth, timeout and priority."""
    header, tail, images = request
    text = json.dumps(header).encode()
    result = outcome(text + tail, len(text) if tail else None, served)
    assert not isinstance(result, ServiceError), result
    assert_consistent(result, served)
    if isinstance(images, list):
        assert result[1].images == images
    else:
        np.testing.assert_array_equal(result[1].images, images)


@settings(FUZZ, max_examples=400)
@given(body=bodies())
def test_any_mutated_request_is_parsed_consistently_or_refused_with_a_4xx(served, body):
    """Wrong types, missing keys, lying sizes: a 4xx that says what is wrong, never a 500; what is accepted
    is exactly what its header declares."""
    result = outcome(*body, served)
    if isinstance(result, ServiceError):
        assert_client_error(result)
    else:
        assert_consistent(result, served)


@FUZZ
@given(body=st.binary(max_size=512), split=st.none() | st.integers(0, 600))
def test_garbage_bodies_are_refused_with_a_4xx(served, body, split):
    assert_client_error(outcome(body, split, served))


@FUZZ
@given(junk=JUNK.filter(lambda v: not isinstance(v, int | float) or isinstance(v, bool)), at=st.integers(0, 783))
@example(junk=True, at=0)
def test_a_json_data_element_that_is_not_a_number_is_refused(served, junk, at):
    """oip._float_elements: "strings, booleans and objects are refused, not converted"."""
    data = [0.5] * 784
    data[at] = junk
    tensor = {"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": data}
    assert_client_error(outcome(json.dumps({"inputs": [tensor]}).encode(), None, served))


@FUZZ
@given(number=st.integers(-(2**127), 2**127) | st.floats(-3e38, 3e38), at=st.integers(0, 783))
@example(number=2**64, at=0)
def test_every_json_number_float32_holds_is_accepted(served, number, at):
    """A number is a number however it is spelt: 1e20 and 100000000000000000000 are the same float32."""
    data = [0.0] * 784
    data[at] = number
    tensor = {"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": data}
    _, request, _ = adapt(json.dumps({"inputs": [tensor]}).encode(), None, served)
    assert request.images.ravel()[at] == np.float32(float(number))  # as a JSON parser reads it: a double


@FUZZ
@given(files=st.lists(st.binary(max_size=256), min_size=1, max_size=MAX_IMAGES), rank=st.sampled_from([1, 2]),
       depth=st.none() | st.integers(1, 4) | st.just("auto"), priority=st.integers(0, 3),
       timeout_us=st.none() | st.integers(1, 10**7))  # fmt: skip
def test_a_bytes_request_built_by_tritonclient_parses_back_to_its_files(served, files, rank, depth, priority,
                                                                      timeout_us):  # fmt: skip
    """tritonclient's own request body (a 4-byte little-endian length before each element) round-trips,
    files and parameters alike."""
    shape = [len(files), 1][:rank]
    tensor = triton.InferInput(oip.BYTES_INPUT, shape, "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=object).reshape(shape), binary_data=True)
    parameters = None if depth is None else {"depth": depth}
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [tensor], priority=priority, timeout=timeout_us, parameters=parameters
    )
    _, request, _ = adapt(body, json_size, served)
    assert request.images == files
    assert (request.depth, request.priority) == (depth, priority or None)
    assert request.timeout_s == (None if timeout_us is None else timeout_us / oip.US_PER_S)


@FUZZ
@given(n=st.integers(1, 4), seed=st.integers(0, 2**16), binary=st.booleans())
def test_an_fp32_request_built_by_tritonclient_parses_back_to_its_tensor(served, n, seed, binary):
    x = np.random.default_rng(seed).standard_normal((n, 1, 28, 28), dtype=np.float32)
    tensor = triton.InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    body, json_size = triton.InferenceServerClient.generate_request_body([tensor])
    np.testing.assert_array_equal(adapt(body, json_size, served)[1].images, x)


@settings(FUZZ, max_examples=300)
@given(raw=st.binary(max_size=64) | FILES.map(oip.join_bytes), most=st.integers(0, 5))
def test_split_bytes_reads_length_prefixed_elements_or_refuses(raw, most):
    """Either the elements the prefixes describe (all of them, or the first most+1 so a count can be
    refused without reading on), or a 400 for a prefix that promises more than follows."""
    try:
        elements = oip.split_bytes(raw, most)
    except ServiceError as e:
        assert e.status == 400
        return
    joined = oip.join_bytes(elements)
    assert raw.startswith(joined) and (joined == raw or len(elements) == most + 1)


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parsed(parse, value):
    try:
        return parse(value)
    except ServiceError as e:
        assert e.status == 422, e
        return e


@FUZZ
@given(value=JUNK | st.integers(-5, 5))
def test_depth_is_an_integer_or_auto_and_nothing_else(value):
    result = parsed(oip.depth_param, value)
    valid = value == "auto" or (isinstance(value, int) and not isinstance(value, bool))
    assert result == value if valid else isinstance(result, ServiceError)


@FUZZ
@given(value=JUNK | st.floats(-1, 2 * oip.MAX_TIMEOUT_US) | st.integers(-1, 2 * oip.MAX_TIMEOUT_US))
def test_timeout_is_microseconds_up_to_an_hour_and_zero_means_none(value):
    result = parsed(oip.timeout_s, value)
    if value is None or (is_number(value) and value == 0):
        assert result is None
    elif is_number(value) and 0 < value <= oip.MAX_TIMEOUT_US:
        assert math.isclose(result, value / oip.US_PER_S)
    else:
        assert isinstance(result, ServiceError)


@FUZZ
@given(value=JUNK | st.integers(-3, 3) | st.sampled_from([False, True, 0.0, 1.0]))
def test_priority_is_a_non_negative_integer_and_zero_means_the_default(value):
    """As its error message says, a non-negative integer: not a boolean, not a float."""
    result = parsed(oip.priority_param, value)
    if value is None or (oip.is_int(value) and value == 0):
        assert result is None
    elif oip.is_int(value) and value > 0:
        assert result == value
    else:
        assert isinstance(result, ServiceError), f"priority {value!r} was taken as {result!r}"
