"""Admission control: a bound on the work in flight, beyond which calls are refused at once.

Every call of a work RPC (the API's methods that decode audio or run a model: Embed, Verify,
Enroll, Identify and any added later; not the cheap speaker look-ups, health or reflection)
takes a slot for as long as its handler runs. With `max_inflight_requests` slots taken, or
`max_inflight_bytes` of serialized requests held by the calls in flight, a new call gets
RESOURCE_EXHAUSTED before any work is done, instead of waiting in a queue that only grows
(with its memory and every caller's latency). A call larger than the byte bound alone is still
admitted when nothing else is in flight, so no valid request is refused forever.

A call that ends early (its client cancelled it, or its deadline passed: grpc.aio then cancels
the handler's task) frees its slot at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from server.config import Settings
from server.errors import Overloaded
from server.grpc_errors import HandlerCache, abort_with, method_info, rewrap_handler
from server.metrics import Metrics

log = logging.getLogger(__name__)

_LOG_INTERVAL_S = 10.0
# The size of the request message the current call received, as it came off the wire: set by
# the deserializer (grpc.aio runs it in the call's task, right before the handler), so that
# admission needs no second serialization of the request (ByteSize() walks the whole message).
_REQUEST_BYTES: ContextVar[int] = ContextVar("voicegate_request_bytes", default=0)


class Admission:
    """Counts the admitted work calls and their request bytes (event-loop only, no locks)."""

    def __init__(self, max_requests: int, max_bytes: int, metrics: Metrics | None = None) -> None:
        if max_requests < 1 or max_bytes < 1:
            raise ValueError("admission bounds must be >= 1")
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.in_flight = 0
        self.in_flight_bytes = 0
        self._metrics = metrics
        self._refused_since_log = 0
        self._last_log = -_LOG_INTERVAL_S
        if metrics is not None:
            metrics.admission_limit.labels("requests").set(max_requests)
            metrics.admission_limit.labels("bytes").set(max_bytes)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Admission:
        return cls(settings.max_inflight_requests, settings.max_inflight_bytes, metrics)

    def try_acquire(self, size: int) -> str | None:
        """Take a slot for a call of `size` request bytes; the bound hit when refused, or None."""
        if self.in_flight >= self.max_requests:
            return "requests"
        if self.in_flight and self.in_flight_bytes + size > self.max_bytes:
            return "bytes"
        self.in_flight += 1
        self.in_flight_bytes += size
        self._publish()
        return None

    def release(self, size: int) -> None:
        self.in_flight -= 1
        self.in_flight_bytes -= size
        self._publish()

    def overloaded(self, method: str, reason: str) -> Overloaded:
        """Count a refusal (metric, a warning at most every 10 s) and return its error."""
        self._refused_since_log += 1
        if self._metrics is not None:
            self._metrics.admission_refused.labels(method, reason).inc()
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL_S:
            log.warning(
                "overloaded: refused %d call(s) since the last report (%d/%d calls, "
                "%d/%d request bytes in flight)",
                self._refused_since_log,
                self.in_flight,
                self.max_requests,
                self.in_flight_bytes,
                self.max_bytes,
            )
            self._last_log = now
            self._refused_since_log = 0
        if reason == "bytes":
            return Overloaded(
                "server overloaded: too much request data in flight; retry with backoff"
            )
        return Overloaded("server overloaded: too many calls in flight; retry with backoff")

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.admission_in_flight.set(self.in_flight)
            self._metrics.admission_in_flight_bytes.set(self.in_flight_bytes)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Refuses work calls beyond the admission bounds with RESOURCE_EXHAUSTED, at once.

    Install it after the telemetry and token interceptors (refusals are then counted with their
    status code, and a call without a valid token never takes a slot) and before the error
    mapping.

    A call's bytes are those of its request message as received; a call with a request stream
    (StreamingEmbed) counts as a slot only.
    """

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._handlers = HandlerCache(self._wrap)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        full = str(handler_call_details.method)
        if handler is None or not method_info(full).is_work:
            return handler
        return self._handlers.get(full, handler)

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        method = method_info(full_method).method
        one_request = handler.unary_unary is not None or handler.unary_stream is not None
        return rewrap_handler(
            handler,
            wrap_unary=lambda behavior: self._wrap_unary(behavior, method, one_request),
            wrap_stream=lambda behavior: self._wrap_stream(behavior, method, one_request),
            request_deserializer=_measuring(handler.request_deserializer) if one_request else None,
        )

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str, reason: str) -> None:
        error = self._admission.overloaded(method, reason)  # logs its own, rate-limited warning
        await abort_with(context, error, method, log_level=logging.DEBUG)

    def _wrap_unary(
        self, behavior: Callable[..., Any], method: str, one_request: bool
    ) -> Callable[..., Any]:
        admission = self._admission

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            size = _REQUEST_BYTES.get() if one_request else 0
            refusal = admission.try_acquire(size)
            if refusal is not None:
                await self._refuse(context, method, refusal)
            try:
                return await behavior(request, context)
            finally:
                admission.release(size)

        return wrapped

    def _wrap_stream(
        self, behavior: Callable[..., Any], method: str, one_request: bool
    ) -> Callable[..., Any]:
        admission = self._admission

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            size = _REQUEST_BYTES.get() if one_request else 0
            refusal = admission.try_acquire(size)
            if refusal is not None:
                await self._refuse(context, method, refusal)
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                admission.release(size)

        return wrapped


def _measuring(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """`deserialize` that also notes the size of the serialized request (_REQUEST_BYTES)."""

    def measured(raw: bytes) -> Any:
        _REQUEST_BYTES.set(len(raw))
        return raw if deserialize is None else deserialize(raw)

    return measured


__all__ = ["Admission", "AdmissionInterceptor"]
