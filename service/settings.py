"""Every knob of `srvit serve`: one pydantic settings object, read from SRVIT_* variables and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1024 * 1024


def is_usable_key(key: str) -> bool:
    return len(key) >= 8 and all("!" <= c <= "~" for c in key)


class Settings(BaseSettings):
    """Built once per app. Precedence: CLI flags (constructor arguments), then SRVIT_* variables, then defaults.

    List-valued settings take comma-separated text (SRVIT_WARMUP_BATCH_SIZES=1,4,16) so that an environment
    variable and a flag read the same way.
    """

    # hide_input_in_errors: a bad setting's message must not print the API key
    model_config = SettingsConfigDict(env_prefix="SRVIT_", frozen=True, extra="forbid", hide_input_in_errors=True)

    repo: Path = Field(Path("model_repo"), description="model repository written by `srvit export`")
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in a container)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    grpc_port: int = Field(
        8001, ge=0, le=65535, description="TCP port of the Open Inference Protocol over gRPC, as Triton's (0: off)"
    )
    default_depth: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description="depth when a request names none: a number, or auto (default: each model's deepest)"
    )
    max_batch_size: int = Field(32, ge=1, description="largest batch formed; capped by each manifest's own limit")
    max_queue_delay_ms: float = Field(
        0.0,
        ge=0,
        description="how long the oldest queued request waits for its batch to fill up (0: batches are what "
        "queued while the device was busy, as Triton's default; docs/benchmarks.md measures 0 against 5)",
    )
    max_queue_images: int = Field(
        256, ge=1, description="images queued per (model, depth) before 503 overloaded: a memory bound"
    )
    max_queue_wait_ms: float = Field(
        1000.0,
        gt=0,
        description="a request whose predicted wait for the work ahead of it on the device exceeds this is "
        "refused at once (503 overloaded, Retry-After from the predicted drain time) instead of queueing: a bound "
        "in time, the same for every model and machine (the batch window comes on top); depth=auto requests too, "
        "after auto has chosen their depth for the latency target",
    )
    max_in_flight: int = Field(
        64, ge=1, description="requests admitted at once (receiving, decoding, queued or running) before 503 overloaded"
    )
    max_images_per_request: int = Field(16, ge=1, description="image parts accepted in one multipart request")
    max_body_bytes: int = Field(16 * MiB, ge=1, description="request body limit, counted while streaming (413)")
    max_buffered_bytes: int = Field(
        64 * MiB,
        ge=1,
        description="request body bytes held at once across all HTTP requests: each reserves its Content-Length "
        "(max_body_bytes when chunked or compressed) before its body is read; past it, 503 overloaded at once "
        "(at least max_body_bytes)",
    )
    max_json_body_bytes: int = Field(
        4 * MiB,
        ge=1,
        description="limit for a v2 request's JSON part, parsed into Python objects first (413); "
        "send bigger tensors with the binary tensor extension",
    )
    max_pixels: int = Field(40_000_000, ge=1, description="width*height limit, checked before decoding (422)")
    latency_target_ms: float = Field(100.0, gt=0, description="the completion time depth=auto aims for")
    auto_headroom: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="share of each depth's slack auto keeps free of queued work, so bursts "
        "step down to shallower depths before requests must be refused",
    )
    auto_step_up_hold_s: float = Field(
        2.0, ge=0, description="a deeper depth must stay comfortable this long before auto steps up (no flapping)"
    )
    providers: Annotated[tuple[str, ...], NoDecode] = Field(
        ("auto",),
        description="ONNX Runtime execution providers in order (tensorrt, cuda, cpu or full names); "
        "auto = TensorRT, CUDA, CPU as available",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads (0: ONNX Runtime's choice)")
    intra_op_spinning: bool = Field(
        False,
        description="let ONNX Runtime's idle intra-op threads spin for the next call (lower latency on cores of "
        "their own; off by default: spinning threads take CPU from decoding and HTTP on a shared machine)",
    )
    device_timeout_s: float = Field(
        30.0,
        gt=0,
        description="a batch running longer means the device hung: liveness and readiness fail (a restart) and "
        "queued requests get 503 at once",
    )
    preprocess_threads: int = Field(2, ge=1, description="threads decoding images off the event loop")
    inline_decode_max_pixels: int = Field(
        16384,
        ge=0,
        description="a lone image of at most this many pixels, for a model whose resize is no larger, is decoded on "
        "the event loop: cheaper than the hop to a decoding thread and back (0: every image goes to the threads)",
    )
    shutdown_delay_s: float = Field(
        5.0,
        ge=0,
        description="on SIGTERM, how long the server stays unready but keeps serving new requests, so load "
        "balancers and Kubernetes endpoints stop routing to it first (0: refuse new requests at once)",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="after the shutdown delay, time allowed for admitted, queued and running work"
    )
    priority_levels: int = Field(
        3, ge=1, le=16, description="request priority levels, 1 the highest (Triton's `priority` parameter)"
    )
    default_priority_level: int = Field(2, ge=1, description="the level of a request that names none (or 0)")
    priority_step_ms: float = Field(
        100.0,
        ge=0,
        description="each level below 1 lets work arriving up to this much later go first: a lower level waits "
        "at most (level - 1) * step behind higher ones, never starves",
    )
    body_timeout_s: float = Field(10.0, gt=0, description="time allowed to receive a request body (408)")
    default_top_k: int = Field(5, ge=1, description="predictions returned when a request names no top_k")
    warmup_batch_sizes: Annotated[tuple[int, ...], NoDecode] = Field(
        (1, 4, 16), description="batch sizes timed at start-up (each model's batch limit is always added)"
    )
    warmup_runs: int = Field(3, ge=1, description="timed runs per (depth, batch size); the median is kept")
    log_level: str = Field("info", pattern="^(debug|info|warning|error)$", description="log level")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="json: one JSON object per log line (request lines carry request_id, protocol, model, "
        "depth, status, duration_ms)",
    )
    api_key: SecretStr | None = Field(
        None,
        description="require this key (Authorization: Bearer, or X-API-Key) on every route but health checks; "
        "an environment variable only, never a flag (a flag shows in the process list)",
    )
    api_key_file: Path | None = Field(None, description="read the API key from this file (a mounted secret)")
    metrics_port: int = Field(
        0, ge=0, le=65535, description="also serve /metrics, without the API key, on this port (0: the API port only)"
    )

    @field_validator("providers", "warmup_batch_sizes", mode="before")
    @classmethod
    def _split_commas(cls, value):
        """'1,4,16' from an environment variable or a flag; lists from Python pass through."""
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, key: SecretStr | None) -> SecretStr | None:
        """An empty key (an unset secret) would let an empty header in: refuse it, and anything but printable
        ASCII, which HTTP headers cannot carry reliably."""
        if key is not None and not is_usable_key(key.get_secret_value()):
            raise ValueError("api_key must be 8 or more printable ASCII characters, no spaces")
        return key

    @model_validator(mode="after")
    def _distinct_ports(self):
        ports = [p for p in (self.port, self.grpc_port, self.metrics_port) if p]
        if len(ports) != len(set(ports)):
            raise ValueError(f"port, grpc_port and metrics_port must differ, got {ports}")
        return self

    @model_validator(mode="after")
    def _one_body_fits(self):
        if self.max_buffered_bytes < self.max_body_bytes:
            raise ValueError(f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least max_body_bytes "
                             f"({self.max_body_bytes}): a body of the largest size could never be read")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _one_key_source(self):
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("give api_key or api_key_file, not both")
        return self

    @model_validator(mode="after")
    def _default_level_exists(self):
        if self.default_priority_level > self.priority_levels:
            raise ValueError(f"default_priority_level {self.default_priority_level} is above priority_levels "
                             f"{self.priority_levels}")  # fmt: skip
        return self

    @field_validator("warmup_batch_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: tuple[int, ...]) -> tuple[int, ...]:
        if not sizes or min(sizes) < 1:
            raise ValueError("warm-up batch sizes must be positive integers, e.g. 1,4,16")
        return tuple(sorted(set(sizes)))
