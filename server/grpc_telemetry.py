"""The gRPC side of telemetry: one server interceptor for spans and per-RPC metrics.

Installed first (outermost), ahead of `ErrorMappingInterceptor`, so that it sees the status
code every call really ends with and that the error log lines are written inside the span.

For each RPC of the API, streaming ones included (not health checks or reflection, which only
get metrics), it continues the caller's W3C `traceparent` from the request metadata and opens a
SERVER span named `voicegate.v1.SpeakerService/Embed`, with the attributes of the OpenTelemetry
RPC conventions (`rpc.system`, `rpc.service`, `rpc.method`, `rpc.grpc.status_code`,
`network.peer.*`).

opentelemetry-instrumentation-grpc's aio interceptor continues `traceparent` correctly as well
(it extracts from the invocation metadata with the global propagator); this one is used instead
because it also keeps the metrics, names spans as the conventions say (no leading `/`), follows
the server-span error rules, and takes our own tracer rather than the global provider.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import Token
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from server.grpc_errors import HandlerCache, MethodInfo, method_info, rewrap_handler
from server.telemetry import GRPC_CODES, RPC_METHOD, SERVER_ERROR_CODES, Telemetry


class TelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Server span, caller's trace context and RPC metrics for every call (spans for the API's
    methods only: not for health checks or reflection)."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry
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

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        observer = _MethodObserver(self._telemetry, method_info(full_method))
        return rewrap_handler(
            handler, wrap_unary=observer.wrap_unary, wrap_stream=observer.wrap_stream
        )


class _MethodObserver:
    """Wraps the handler of one method: each call's span, status code and metrics.

    Built once per method (its metric children bound here); everything of a call (its span,
    start time, status code) lives in the wrapped handler's own frame.
    """

    def __init__(self, telemetry: Telemetry, info: MethodInfo) -> None:
        self._tracing = telemetry.tracing
        self._metrics = telemetry.metrics
        self._service = info.service
        self._method = info.method
        self._traced = info.is_api and telemetry.tracing.enabled
        self._api = info.is_api
        self._span_name = f"{info.service}/{info.method}"
        self._attributes = {
            "rpc.system": "grpc",
            "rpc.service": info.service,
            "rpc.method": info.method,
        }
        metrics = self._metrics
        self._in_flight: Any = None
        self._seconds: Any = None
        self._total: Any = None
        self._handled: dict[str, Any] = {}  # by status code, made on first use
        if metrics is not None:
            self._in_flight = metrics.in_flight.labels(self._service, self._method)
            self._seconds = metrics.handling_seconds.labels(self._service, self._method)
            if self._api:
                self._total = metrics.stage_seconds.labels(self._method, "total")

    def wrap_unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            began = self._begin()
            method_token = RPC_METHOD.set(self._method)
            span, otel_token = self._start_span(context) if self._traced else (None, None)
            code = "UNKNOWN"
            try:
                response = await behavior(request, context)
                code = _code_name(context.code()) or "OK"
                return response
            except grpc.aio.AbortError:
                code = _code_name(context.code()) or "UNKNOWN"
                raise
            except asyncio.CancelledError:
                code = _cancel_code(context)
                raise
            finally:
                self._end(span, code, context, began)
                if otel_token is not None:
                    otel_context.detach(otel_token)
                RPC_METHOD.reset(method_token)

        return wrapped

    def wrap_stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            began = self._begin()
            span, parent = self._open_span(context) if self._traced else (None, None)
            steps = aiter(behavior(request, context))
            code = "UNKNOWN"
            try:
                while True:
                    # The span and the method label are current only while the handler runs a
                    # step: a context variable set in an async generator would otherwise leak
                    # to whoever resumes it across a yield.
                    with self._current(span, parent):
                        try:
                            response = await anext(steps)
                        except StopAsyncIteration:
                            break
                    yield response
                code = _code_name(context.code()) or "OK"
            except grpc.aio.AbortError:
                code = _code_name(context.code()) or "UNKNOWN"
                raise
            except asyncio.CancelledError:
                code = _cancel_code(context)
                raise
            finally:
                self._end(span, code, context, began)

        return wrapped

    @contextmanager
    def _current(
        self, span: trace.Span | None, parent: otel_context.Context | None
    ) -> Iterator[None]:
        method_token = RPC_METHOD.set(self._method)
        otel_token = (
            otel_context.attach(trace.set_span_in_context(span, parent))
            if span is not None
            else None
        )
        try:
            yield
        finally:
            if otel_token is not None:
                otel_context.detach(otel_token)
            RPC_METHOD.reset(method_token)

    def _begin(self) -> float:
        if self._in_flight is not None:
            self._in_flight.inc()
        return time.perf_counter()

    def _start_span(
        self, context: grpc.aio.ServicerContext
    ) -> tuple[trace.Span, Token[otel_context.Context]]:
        """The SERVER span, child of the caller's context, made current (detach the token)."""
        span, parent = self._open_span(context)
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    def _open_span(
        self, context: grpc.aio.ServicerContext
    ) -> tuple[trace.Span, otel_context.Context | None]:
        """The SERVER span, child of the caller's context (also returned), not yet current."""
        fields = self._tracing.propagation_fields
        carrier = {}
        for key, value in context.invocation_metadata() or ():
            if key in fields and isinstance(value, str):  # -bin metadata carries no context
                carrier[key] = value
        # No trace context sent: the span is a root (what extracting nothing gives, cheaper).
        parent = self._tracing.extract(carrier) if carrier else None
        span = self._tracing.tracer.start_span(
            self._span_name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={**self._attributes, **_peer_attributes(context.peer())},
        )
        return span, parent

    def _end(
        self,
        span: trace.Span | None,
        code: str,
        context: grpc.aio.ServicerContext,
        began: float,
    ) -> None:
        elapsed = time.perf_counter() - began
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", GRPC_CODES.get(code, 2))
            if code in SERVER_ERROR_CODES:
                span.set_attribute("error.type", code)
                span.set_status(Status(StatusCode.ERROR, f"{code}: {_details(context)}"))
            span.end()
        metrics = self._metrics
        if metrics is not None:
            self._in_flight.dec()
            handled = self._handled.get(code)
            if handled is None:
                handled = self._handled[code] = metrics.handled.labels(
                    self._service, self._method, code
                )
            handled.inc()
            self._seconds.observe(elapsed)
            if self._total is not None:
                self._total.observe(elapsed)


def _code_name(code: Any) -> str | None:
    """`grpc.StatusCode.X` (or its number) as `X`; None when no code was set."""
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return str(status.name)
    return "UNKNOWN"


def _cancel_code(context: grpc.aio.ServicerContext) -> str:
    remaining = context.time_remaining()
    return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"


def _details(context: grpc.aio.ServicerContext) -> str:
    try:
        return str(context.details() or "")
    except Exception:  # not every grpcio has details() on the aio context
        return ""


@functools.lru_cache(maxsize=1024)
def _peer_attributes(peer: str | None) -> Mapping[str, Any]:
    """`ipv4:10.0.0.1:5000` / `ipv6:[::1]:5000` as network.peer.address and .port (cached: a
    connection's calls share its peer; read only)."""
    if not peer or ":" not in peer:
        return {}
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {"network.transport": "unix"} if kind == "unix" else {}
    address, _, port = rest.split(",")[0].rpartition(":")
    attributes: dict[str, Any] = {"network.peer.address": address.strip("[]")}
    if port.isdigit():
        attributes["network.peer.port"] = int(port)
    return attributes
