"""Prometheus metrics of the front server, served over HTTP at `/metrics` on `metrics_port`.

Every app has its own registry (the tests run several apps in one process); nothing is
registered in prometheus_client's global one. Label values are bounded: gRPC service, method
and status names, stage names, and the configured encoder models.

| metric | type | labels |
|---|---|---|
| `voicegate_grpc_server_handled_total` | counter | grpc_service, grpc_method, grpc_code |
| `voicegate_grpc_server_handling_seconds` | histogram | grpc_service, grpc_method |
| `voicegate_grpc_server_in_flight` | gauge | grpc_service, grpc_method |
| `voicegate_stage_seconds` | histogram | grpc_method, stage (see below) |
| `voicegate_audio_seconds_total` | counter | grpc_method, kind (decoded, speech) |
| `voicegate_triton_requests_total` | counter | model, grpc_code |
| `voicegate_triton_errors_total` | counter | model, grpc_code |
| `voicegate_triton_request_seconds` | histogram | model |
| `voicegate_triton_batch_size` | histogram | model (partials per request we send) |
| `voicegate_admission_in_flight` | gauge | (work calls admitted and not finished) |
| `voicegate_admission_in_flight_bytes` | gauge | (their serialized request bytes) |
| `voicegate_admission_limit` | gauge | bound (requests, bytes) |
| `voicegate_admission_refused_total` | counter | grpc_method, reason (requests, bytes) |
| `voicegate_triton_retries_total` | counter | model, grpc_code (of the failed attempt) |
| `voicegate_streaming_embed_sessions` | gauge | (StreamingEmbed calls open) |
| `voicegate_streaming_embed_held_bytes` | gauge | (audio and features they hold) |
| `voicegate_vad_streams` | gauge | (StreamingDetectSpeech calls open) |
| `voicegate_build_info` | gauge | version |

Stages: decode, trim, features, mfcc, triton (one utterance, all its Triton requests), fusion,
vad (VoiceActivityService: Silero VAD in Triton and segmentation), and total (the whole RPC);
plus prometheus_client's `process_*` and `python_*` collectors.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from server import __version__

NAMESPACE = "voicegate"
RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The front server's metrics in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        Gauge(
            "build_info", "voicegate version", ["version"], namespace=NAMESPACE, registry=r
        ).labels(__version__).set(1)
        rpc = ["grpc_service", "grpc_method"]
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed, by method and gRPC status code",
            [*rpc, "grpc_code"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from receiving an RPC to its status, by method",
            rpc,
            namespace=NAMESPACE,
            registry=r,
            buckets=RPC_BUCKETS,
        )
        self.in_flight = Gauge(
            "grpc_server_in_flight",
            "RPCs being handled now",
            rpc,
            namespace=NAMESPACE,
            registry=r,
        )
        self.stage_seconds = Histogram(
            "stage_seconds",
            "Time in each step of a request: decode, trim, features, mfcc, triton (whole "
            "utterance, all its Triton requests), fusion, total",
            ["grpc_method", "stage"],
            namespace=NAMESPACE,
            registry=r,
            buckets=STAGE_BUCKETS,
        )
        self.audio_seconds = Counter(
            "audio_seconds_total",
            "Seconds of audio processed: decoded (as received) and speech (after trimming)",
            ["grpc_method", "kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.triton_requests = Counter(
            "triton_requests_total",
            "Inference requests sent to Triton, by model and gRPC status code",
            ["model", "grpc_code"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.triton_errors = Counter(
            "triton_errors_total",
            "Triton inference requests that failed, by model and gRPC status code",
            ["model", "grpc_code"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.triton_seconds = Histogram(
            "triton_request_seconds",
            "Round trip of one Triton inference request (queue and batching included)",
            ["model"],
            namespace=NAMESPACE,
            registry=r,
            buckets=STAGE_BUCKETS,
        )
        self.triton_batch = Histogram(
            "triton_batch_size",
            "Partials in one request to Triton (Triton may batch several requests together)",
            ["model"],
            namespace=NAMESPACE,
            registry=r,
            buckets=BATCH_BUCKETS,
        )
        self.admission_in_flight = Gauge(
            "admission_in_flight",
            "Work calls (Embed, Verify, Enroll, Identify, ...) admitted and not finished",
            namespace=NAMESPACE,
            registry=r,
        )
        self.admission_in_flight_bytes = Gauge(
            "admission_in_flight_bytes",
            "Serialized request bytes of the admitted work calls not finished",
            namespace=NAMESPACE,
            registry=r,
        )
        self.admission_limit = Gauge(
            "admission_limit",
            "Admission bounds: max_inflight_requests and max_inflight_bytes",
            ["bound"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.admission_refused = Counter(
            "admission_refused_total",
            "Work calls refused with RESOURCE_EXHAUSTED at admission, by the bound they hit",
            ["grpc_method", "reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.triton_retries = Counter(
            "triton_retries_total",
            "Triton requests retried, by model and the gRPC status code of the failed attempt",
            ["model", "grpc_code"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.streaming_sessions = Gauge(
            "streaming_embed_sessions",
            "StreamingEmbed calls open now (a cancelled call leaves at once)",
            namespace=NAMESPACE,
            registry=r,
        )
        self.streaming_bytes = Gauge(
            "streaming_embed_held_bytes",
            "Audio and mel features the open StreamingEmbed calls hold (server/streaming_embed.py)",
            namespace=NAMESPACE,
            registry=r,
        )
        self.vad_streams = Gauge(
            "vad_streams",
            "StreamingDetectSpeech calls open now (a cancelled call leaves at once)",
            namespace=NAMESPACE,
            registry=r,
        )
        self._server: Any = None
        self._thread: Any = None

    def observe_stage(self, method: str, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(method, stage).observe(seconds)

    def observe_triton(
        self, model: str, code: str, seconds: float, batch_size: int | None = None
    ) -> None:
        self.triton_requests.labels(model, code).inc()
        if code != "OK":
            self.triton_errors.labels(model, code).inc()
        self.triton_seconds.labels(model).observe(seconds)
        if batch_size is not None:
            self.triton_batch.labels(model).observe(batch_size)

    def serve(self, host: str, port: int) -> int:
        """Serve `/metrics` on host:port from a daemon thread; returns the bound port."""
        if self._server is not None:
            raise RuntimeError("metrics are already served")
        self._server, self._thread = start_http_server(
            port, addr=host.strip("[]") or "0.0.0.0", registry=self.registry
        )
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
