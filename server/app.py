"""Assembles the running service: Triton (embedded or external), the core, the gRPC server.

`create_server` builds the gRPC server on any port (tests bind port 0); `VoicegateApp` owns
the lifecycle; `serve` runs it until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.admission import Admission, AdmissionInterceptor
from server.api.voicegate.v1 import speaker_pb2, speaker_pb2_grpc, vad_pb2, vad_pb2_grpc
from server.config import Settings
from server.core import SpeakerCore
from server.fusion import Calibration
from server.grpc_errors import ErrorMappingInterceptor
from server.grpc_telemetry import TelemetryInterceptor
from server.health_service import DrainingHealthServicer
from server.metrics import Metrics
from server.security import TokenAuthInterceptor, server_credentials
from server.servicer import SpeakerServicer
from server.speakers import SpeakerDirectory
from server.telemetry import Telemetry, Tracing
from server.triton_client import TritonEncoder
from server.triton_process import EmbeddedTriton
from server.vad_core import VoiceActivityCore
from server.vad_model import TritonVad
from server.vad_servicer import VoiceActivityServicer

log = logging.getLogger(__name__)

SPEAKER_SERVICE = speaker_pb2.DESCRIPTOR.services_by_name["SpeakerService"].full_name
VAD_SERVICE = vad_pb2.DESCRIPTOR.services_by_name["VoiceActivityService"].full_name
SERVICE_NAMES = (SPEAKER_SERVICE, VAD_SERVICE)
# Liveness, for orchestrators: SERVING from start to shutdown whatever Triton's state, so a
# Triton outage takes replicas out of rotation (readiness) without restarting them.
LIVENESS_SERVICE = "voicegate.liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def create_server(
    settings: Settings,
    core: SpeakerCore,
    health_servicer: health.aio.HealthServicer,
    telemetry: Telemetry,
    directory: SpeakerDirectory,
    admission: Admission,
    vad: VoiceActivityCore,
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server with every service registered, bound to settings.host:port.

    Returns the server (not started) and the bound port, which differs from settings.port
    when that is 0. Every call gets a server span and RPC metrics (the telemetry interceptor
    comes first so it sees the status code the error mapping settles on, and the refusals of
    the token check that follows it). TLS (mutual with a client CA) and bearer tokens as the
    settings say; their files are read here, once. Work calls beyond the `admission` bounds
    get RESOURCE_EXHAUSTED at once.
    """
    auth = TokenAuthInterceptor.from_settings(settings)  # reads the token file, once
    credentials = server_credentials(settings)  # reads the TLS files, once
    # Outermost first: telemetry (it records the refusals of what follows), token check,
    # admission (no slot for a refused token), error mapping.
    interceptors: list[grpc.aio.ServerInterceptor] = [
        TelemetryInterceptor(telemetry),
        *([auth] if auth is not None else []),
        AdmissionInterceptor(admission),
        ErrorMappingInterceptor(),
    ]
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    speaker_pb2_grpc.add_SpeakerServiceServicer_to_server(SpeakerServicer(core, directory), server)
    vad_pb2_grpc.add_VoiceActivityServiceServicer_to_server(VoiceActivityServicer(vad), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.host}:{settings.port}"
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC port {settings.host}:{settings.port}")
    return server, port


class VoicegateApp:
    """The whole service. Use `async with VoicegateApp(settings) as app:`.

    `tracing` (tests) replaces the tracing built from the `OTEL_*` environment; the app then
    leaves its shutdown to the caller. Metrics live in a registry of the app's own.
    """

    def __init__(self, settings: Settings, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.port = 0
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self.tracing = tracing
        self._owns_tracing = tracing is None
        self.health = DrainingHealthServicer()
        self.admission = Admission.from_settings(settings, self.metrics)
        self.triton: EmbeddedTriton | None = None
        self._executor = ThreadPoolExecutor(
            settings.preprocess_workers, thread_name_prefix="preprocess"
        )
        self._encoder: TritonEncoder | None = None
        self.vad: VoiceActivityCore | None = None  # VoiceActivityService's core
        self.core: SpeakerCore | None = None  # SpeakerService's core
        self.speakers: SpeakerDirectory | None = None
        self._server: grpc.aio.Server | None = None
        self._monitor: asyncio.Task[None] | None = None

    async def __aenter__(self) -> VoicegateApp:
        try:
            await self.start()
        except BaseException:
            await self.stop(grace=0)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def triton_url(self) -> str:
        if self.triton is not None:
            return self.triton.grpc_url
        assert self.settings.triton_url is not None
        return self.settings.triton_url

    async def start(self) -> None:
        """Serve health at once (NOT_SERVING), then bring up Triton and turn SERVING."""
        settings = self.settings
        await self._set_health(NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, SERVING)
        tracing = self.tracing = self.tracing or Tracing.from_environment(
            span_export=settings.span_export
        )
        telemetry = Telemetry(tracing, self.metrics)
        if settings.metrics_port:
            self._serve_metrics()
        if settings.embedded_triton:
            self.triton = EmbeddedTriton(
                settings,
                models=list(settings.triton_models),
                extra_args=tracing.triton_trace_args(settings.triton_trace_rate),
            )
        calibration = Calibration.load(settings.calibration_file, settings.trim)
        if calibration.trim != settings.trim:
            log.warning(
                "the calibration file was fitted with trim=%s but the server trims with %s: "
                "Verify's threshold may not hold (refit with `voicegate calibrate --trim %s`)",
                calibration.trim,
                settings.trim,
                settings.trim,
            )
        self._encoder = TritonEncoder(
            self.triton_url,  # the embedded Triton's ports are chosen when it is made
            timeout_s=settings.triton_timeout_s,
            telemetry=telemetry,
            retries=settings.triton_retries,
            retry_base_s=settings.triton_retry_base_s,
        )
        vad_model = TritonVad(self._encoder, settings.vad_model)
        # trim="vad": Embed, Verify, Enroll, Identify and StreamingEmbed trim with the VAD too
        self.core = SpeakerCore(
            settings, self._encoder, calibration, self._executor, telemetry, vad=vad_model
        )
        core = self.core
        self.vad = VoiceActivityCore(settings, vad_model, self._executor, telemetry)
        self.speakers = await SpeakerDirectory.open(settings, core, self._encoder.model_version)
        self._server, self.port = create_server(
            settings, core, self.health, telemetry, self.speakers, self.admission, self.vad
        )
        await self._server.start()
        if self.triton is not None:
            # Triton may move to other ports (taken meanwhile, or at a restart): the client
            # follows it.
            self.triton.on_url_change(self._encoder.set_url)
            await self.triton.start()
        await core.warm_up()
        ready = await self._encoder.is_ready(settings.triton_models)
        if ready:
            await self._set_health(SERVING)
        else:
            log.warning("Triton at %s is not ready yet; health stays NOT_SERVING", self.triton_url)
        self._monitor = asyncio.create_task(
            self._watch_backend(True if ready else None), name="health-monitor"
        )
        log.info(
            "voicegate ready: gRPC on port %d (%s, %s), metrics %s, Triton at %s (%s), "
            "encoders %s, VAD %s, traces %s",
            self.port,
            ("mutual TLS" if settings.tls_client_ca_file else "TLS")
            if settings.tls
            else "plaintext",
            "bearer tokens required" if settings.auth_tokens_file else "no authentication",
            f"on port {self.metrics_port} (/metrics)" if self.metrics_port else "off",
            self.triton_url,
            f"embedded, its metrics at http://127.0.0.1:{self.triton.metrics_port}/metrics"
            if self.triton
            else "external",
            ", ".join(settings.encoder_models),
            settings.vad_model,
            f"to {tracing.traces_endpoint}" if tracing.exporting else "not exported",
        )

    def _serve_metrics(self) -> None:
        """Prometheus /metrics on host:metrics_port. A port taken is a warning, not a failure:
        inference should not stop for want of a metrics endpoint (the scrape target shows down).
        """
        host = self.settings.host
        try:
            self.metrics_port = self.metrics.serve(host, self.settings.metrics_port)
        except OSError as exc:
            log.warning(
                "metrics not served: cannot bind %s:%d (%s); set metrics_port "
                "(VOICEGATE_METRICS_PORT) to a free port, or 0 to turn them off",
                host,
                self.settings.metrics_port,
                exc,
            )

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, let in-flight calls finish within `grace`, then stop Triton.

        Health turns NOT_SERVING for good (health watchers get it and their streams end), the
        server stops accepting calls (new ones fail UNAVAILABLE), the calls in flight get up to
        `grace` seconds to finish (then they are cancelled), and only then Triton stops.
        """
        grace = self.settings.grace_seconds if grace is None else grace
        if self._monitor is not None:  # first: it must not set SERVING again meanwhile
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        await self.health.enter_graceful_shutdown()  # liveness too; later set() is ignored
        if self._server is not None:
            if self.admission.in_flight:
                log.info("draining %d call(s) in flight", self.admission.in_flight)
            await self._server.stop(grace)
            self._server = None
        if self.speakers is not None:
            await self.speakers.close()
            self.speakers = None
        if self._encoder is not None:
            await self._encoder.close()
            self._encoder = None
        if self.triton is not None:
            await self.triton.stop()
        self._executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.metrics.close)  # joins the HTTP server's thread
        self.metrics_port = None
        if self._owns_tracing and self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # flushes spans still queued
            self.tracing = None

    async def _watch_backend(self, serving: bool | None) -> None:
        """Follow Triton's readiness with the health status; `serving`: the status start()
        set from its own probe (None: not SERVING yet, and no outage to report)."""
        assert self._encoder is not None
        misses = 0
        while True:
            await asyncio.sleep(self.settings.health_poll_s)
            ready = await self._encoder.is_ready(self.settings.triton_models)
            misses = 0 if ready else misses + 1
            # One slow probe on a loaded machine is no outage: NOT_SERVING after two misses
            # in a row, or at once when our own Triton process is known to be down.
            down = misses >= 2 or (self.triton is not None and not self.triton.is_ready())
            if (ready or down) and ready != serving:
                if serving is not None:
                    log.warning("Triton %s", "ready again" if ready else "not ready")
                await self._set_health(SERVING if ready else NOT_SERVING)
                serving = ready

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for service in ("", *SERVICE_NAMES):
            await self.health.set(service, status)


async def serve(settings: Settings) -> None:
    """Run the service until SIGTERM or SIGINT, then shut down cleanly."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    app = VoicegateApp(settings)
    starting = asyncio.create_task(app.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    try:
        if starting.done():
            starting.result()
            await stopping
        else:
            log.info("stop requested during start-up")
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
    finally:
        stopping.cancel()
        log.info("shutting down: draining calls for up to %.0f s", settings.grace_seconds)
        await app.stop()
        log.info("voicegate stopped")
