"""Every operation of the published OpenAPI schema fuzzed by schemathesis against a real `srvit serve`."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import settings
from hypothesis import strategies as st
from schemathesis import checks
from server_process import ServerProcess

from service.app import create_app
from service.settings import Settings

REPO = Path(__file__).parents[2] / "model_repo"
MODEL = "srvit_fashion"
SERVED = {"name": [MODEL, f"{MODEL}_d2"], "version": ["1"]}  # names and the version the server answers to
# Operations that read their body by hand, and the media types for which schemathesis sends a real file of that
# format (its own samples) rather than random bytes.
READS_BODY = {"/classify", "/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"}
REAL_FILES = {"image/png", "image/jpeg", "image/webp", "image/gif"}
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None)

# schemathesis.pytest.from_fixture, the loader that would read the running server's /openapi.json, fails on
# pytest 9.2 (schemathesis 4.32.5 reads the removed `Node._nodeid`). The operations are needed at collection,
# so they come from the app's own schema; test_the_fuzzed_schema_is_the_one_the_server_publishes checks that
# it is the one served.
OPENAPI = create_app(Settings(repo=REPO)).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)
schemathesis.serializer.alias("image/bmp", "application/octet-stream")  # a BMP body is sent as its bytes


@schema.hook
def flatmap_path_parameters(context, path_parameters):
    """Often a name and version the server serves, so the fuzzer gets past the 404 to the handlers behind it."""
    return st.fixed_dictionaries(
        {key: st.sampled_from([value, *SERVED.get(key, [])]) for key, value in (path_parameters or {}).items()}
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(REPO, tmp_path_factory.mktemp("log") / "serve.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def own_deadline(case, response) -> bool:
    """A 504 deadline_exceeded answers a request that set its own deadline (`timeout_ms=5e-324` passes at
    once): documented and by design, not a fault."""
    return response.status_code == 504 and "timeout_ms" in (case.query or {})


def excluded(case, response) -> list:
    """Where a schema-valid request is rightly refused, its acceptance is not asserted (its status still is):
    a body the schema allows need not be an image (random `format: binary` bytes) or a tensor that fills its
    shape, and model load/unload is always refused (the repository is fixed at start-up)."""
    skipped = [checks.not_a_server_error] if own_deadline(case, response) else []
    refused = case.operation.path.endswith(("/load", "/unload"))
    if refused or (case.operation.path in READS_BODY and case.media_type not in REAL_FILES):
        skipped.append(checks.positive_data_acceptance)
    return skipped


@schema.parametrize()
@FUZZ
def test_no_operation_answers_with_a_server_error(case, server):
    """Whatever the documentation says, no request makes the server fail: no 5xx."""
    response = case.call(base_url=server.url)
    if not own_deadline(case, response):
        case.validate_response(response, checks=[checks.not_a_server_error])


@schema.parametrize()
@FUZZ
def test_every_operation_answers_as_documented(case, server):
    """What a client generated from /openapi.json relies on: documented status codes, content types, headers
    and bodies; schema-valid requests accepted (real image files) and schema-invalid ones refused."""
    response = case.call(base_url=server.url)
    case.validate_response(response, excluded_checks=excluded(case, response))


@pytest.mark.parametrize(
    ("method", "path", "name"),
    [
        ("GET", "/v2/models/{name}", "nope"),  # 404 model_not_found
        ("POST", "/v2/models/{name}/infer", MODEL),  # 400 bad_request: an empty body is not the JSON header
        ("POST", "/v2/repository/models/{name}/load", MODEL),  # 400 model_control_disabled, always
    ],
)
def test_v2_errors_are_documented(server, method, path, name):
    """Minimal cases of what the sweep above finds: an error every client of these operations can get."""
    case = schema[path][method].Case(path_parameters={"name": name})
    case.call_and_validate(base_url=server.url, checks=[checks.status_code_conformance])


def test_the_fuzzed_schema_is_the_one_the_server_publishes(server):
    assert httpx.get(f"{server.url}/openapi.json").json() == OPENAPI
