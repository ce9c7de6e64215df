"""Tracing with OpenTelemetry, configured by the standard `OTEL_*` variables, and its helpers.

`Tracing` owns one SDK `TracerProvider` (never the process-global one, so several apps in one
process, as in the tests, each have their own and nothing warns about a provider set twice).
It is injectable: tests build `Tracing(provider)` around their own provider, or
`Tracing.from_environment(environ)` with a mapping of their own.

`Telemetry` is what the code under instrumentation sees: a `Tracing` plus the app's Prometheus
`Metrics` (or none). It knows nothing of gRPC (the server interceptor lives in
`server.grpc_telemetry`); spans carry no audio bytes and no embeddings, only sizes, durations,
counts, model names and versions.

Variables read (all optional):

- `OTEL_SDK_DISABLED=true`: no SDK at all; spans are no-ops and no context is forwarded.
- `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (plus
  `/v1/traces`): where spans go, over OTLP/HTTP (protobuf). Unset: spans are made (trace ids in
  the logs) but exported nowhere. `OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`, `..._COMPRESSION`,
  `..._CERTIFICATE` are read by the exporter itself.
- `OTEL_TRACES_EXPORTER`: `otlp` (default), `console` or `none`.
- `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`: as the specification; the default is
  `parentbased_always_on` (a caller's sampling decision is kept).
- `OTEL_SERVICE_NAME` (default `voicegate`), `OTEL_RESOURCE_ATTRIBUTES`.
- `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`,
  `OTEL_BSP_EXPORT_TIMEOUT`: the batch span processor (the schedule delay also goes to Triton).
- `OTEL_PROPAGATORS`: W3C `tracecontext,baggage` by default.

How the spans are exported is our own setting, `VOICEGATE_SPAN_EXPORT` (`Settings.span_export`):
`native` (default, fastotel: encoded and sent off the GIL) or `sdk` (the SDK's Python exporter).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import Token
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server import __version__
from server.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.util.types import AttributeValue

    from server.metrics import Metrics

DEFAULT_SERVICE_NAME = "voicegate"
INSTRUMENTATION_NAME = "voicegate"

# The gRPC method being served, for metric labels recorded far from the interceptor (stages run
# in worker threads; the context is copied into them). "none" outside an RPC.
RPC_METHOD: contextvars.ContextVar[str] = contextvars.ContextVar(
    "voicegate_rpc_method", default="none"
)

# Span attributes of our own (OpenTelemetry semantic conventions are used where one exists).
ATTR_AUDIO_FIELD = "voicegate.audio.field"  # reference | probe | audio[i]
ATTR_AUDIO_SOURCE = "voicegate.audio.source"  # content | raw
ATTR_AUDIO_BYTES = "voicegate.audio.bytes"
ATTR_AUDIO_SECONDS = "voicegate.audio.seconds"
ATTR_SPEECH_SECONDS = "voicegate.speech.seconds"
ATTR_PARTIAL_COUNT = "voicegate.partial.count"
ATTR_MODEL = "voicegate.model"
ATTR_TRITON_MODEL = "voicegate.triton.model.name"
ATTR_TRITON_VERSION = "voicegate.triton.model.version"
ATTR_TRITON_BATCH = "voicegate.triton.batch_size"


def field_attributes(field: str) -> dict[str, AttributeValue]:
    """A stage's span attributes that name the request's audio field: only where a call has
    several (Verify's `reference` and `probe`, Enroll's `audio[i]`). A call's lone `audio`
    needs no name, and every attribute costs each span that carries it."""
    return {} if field == "audio" else {ATTR_AUDIO_FIELD: field}


# gRPC status names and numbers (rpc.grpc.status_code), without importing grpc here.
_GRPC_CODE_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
GRPC_CODES = {name: number for number, name in enumerate(_GRPC_CODE_NAMES)}
# Codes that mark a *server* span as failed (OpenTelemetry RPC conventions); a client span
# fails on any code but OK.
SERVER_ERROR_CODES = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
TRITON_RPC_SERVICE = "inference.GRPCInferenceService"
TRITON_INFER_METHOD = "ModelInfer"
TRITON_CALL_SPAN = f"{TRITON_RPC_SERVICE}/{TRITON_INFER_METHOD}"

_TRUE = {"1", "true", "yes", "on"}
_W3C = TraceContextTextMapPropagator()


class Tracing:
    """One tracer provider, its tracer and the context propagator.

    `Tracing(provider)` uses a provider someone else configured (tests; pass `traces_endpoint`
    when it exports over OTLP/HTTP, so that the embedded Triton exports there too);
    `from_environment` builds one from the `OTEL_*` variables; `Tracing.disabled()` traces
    nothing.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        traces_endpoint: str | None = None,
        service_name: str = DEFAULT_SERVICE_NAME,
        schedule_delay_ms: int | None = None,
        owns_provider: bool = False,
    ) -> None:
        self.enabled = tracer_provider is not None and not isinstance(
            tracer_provider, trace.NoOpTracerProvider
        )
        self.provider = tracer_provider
        self.tracer: trace.Tracer = (
            tracer_provider.get_tracer(INSTRUMENTATION_NAME, __version__)
            if tracer_provider is not None and self.enabled
            else trace.NoOpTracer()
        )
        self.traces_endpoint = traces_endpoint
        self.service_name = service_name
        self.schedule_delay_ms = schedule_delay_ms
        self._owns_provider = owns_provider
        self._propagator: TextMapPropagator | None = None
        # The metadata keys the propagators read (traceparent, tracestate, baggage by default).
        self.propagation_fields: frozenset[str] = frozenset()
        if self.enabled:
            from opentelemetry import propagate

            self._propagator = propagate.get_global_textmap()
            self.propagation_fields = frozenset(self._propagator.fields)

    @classmethod
    def disabled(cls) -> Tracing:
        return cls(None)

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, *, span_export: str = "native"
    ) -> Tracing:
        """A provider as the `OTEL_*` variables in `environ` (default: os.environ) describe;
        `span_export` (`Settings.span_export`) picks how spans leave over OTLP: `native` or
        `sdk` (`_otlp_processor`)."""
        import os

        env = os.environ if environ is None else environ
        if _get(env, "OTEL_SDK_DISABLED").lower() in _TRUE:
            return cls.disabled()
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider

        attributes: dict[str, str] = {SERVICE_VERSION: __version__}
        attributes.update(_resource_attributes(_get(env, "OTEL_RESOURCE_ATTRIBUTES")))
        service = _get(env, "OTEL_SERVICE_NAME") or attributes.get(SERVICE_NAME) or ""
        attributes[SERVICE_NAME] = service or DEFAULT_SERVICE_NAME
        resource = _hash_once(Resource.create(attributes))
        provider = TracerProvider(resource=resource, sampler=_sampler(env))

        exporters = [e.strip() for e in (_get(env, "OTEL_TRACES_EXPORTER") or "otlp").split(",")]
        endpoint: str | None = None
        bsp = _batch_options(env)
        for name in filter(None, exporters):
            if name == "none":
                continue
            if name == "console":
                from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

                provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
            elif name == "otlp":
                endpoint = _traces_endpoint(env)
                if endpoint is not None:
                    provider.add_span_processor(_otlp_processor(endpoint, bsp, span_export))
            else:
                raise ConfigError(
                    f"OTEL_TRACES_EXPORTER {name!r} is not supported: use otlp, console or none"
                )
        return cls(
            provider,
            traces_endpoint=endpoint,
            service_name=attributes[SERVICE_NAME],
            schedule_delay_ms=bsp.get("schedule_delay_millis"),
            owns_provider=True,
        )

    @property
    def exporting(self) -> bool:
        """True when spans leave the process over OTLP."""
        return self.enabled and self.traces_endpoint is not None

    def extract(self, carrier: Mapping[str, str]) -> Context | None:
        """The caller's context (W3C `traceparent`, baggage) from request metadata."""
        if self._propagator is None:
            return None
        return self._propagator.extract(carrier)

    def trace_headers(self, context: Context) -> dict[str, str]:
        """The W3C trace context (`traceparent`, `tracestate`) of `context`'s span, as metadata
        for a Triton request; empty when that span is not sampled.

        W3C only, whatever `OTEL_PROPAGATORS` says: it is all Triton reads. An unsampled context
        is not forwarded: Triton traces every request that carries one, whatever its sampled
        flag says.
        """
        carrier: dict[str, str] = {}
        if self.enabled and trace.get_current_span(context).get_span_context().trace_flags.sampled:
            _W3C.inject(carrier, context)
        return carrier

    @property
    def samples_everything(self) -> bool:
        """Whether every request without an unsampled parent is sampled (`always_on`,
        `parentbased_always_on`): then Triton may simply trace every request too."""
        sampler = getattr(self.provider, "sampler", None)
        if not self.enabled or sampler is None:
            return False
        description = str(sampler.get_description())
        return description.startswith(("AlwaysOnSampler", "ParentBased{root:AlwaysOnSampler"))

    def triton_trace_args(self, rate: int | None = None) -> list[str]:
        """`tritonserver` flags that export Triton's spans to our OTLP/HTTP endpoint.

        Triton's spans (`InferRequest` -> model -> `compute`) become children of our
        Triton-call span through the `traceparent` we send. `rate` (None: automatic):

        - `0`: Triton traces only requests that carry a propagated context, that is the ones
          this server sampled. Right for sampling below 100 %, but Triton 2.51 loses the context
          of some requests at random (measured: 7-12 % sequentially, 15-45 % of concurrent
          requests that it batches together), and those then go untraced.
        - `1`: Triton traces every request. The automatic choice when we sample everything
          (`samples_everything`): the same requests are traced, and a request whose context
          Triton loses (0-13 % measured) still shows up, as a trace of its own.

        Empty when we export nothing.
        """
        if not self.exporting:
            return []
        if rate is None:
            rate = 1 if self.samples_everything else 0
        args = [
            "--trace-config=mode=opentelemetry",
            "--trace-config=level=TIMESTAMPS",
            f"--trace-config=rate={rate}",
            "--trace-config=count=-1",
            f"--trace-config=opentelemetry,url={self.traces_endpoint}",
            f"--trace-config=opentelemetry,resource=service.name={self.service_name}-triton",
        ]
        if self.schedule_delay_ms is not None:
            args.append(f"--trace-config=opentelemetry,bsp_schedule_delay={self.schedule_delay_ms}")
        return args

    def shutdown(self) -> None:
        """Flush and stop a provider built here (an injected one belongs to its owner)."""
        if self._owns_provider and self.provider is not None:
            shutdown = getattr(self.provider, "shutdown", None)
            if shutdown is not None:
                shutdown()


@dataclass(frozen=True)
class Telemetry:
    """Tracing plus metrics, as the core and the Triton client use them."""

    tracing: Tracing
    metrics: Metrics | None = None

    def stage(
        self, name: str, attributes: Mapping[str, AttributeValue] | None = None
    ) -> AbstractContextManager[trace.Span]:
        """A child span `name` and its duration in `voicegate_stage_seconds{stage=name}`.

        An exception leaving the block is recorded on the span, whose status becomes ERROR.
        Works in worker threads when the caller's context was copied into them.
        """
        return _Stage(self, name, attributes)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """A stage measured in the metrics only (its spans are made elsewhere)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.metrics is not None:
                self.metrics.observe_stage(RPC_METHOD.get(), name, time.perf_counter() - start)

    def count_audio(self, kind: str, seconds: float) -> None:
        """Audio processed: `decoded` (as received, at 16 kHz) or `speech` (after trimming)."""
        if self.metrics is not None:
            self.metrics.audio_seconds.labels(RPC_METHOD.get(), kind).inc(seconds)

    @staticmethod
    def annotate(attributes: Mapping[str, AttributeValue]) -> None:
        """Set attributes on the current span (the RPC's server span in the core)."""
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes(attributes)

    def triton_call(
        self,
        model: str,
        url: str,
        batch_size: int | None,
        headers: Mapping[str, str] | None = None,
    ) -> TritonCall:
        """One Triton inference request: a CLIENT span, the metadata to send, the metrics.

        Use it as `with telemetry.triton_call(...) as call:`. The call's `headers` hold
        `headers` plus the span's `traceparent`, keys in lower case (as gRPC metadata needs);
        mark the outcome with `call.fail(code)` or `call.model_version = ...`.
        """
        return TritonCall(self, model, url, batch_size, headers)


class _Stage:
    """The context manager of `Telemetry.stage` (a class: cheaper than a generator)."""

    __slots__ = ("_attributes", "_metrics", "_name", "_span", "_start", "_token", "_tracing")

    def __init__(
        self, telemetry: Telemetry, name: str, attributes: Mapping[str, AttributeValue] | None
    ) -> None:
        self._tracing = telemetry.tracing
        self._metrics = telemetry.metrics
        self._name = name
        self._attributes = attributes
        self._span: trace.Span = trace.INVALID_SPAN
        self._token: Token[otel_context.Context] | None = None
        self._start = 0.0

    def __enter__(self) -> trace.Span:
        self._start = time.perf_counter()
        if self._tracing.enabled:  # tracing off: no span, no context to switch
            self._span = self._tracing.tracer.start_span(self._name, attributes=self._attributes)
            self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._token is not None:
            otel_context.detach(self._token)
            _end(self._span, exc)
        if self._metrics is not None:
            elapsed = time.perf_counter() - self._start
            self._metrics.observe_stage(RPC_METHOD.get(), self._name, elapsed)


class TritonCall:
    """One Triton request (`Telemetry.triton_call`): its span while the `with` block runs, the
    metadata to send, and its outcome, filled in by the caller."""

    __slots__ = (
        "_batch_size",
        "_model",
        "_start",
        "_telemetry",
        "_token",
        "_url",
        "code",
        "headers",
        "model_version",
        "span",
    )

    def __init__(
        self,
        telemetry: Telemetry,
        model: str,
        url: str,
        batch_size: int | None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._telemetry = telemetry
        self._model = model
        self._url = url
        self._batch_size = batch_size
        self._token: Token[otel_context.Context] | None = None
        self._start = 0.0
        self.span: trace.Span = trace.INVALID_SPAN
        self.headers: dict[str, str] = {k.lower(): v for k, v in headers.items()} if headers else {}
        self.code = "OK"
        self.model_version = ""

    def fail(self, code: str) -> None:
        self.code = code if code in GRPC_CODES else "UNKNOWN"

    def __enter__(self) -> TritonCall:
        self._start = time.perf_counter()
        tracing = self._telemetry.tracing
        if tracing.enabled:
            attributes = _triton_attributes(self._model, self._url, self._batch_size)
            span = self.span = tracing.tracer.start_span(
                TRITON_CALL_SPAN, kind=SpanKind.CLIENT, attributes=attributes
            )
            context = trace.set_span_in_context(span)
            self._token = otel_context.attach(context)
            # Before the caller's headers, which win (as before: caller metadata is kept).
            self.headers = {**tracing.trace_headers(context), **self.headers}
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None and self.code == "OK":
            self.fail("CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN")
        if self._token is not None:
            otel_context.detach(self._token)
            self._finish(exc)
        metrics = self._telemetry.metrics
        if metrics is not None:
            elapsed = time.perf_counter() - self._start
            metrics.observe_triton(self._model, self.code, elapsed, self._batch_size)

    def _finish(self, exc: BaseException | None) -> None:
        span = self.span
        if not span.is_recording():
            return
        outcome: dict[str, AttributeValue] = {"rpc.grpc.status_code": GRPC_CODES[self.code]}
        if self.model_version:
            outcome[ATTR_TRITON_VERSION] = self.model_version
        if self.code != "OK":
            outcome["error.type"] = self.code
            span.set_status(Status(StatusCode.ERROR, self.code))
        span.set_attributes(outcome)  # one call: each set_attribute takes the span's lock
        _end(span, exc)


def _end(span: trace.Span, exc: BaseException | None) -> None:
    """End `span`; an Exception that escaped its block is recorded and makes it ERROR (as
    `trace.use_span` does; BaseExceptions such as a cancellation are not errors)."""
    if isinstance(exc, Exception) and span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.end()


@functools.lru_cache(maxsize=1024)
def _triton_attributes(
    model: str, url: str, batch_size: int | None
) -> Mapping[str, AttributeValue]:
    """A Triton call's span attributes (RPC conventions, model, batch size), built once per
    kind of call: a span copies them, so one read-only mapping serves every call."""
    host, _, port = url.rpartition(":")
    attributes: dict[str, AttributeValue] = {
        "rpc.system": "grpc",
        "rpc.service": TRITON_RPC_SERVICE,
        "rpc.method": TRITON_INFER_METHOD,
        "server.address": host.strip("[]"),
        ATTR_TRITON_MODEL: model,
    }
    if port.isdigit():
        attributes["server.port"] = int(port)
    if batch_size is not None:
        attributes[ATTR_TRITON_BATCH] = batch_size
    return attributes


def add_retry_event(attempt: int, reason: str, delay_s: float | None = None) -> None:
    """A `retry` event on the current span: call it before each new attempt of a retry loop."""
    span = trace.get_current_span()
    if span.is_recording():
        attributes: dict[str, AttributeValue] = {"retry.attempt": attempt, "retry.reason": reason}
        if delay_s is not None:
            attributes["retry.delay_s"] = delay_s
        span.add_event("retry", attributes)


def record_error(exc: BaseException) -> None:
    """Record `exc` on the current span (the RPC's server span where errors are mapped)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.record_exception(exc)


DISABLED = Telemetry(Tracing.disabled())


def _hash_once(resource: Any) -> Any:
    """`resource` with its hash computed once.

    The OTLP exporter groups every span it encodes by resource, and `Resource.__hash__`
    serialises the attributes to JSON each time: about 7 us per span, a fifth of the export
    cost. A resource is immutable, so its hash can be kept.
    """
    from opentelemetry.sdk.resources import Resource

    class HashedOnceResource(Resource):
        def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedOnceResource(resource.attributes, resource.schema_url)


# -- configuration from the environment -----------------------------------------------------------


def _get(env: Mapping[str, str], name: str) -> str:
    return (env.get(name) or "").strip()


def _traces_endpoint(env: Mapping[str, str]) -> str | None:
    endpoint = _get(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if not endpoint:
        base = _get(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
        if not base:
            return None
        endpoint = base.rstrip("/") + "/v1/traces"
    protocol = _get(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _get(
        env, "OTEL_EXPORTER_OTLP_PROTOCOL"
    )
    if protocol not in ("", "http/protobuf"):
        raise ConfigError(
            f"OTLP protocol {protocol!r} is not supported: voicegate (and Triton) export traces "
            "over OTLP/HTTP; set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf or leave it unset"
        )
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"OTLP traces endpoint {endpoint!r} must be an http(s):// URL")
    return endpoint


def _otlp_processor(endpoint: str, options: Mapping[str, Any], span_export: str) -> Any:
    """The span processor that batches spans and posts them to `endpoint` as OTLP protobuf.

    `native`: fastotel's `OTLPSpanProcessor`. `on_end` copies the span into Rust; a native
    thread batches, encodes and sends without taking the GIL. The SDK's Python exporter costs
    about 60 us of CPU per span even in a tight loop, fastotel about 6 us, and the SDK's thread
    holds the GIL against the requests while it encodes (benchmarks/span_cost.py).
    `sdk`: the SDK's `BatchSpanProcessor` with its `OTLPSpanExporter`, the reference fastotel's
    requests are tested against; both read the same `OTEL_EXPORTER_OTLP_*` and `OTEL_BSP_*`.
    """
    if span_export == "native":
        try:
            from fastotel import OTLPSpanProcessor
        except ImportError as exc:  # a platform without its wheel, or an install without it
            raise ConfigError(
                f"span_export native needs fastotel ({exc}): install it, or set "
                "VOICEGATE_SPAN_EXPORT=sdk for the OpenTelemetry SDK's exporter"
            ) from None
        return OTLPSpanProcessor(endpoint=endpoint, **options)
    if span_export != "sdk":
        raise ConfigError(f"span_export {span_export!r} is not supported: use native or sdk")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint), **options)


def _batch_options(env: Mapping[str, str]) -> dict[str, int]:
    names = {
        "OTEL_BSP_SCHEDULE_DELAY": "schedule_delay_millis",
        "OTEL_BSP_MAX_QUEUE_SIZE": "max_queue_size",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "max_export_batch_size",
        "OTEL_BSP_EXPORT_TIMEOUT": "export_timeout_millis",
    }
    options = {}
    for variable, option in names.items():
        raw = _get(env, variable)
        if raw:
            try:
                value = int(raw)
            except ValueError:
                raise ConfigError(f"{variable} must be an integer, got {raw!r}") from None
            if value <= 0:
                raise ConfigError(f"{variable} must be > 0, got {value}")
            options[option] = value
    return options


def _resource_attributes(raw: str) -> dict[str, str]:
    attributes = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[unquote(key.strip())] = unquote(value.strip())
    return attributes


def _sampler(env: Mapping[str, str]) -> Sampler:
    from opentelemetry.sdk.trace import sampling

    name = (_get(env, "OTEL_TRACES_SAMPLER") or "parentbased_always_on").lower()
    raw_arg = _get(env, "OTEL_TRACES_SAMPLER_ARG")
    ratio = 1.0
    if name.endswith("traceidratio") and raw_arg:
        try:
            ratio = float(raw_arg)
        except ValueError:
            raise ConfigError(
                f"OTEL_TRACES_SAMPLER_ARG must be a number, got {raw_arg!r}"
            ) from None
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG must be in [0, 1], got {ratio}")
    samplers: dict[str, Sampler] = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }
    if name not in samplers:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER {name!r} is not supported: use one of {sorted(samplers)}"
        )
    return samplers[name]
