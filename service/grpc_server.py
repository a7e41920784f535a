"""The Open Inference Protocol over gRPC: Triton's `inference.GRPCInferenceService`, so `tritonclient.grpc`
works unchanged, and the standard `grpc.health.v1.Health` service for Kubernetes' gRPC probes.

It runs on the HTTP server's event loop, in the same process, over the same core: a gRPC request and an HTTP
request at the same depth can share a batch. Messages are the ones tritonclient ships (generated from Triton's
own protos). Limits, deadlines, admission and draining are the HTTP ones: the message size limit is
max_body_bytes, the call's deadline is the request's deadline, and the contract's errors map to gRPC codes.
"""

from __future__ import annotations

import asyncio
import functools
import logging

import grpc
from google.protobuf import duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_status import rpc_status
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from service import health, oip
from service.accounting import request_id
from service.auth import Unauthorized
from service.errors import BadRequest, InvalidParameter, ModelControlDisabled, Overloaded, ServiceError
from service.lifecycle import Service

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
HEALTH_METHODS = {"ServerLive", "ServerReady"}  # answered without the API key, as /v2/health/live and /ready are
HEALTH_SERVICE = "grpc.health.v1.Health"
HEALTH_REFRESH_S = 0.5  # how often Watch streams see the server's state
HEALTH_CALLS = 8  # concurrent calls beyond max_in_flight, so probes and metadata are answered under load
# The contract's statuses as gRPC codes; 503 splits by cause (overloaded: RESOURCE_EXHAUSTED with RetryInfo).
Code = grpc.StatusCode
CODES = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED, 404: Code.NOT_FOUND, 408: Code.DEADLINE_EXCEEDED,
         413: Code.INVALID_ARGUMENT, 415: Code.INVALID_ARGUMENT, 422: Code.INVALID_ARGUMENT, 499: Code.CANCELLED,
         503: Code.UNAVAILABLE, 504: Code.DEADLINE_EXCEEDED}  # fmt: skip
UNIMPLEMENTED = {
    "ModelStreamInfer": "streaming inference is not served: send ModelInfer calls",
    "SystemSharedMemoryStatus": "shared memory is not served: send tensors in the request",
    "SystemSharedMemoryRegister": "shared memory is not served: send tensors in the request",
    "SystemSharedMemoryUnregister": "shared memory is not served: send tensors in the request",
    "CudaSharedMemoryStatus": "CUDA shared memory is not served: send tensors in the request",
    "CudaSharedMemoryRegister": "CUDA shared memory is not served: send tensors in the request",
    "CudaSharedMemoryUnregister": "CUDA shared memory is not served: send tensors in the request",
    "TraceSetting": "tracing is not served: use the Prometheus metrics at /metrics",
    "LogSettings": "log settings are fixed at start-up (--log-level)",
}


def status_of(error: ServiceError) -> grpc.Status:
    """The contract's error as a gRPC status; an overloaded answer carries RetryInfo (google.rpc) with the
    Retry-After an HTTP client would get."""
    if isinstance(error, Overloaded):
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=error.retry_after))
        detail = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=error.message)
        detail.details.add().Pack(retry)
        return rpc_status.to_status(detail)
    code = Code.FAILED_PRECONDITION if isinstance(error, ModelControlDisabled) else None
    code = code or CODES.get(error.status, Code.INTERNAL)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=error.message))


def rpc(method):
    """A ServiceError raised by the method becomes the call's status; anything else is logged and answered
    INTERNAL, never with a traceback (as HTTP's 500)."""

    @functools.wraps(method)
    async def call(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except ServiceError as error:
            if error.status == 500:
                log.error("gRPC %s: %s", method.__name__, error.message)
            await context.abort_with_status(status_of(error))
        except Exception:
            log.exception("unhandled error in gRPC %s", method.__name__)
            await context.abort(Code.INTERNAL, "internal error; it was logged: retry, or report the request id")

    return call


def parameter(p: pb.InferParameter):
    """An InferParameter's value, whichever of bool, int64, string, double or uint64 it holds."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def set_parameter(p: pb.InferParameter, value: int | str | float) -> None:
    """One response parameter, typed as Triton types them."""
    if isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        p.double_param = value


def parameters(params) -> dict:
    return {name: parameter(p) for name, p in params.items()}


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, svc: Service):
        self.svc = svc

    @rpc
    async def ServerLive(self, request, context):
        live = not health.crashed(self.svc)
        return pb.ServerLiveResponse(live=live)

    @rpc
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=health.is_ready(self.svc))

    @rpc
    async def ModelReady(self, request, context):
        if not health.is_ready(self.svc):  # as HTTP: readiness first, the name only once models are loaded
            return pb.ModelReadyResponse(ready=False)
        oip.resolve(self.svc.served, request.name, request.version)
        return pb.ModelReadyResponse(ready=True)

    @rpc
    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(oip.server_metadata(), pb.ServerMetadataResponse())

    @rpc
    async def ModelMetadata(self, request, context):
        health.check_described(self.svc)
        served, _ = oip.resolve(self.svc.served, request.name, request.version)
        meta = oip.metadata(served, request.name)
        del meta["parameters"]  # no field for it in ModelMetadataResponse
        return json_format.ParseDict(meta, pb.ModelMetadataResponse())

    @rpc
    async def ModelConfig(self, request, context):
        health.check_described(self.svc)
        served, _ = oip.resolve(self.svc.served, request.name, request.version)
        return pb.ModelConfigResponse(config=oip.model_config(served, request.name))

    @rpc
    async def ModelStatistics(self, request, context):
        health.check_described(self.svc)
        svc = self.svc
        if request.name:
            served, _ = oip.resolve(svc.served, request.name, request.version)
            stats = [oip.statistics(svc.statistics, served, request.name)]
        else:
            stats = oip.all_statistics(svc.statistics, svc.served)
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    @rpc
    async def RepositoryIndex(self, request, context):
        health.check_described(self.svc)
        ready = health.is_ready(self.svc)
        index = [] if request.ready and not ready else oip.repository_index(self.svc.served, ready)
        return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse())

    @rpc
    async def RepositoryModelLoad(self, request, context):
        raise ModelControlDisabled(oip.MODEL_CONTROL_OFF)

    @rpc
    async def RepositoryModelUnload(self, request, context):
        raise ModelControlDisabled(oip.MODEL_CONTROL_OFF)

    @rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        svc, deadline_s = self.svc, context.time_remaining()  # from now, as the request's clock starts now
        with svc.accounting.track(request_id(request.id), "v2_grpc") as ctx:
            served, fixed_depth = oip.resolve(svc.served, request.model_name, request.model_version)
            ctx.model, ctx.depth = served.name, fixed_depth  # a folder name's depth counts its failures too
            check_counts(request)
            wanted = oip.requested_outputs(requested_outputs(request), served)
            images = await svc.core.offload(request_images, request, served, svc.settings.max_images_per_request)
            infer = oip.infer_request(ctx, parameters(request.parameters), images, served, fixed_depth,
                                      deadline_s=deadline_s)  # fmt: skip
            result = await svc.core.infer(infer)
            outputs = oip.outputs(result, wanted, served.model.labels)
            response = pb.ModelInferResponse(model_name=request.model_name, model_version=result.model_version,
                                             id=request.id)  # fmt: skip
            for key, value in oip.depth_parameters(result).items():
                set_parameter(response.parameters[key], value)
            for output in outputs:
                response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
                response.raw_output_contents.append(output.raw())
            return response


def check_counts(request: pb.ModelInferRequest) -> None:
    """One input and at most one output, before anything is unpacked: a 16 MiB message of empty entries
    must not cost the event loop millions of iterations."""
    if len(request.inputs) != 1 or len(request.raw_input_contents) > 1:
        raise BadRequest(f"send exactly one input ('images' FP32 or 'image' BYTES); got {len(request.inputs)} "
                         f"inputs and {len(request.raw_input_contents)} raw_input_contents")  # fmt: skip
    if len(request.outputs) > 1:
        raise InvalidParameter(f"this model has one output; {len(request.outputs)} were requested")


def request_images(request: pb.ModelInferRequest, served, max_images: int):
    """The one input as raw_input_contents (what tritonclient sends) or typed contents, then oip.images_of;
    runs in the decoding pool, since 4M typed floats take a while."""
    (tensor,) = request.inputs
    raw = request.raw_input_contents[0] if request.raw_input_contents else None
    elements = tensor.contents.bytes_contents if tensor.datatype == "BYTES" else tensor.contents.fp32_contents
    typed = oip.InputTensor(tensor.name, tensor.datatype, list(tensor.shape), raw, None if raw else elements)
    return oip.images_of([typed], served, max_images)


def requested_outputs(request: pb.ModelInferRequest) -> dict[str, dict]:
    return {o.name: parameters(o.parameters) for o in request.outputs}


def _unimplemented(name: str, message: str):
    async def refuse(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    refuse.__name__ = name
    return refuse


for _name, _message in UNIMPLEMENTED.items():
    setattr(InferenceService, _name, _unimplemented(_name, _message))


class KeyInterceptor(grpc.aio.ServerInterceptor):
    """The API key from the call's metadata, checked when the call starts, before its message is read; the
    health methods are answered without it."""

    def __init__(self, svc: Service):
        self.svc = svc

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        service, _, method = details.method.rpartition("/")
        if handler is None or service == f"/{HEALTH_SERVICE}" or method in HEALTH_METHODS:
            return handler
        try:
            self.svc.keys.check((k.lower(), v) for k, v in details.invocation_metadata or ())
        except Unauthorized as error:
            return _refusing(handler, error.message)
        return handler


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers UNAUTHENTICATED."""

    async def unary(request, context):
        await context.abort(Code.UNAUTHENTICATED, message)

    async def streaming(requests, context):
        await context.abort(Code.UNAUTHENTICATED, message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)


class Health(health_aio.HealthServicer):
    """grpc.health.v1 answering as /readyz does: SERVING for "" and the inference service while ready."""

    def __init__(self, svc: Service):
        super().__init__()
        self.svc = svc

    async def refresh(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if health.is_ready(self.svc) else (
            health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
        for name in ("", SERVICE_NAME):
            await self.set(name, status)

    async def Check(self, request, context):
        await self.refresh()  # the state now, not as of the last refresh
        return await super().Check(request, context)


class GrpcFrontEnd:
    """The gRPC server of one Service: started after the models are ready, stopped after the drain."""

    def __init__(self, svc: Service):
        self.svc = svc
        s = svc.settings
        # Calls beyond max_in_flight (and a few for health checks) are refused by grpc (RESOURCE_EXHAUSTED) before
        # their messages are read, so a flood of 16 MiB calls cannot pile up in memory ahead of admission.
        options = [("grpc.max_receive_message_length", s.max_body_bytes),
                   ("grpc.max_send_message_length", s.max_body_bytes),
                   ("grpc.so_reuseport", 0)]  # a port in use fails to bind instead of being shared  # fmt: skip
        self.server = grpc.aio.server(options=options, maximum_concurrent_rpcs=s.max_in_flight + HEALTH_CALLS,
                                      interceptors=[KeyInterceptor(svc)])  # fmt: skip
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(svc), self.server)
        self.health = Health(svc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        try:
            self.port = self.server.add_insecure_port(f"{_host(s.host)}:{s.grpc_port}")
        except RuntimeError as e:  # grpc's "Failed to bind"
            raise OSError(
                f"cannot listen for gRPC on {s.host}:{s.grpc_port}: the port is in use or not allowed "
                "(--grpc-port, or 0 for no gRPC)"
            ) from e
        self._refresher = None

    async def start(self) -> None:
        await self.health.refresh()
        await self.server.start()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_forever())
        log.info("gRPC (Open Inference Protocol, grpc.health.v1) on %s:%d", self.svc.settings.host, self.port)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(HEALTH_REFRESH_S)
            await self.health.refresh()

    async def stop(self, grace_s: float) -> None:
        """After the drain: calls still running get `grace_s`, then are cancelled; health answers NOT_SERVING."""
        if self._refresher is not None:
            self._refresher.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
