"""The one place where exceptions become gRPC status codes.

A `VoicegateError` becomes its own status with its caller-safe message; an `InvalidArgument`
also carries a `google.rpc.Status` with a `google.rpc.BadRequest` detail naming the field
(`grpc-status-details-bin` trailer; clients read it with `grpc_status.rpc_status.from_call`).
Anything else is logged with its traceback and becomes an opaque INTERNAL: no stack trace
reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server.errors import InvalidArgument, StatusCode, VoicegateError
from server.telemetry import record_error

log = logging.getLogger(__name__)

INTERNAL_MESSAGE = "internal error; the server log has the details"


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


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """Abort the call with the status `exc` maps to (re-raises grpc's own abort)."""
    record_error(exc)  # on the RPC's server span (a no-op without tracing)
    if isinstance(exc, VoicegateError):
        log.info("%s failed: %s %s", method, exc.status.value, exc.message)
        if isinstance(exc, InvalidArgument):
            await context.abort_with_status(rich_status(exc))
        await context.abort(grpc_status(exc), exc.message)
    log.error("%s failed with an unexpected error", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RPC handler so errors map to status codes in one place."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        return rewrap_handler(
            handler,
            wrap_unary=lambda behavior: _wrap_unary(behavior, method),
            wrap_stream=lambda behavior: _wrap_stream(behavior, method),
        )


Wrapper = Callable[[Callable[..., Any]], Callable[..., Any]]


def rewrap_handler(
    handler: grpc.RpcMethodHandler, wrap_unary: Wrapper, wrap_stream: Wrapper
) -> grpc.RpcMethodHandler:
    """The same handler with its behavior wrapped: `wrap_unary` for the RPC kinds that return
    one response, `wrap_stream` for those that yield a stream of them."""
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
                request_deserializer=handler.request_deserializer,
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
    "ErrorMappingInterceptor",
    "StatusCode",
    "abort_with",
    "grpc_status",
    "rewrap_handler",
    "rich_status",
]
