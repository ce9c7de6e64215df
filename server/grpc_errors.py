"""The one place where exceptions become gRPC status codes.

A `VoicegateError` becomes its own status with its caller-safe message; an `InvalidArgument`
also carries a `google.rpc.Status` with a `google.rpc.BadRequest` detail naming the field
(`grpc-status-details-bin` trailer; clients read it with `grpc_status.rpc_status.from_call`).
Anything else is logged with its traceback and becomes an opaque INTERNAL: no stack trace
reaches a client.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from server.api.voicegate.v1 import speaker_pb2, vad_pb2
from server.errors import InvalidArgument, StatusCode, VoicegateError
from server.telemetry import record_error

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details"

# The services of the API (from the generated descriptors) and the infrastructure services the
# server registers beside them (health checks and reflection: no token, no span).
API_SERVICES = frozenset(
    service.full_name
    for api in (speaker_pb2, vad_pb2)
    for service in api.DESCRIPTOR.services_by_name.values()
)
INFRASTRUCTURE_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})
# API methods that only read or delete a stored record: cheap, never refused for load.
LIGHT_METHODS = frozenset({"GetSpeaker", "ListSpeakers", "DeleteSpeaker"})


class MethodInfo(NamedTuple):
    """What the interceptors need to know of a method, from its `/package.Service/Method`."""

    service: str  # `voicegate.v1.SpeakerService`
    method: str  # `Embed`
    is_api: bool  # a method of one of the API_SERVICES: traced, counted in stage `total`
    is_work: bool  # an API method that is not one of LIGHT_METHODS: under admission control
    is_infrastructure: bool  # health or reflection: reached without a token


@functools.lru_cache(maxsize=1024)  # bounded: a caller may send any method name
def method_info(full_method: str) -> MethodInfo:
    """Service and method of `/package.Service/Method`, and how the interceptors treat it."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    is_api = service in API_SERVICES
    return MethodInfo(
        service=service,
        method=method,
        is_api=is_api,
        is_work=is_api and method not in LIGHT_METHODS,
        is_infrastructure=service in INFRASTRUCTURE_SERVICES,
    )


def grpc_status(error: VoicegateError) -> grpc.StatusCode:
    """The gRPC status code of a voicegate error."""
    code: grpc.StatusCode = getattr(grpc.StatusCode, error.status.value)
    return code


def rich_status(error: InvalidArgument) -> grpc.Status:
    """The status of an invalid request: its code and message, and a `google.rpc.BadRequest`
    with one field violation (the field's path, when known, and what is wrong with it)."""
    violation = error_details_pb2.BadRequest.FieldViolation(
        field=error.field or "", description=error.description
    )
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    code = grpc_status(error)
    status = status_pb2.Status(code=code.value[0], message=error.message, details=[detail])
    result: grpc.Status = rpc_status.to_status(status)
    return result


async def abort_with(
    context: grpc.aio.ServicerContext,
    exc: BaseException,
    method: str,
    *,
    log_level: int = logging.INFO,
) -> None:
    """Abort the call with the status `exc` maps to (re-raises grpc's own abort).

    A `VoicegateError` is logged at `log_level` (lower it for a caller that reports such
    errors itself, rate-limited); anything else is an ERROR with its traceback.
    """
    record_error(exc)  # on the RPC's server span (a no-op without tracing)
    if isinstance(exc, VoicegateError):
        log.log(log_level, "%s failed: %s %s", method, exc.status.value, exc.message)
        if isinstance(exc, InvalidArgument):
            await context.abort_with_status(rich_status(exc))
        await context.abort(grpc_status(exc), exc.message)
    log.error("%s failed with an unexpected error", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RPC handler so errors map to status codes in one place."""

    def __init__(self) -> None:
        self._handlers = HandlerCache(self._wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return self._handlers.get(str(handler_call_details.method), handler)

    @staticmethod
    def _wrap(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return rewrap_handler(
            handler,
            wrap_unary=lambda behavior: _wrap_unary(behavior, method),
            wrap_stream=lambda behavior: _wrap_stream(behavior, method),
        )


Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


class HandlerCache:
    """The wrapped handler of each method, built once by `wrap(full_method, handler)`.

    grpc hands an interceptor the same handler object for every call of a method, so its
    wrapping is per method, not per call; a different handler (re-registered) is wrapped
    anew. Keys are registered methods only (the caller skips a None handler).
    """

    def __init__(self, wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> None:
        self._wrap = wrap
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        cached = self._handlers.get(full_method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(full_method, handler)
        self._handlers[full_method] = (handler, wrapped)
        return wrapped


def rewrap_handler(
    handler: grpc.RpcMethodHandler,
    wrap_unary: Wrapper,
    wrap_stream: Wrapper,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """The same handler with its behavior wrapped: `wrap_unary` for the RPC kinds that return
    one response, `wrap_stream` for those that yield a stream of them; `request_deserializer`
    replaces the handler's own when given."""
    deserializer = request_deserializer or handler.request_deserializer
    kinds = [
        (handler.unary_unary, grpc.unary_unary_rpc_method_handler, wrap_unary),
        (handler.stream_unary, grpc.stream_unary_rpc_method_handler, wrap_unary),
        (handler.unary_stream, grpc.unary_stream_rpc_method_handler, wrap_stream),
        (handler.stream_stream, grpc.stream_stream_rpc_method_handler, wrap_stream),
    ]
    for behavior, factory, wrap in kinds:
        if behavior is not None:
            wrapped: grpc.RpcMethodHandler = factory(
                wrap(behavior),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
            return wrapped
    return handler


def _wrap_unary(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc, method)

    return wrapped


def _wrap_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort_with(context, exc, method)

    return wrapped


__all__ = [
    "API_SERVICES",
    "INFRASTRUCTURE_SERVICES",
    "LIGHT_METHODS",
    "ErrorMappingInterceptor",
    "HandlerCache",
    "MethodInfo",
    "StatusCode",
    "abort_with",
    "grpc_status",
    "method_info",
    "rewrap_handler",
    "rich_status",
]
