"""The HTTP API's shapes: request parameters and response bodies, which also document the API in OpenAPI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.inference import Depth


class ClassifyParams(BaseModel):
    """Query parameters of POST /classify, or form fields beside the `image` parts of a multipart body.

    Unknown parameters are refused: a misspelt `deph=1` silently ignored would serve the wrong depth.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    depth: Depth | None = Field(
        None,
        description="recursion depth 1..max_depth; `auto` to meet the latency target; `adaptive` to go deeper only "
        "for images the shallow answer is unsure of (the model's calibrated policy); default: max depth",
    )
    top_k: int | None = Field(None, ge=1, description="predictions to return (at most the number of labels)")
    model: str | None = Field(None, description="model name; optional when the server serves one model")
    timeout_ms: float | None = Field(
        None, gt=0, le=3_600_000, allow_inf_nan=False, description="deadline from receipt; 504 when it passes"
    )


class Prediction(BaseModel):
    label: str
    index: int
    score: float = Field(description="softmax probability")


class Timing(BaseModel):
    queue: float = Field(description="ms from queueing to the batch starting")
    inference: float = Field(description="ms the batch ran")
    total: float = Field(description="ms from receipt to the answer")


class Classification(BaseModel):
    """One image's answer."""

    model: str
    model_version: str
    depth_requested: Depth | None = Field(description="what the request asked for; null when it named no depth")
    depth_used: int = Field(description="the depth whose answer this is")
    depth_reason: Literal[
        "requested", "default", "latency_target", "overload", "confident", "max_depth", "deadline"
    ] = Field(
        description="requested: the explicit depth, always honoured exactly; default: the server's default depth; "
        "latency_target: auto, as deep as the latency budget allows on an idle server; "
        "overload: auto or adaptive, kept shallower by the work queued ahead; "
        "confident: adaptive, sure enough to stop; max_depth: adaptive, at its policy's last depth; "
        "deadline: adaptive, stopped because the next depth would miss timeout_ms"
    )
    depths_run: list[int] = Field(description="every depth the image went through: [depth_used] but for adaptive")
    gflops: float | None = Field(description="compute spent on this image; null for models exported before FLOPs")
    predictions: list[Prediction]
    timing_ms: Timing
    request_id: str


class Classifications(BaseModel):
    """The answer to a multipart request with several `image` parts, in part order."""

    results: list[Classification]
    request_id: str


class ErrorBody(BaseModel):
    error: str = Field(description="what went wrong and what to do about it")
    code: str = Field(description="machine-readable, from a fixed set: payload_too_large, unsupported_media_type, ...")
    request_id: str


def error_responses(texts: dict[int, str]) -> dict:
    """OpenAPI `responses` for these statuses, each answered with our error body."""
    return {status: {"model": ErrorBody, "description": text} for status, text in texts.items()}


class DepthInfo(BaseModel):
    depth: int
    accuracy: dict | None = Field(description="held-out top-1 from the manifest, or null when none was measured")
    gflops: float | None = Field(description="compute per image at this depth, or null for an export before FLOPs")
    latency_ms: dict[str, float] = Field(description="measured at warm-up: batch size -> median ms")
    runtime: str = Field(description="execution provider or engine serving this depth")
    max_batch_size: int


class ModelInfo(BaseModel):
    name: str
    version: str
    max_depth: int
    default_depth: Depth
    auto_depth: int = Field(description="the depth `auto` currently picks on this server")
    labels: int = Field(description="number of classes")
    input_shape: list[int] = Field(description="[-1, C, H, W]; -1 is the batch")
    adaptive: dict | None = Field(
        description="depth=adaptive's calibrated policy (stages: depth, temperature, "
        "threshold; combine; expected top-1 and compute), or null when it has none"
    )
    depths: list[DepthInfo]


class ModelList(BaseModel):
    models: list[ModelInfo]


class Status(BaseModel):
    status: str
