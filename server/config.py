"""Settings as one validated object: defaults < `VOICEGATE_*` environment < explicit overrides.

Nothing here parses arguments at import time; the CLI turns its flags into overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from server.errors import ConfigError

if typing.TYPE_CHECKING:
    from server.audio import AudioLimits

ENV_PREFIX = "VOICEGATE_"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of the front server, the embedded Triton and the tools around them."""

    # gRPC front server
    host: str = "[::]"
    port: int = 50051
    grace_seconds: float = 10.0
    # The largest request (and response) message: gRPC itself refuses a larger one with
    # RESOURCE_EXHAUSTED before any of our code runs
    max_message_bytes: int = 32 * 1024 * 1024
    # Admission control of the work RPCs (Embed, Verify, Enroll, Identify, ...): beyond either
    # bound a call is refused at once with RESOURCE_EXHAUSTED instead of queueing. The bytes
    # are the serialized requests of the calls in flight (a larger call is admitted alone).
    max_inflight_requests: int = 8
    max_inflight_bytes: int = 256 * 1024 * 1024
    log_level: str = "INFO"

    # Security: TLS (cert and key, both or neither), mutual TLS (client CA: client certificates
    # required) and bearer tokens (a file of sha256 digests; None: no authentication)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    auth_tokens_file: Path | None = None

    # Observability (tracing itself is configured by the standard OTEL_* variables)
    metrics_port: int = 9464  # Prometheus /metrics on `host`; 0: not served
    log_format: str = "text"  # text | json (trace and span ids on lines inside a request)
    triton_trace_rate: int | None = None  # embedded Triton's trace rate; None: automatic
    # How spans leave over OTLP/HTTP: "native" (fastotel: batched, encoded and sent by a native
    # thread that never takes the GIL) or "sdk" (the SDK's BatchSpanProcessor and its Python
    # exporter: tracing's in-process CPU about 3x native's, benchmarks/span_cost.py)
    span_export: str = "native"

    # Triton: embedded (default) or external at HOST:PORT (its gRPC endpoint)
    triton_url: str | None = None
    model_repository: Path = Path("model_repository")
    state_dir: Path = Path(".voicegate")
    triton_startup_timeout_s: float = 180.0
    triton_timeout_s: float = 30.0
    health_poll_s: float = 1.0
    # Retries of a Triton request that failed UNAVAILABLE (inference is a pure function, so a
    # retry is safe): exponential backoff from the base delay, full jitter, within the deadline
    triton_retries: int = 2
    triton_retry_base_s: float = 0.05

    # Models and preprocessing
    encoder_model: str = "ge2e_int8"
    encoder_models: tuple[str, ...] = ("ge2e_int8", "ge2e_fp32")
    vad_model: str = "silero_vad"  # Silero VAD in Triton (server/vad_model.py)
    preprocess_workers: int = 2
    # Audio limits (`audio_limits`), checked from headers and byte lengths before decoding
    min_speech_seconds: float = 0.5  # after silence trimming
    max_audio_seconds: float = 600.0  # before trimming
    min_sample_rate_hz: int = 8_000
    max_sample_rate_hz: int = 192_000
    max_channels: int = 8
    # Silence trimming of Embed, Verify and the speaker RPCs: "vad" (Silero VAD speech
    # segments, through Triton) or "energy" (40 dB below the recording's loudest 30 ms). "vad"
    # by dev-set EER (benchmarks/trim.py): a tie on clean audio, better on degraded; "energy"
    # costs about half the CPU, and its StreamingEmbed keeps the audio (streaming_embed.py).
    trim: str = "vad"
    # Longest audio one stream (StreamingEmbed, StreamingDetectSpeech) may send; the call fails
    # at once when it is passed. Bounds the memory a stream holds (server/streaming_embed.py)
    max_stream_seconds: float = 1800.0
    calibration_file: Path | None = None

    # Speaker store (enrolled voiceprints): sqlite:///PATH (relative, or sqlite:////ABSOLUTE)
    # or postgresql://... for several replicas; None: sqlite:///<state_dir>/speakers.db
    store_url: str | None = None
    store_pool_size: int = 4

    # Development speech (LibriSpeech) for export checks, calibration and benchmarks
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "port", "must be 0..65535")
        _require(0 <= self.metrics_port <= 65535, "metrics_port", "must be 0..65535 (0: off)")
        _require(
            self.metrics_port == 0 or self.metrics_port != self.port,
            "metrics_port",
            "must differ from port",
        )
        _require(self.log_format in {"text", "json"}, "log_format", "must be text or json")
        _require(
            self.triton_trace_rate is None or self.triton_trace_rate >= 0,
            "triton_trace_rate",
            "must be >= 0 (0: only requests we sampled, 1: every request)",
        )
        _require(self.span_export in {"native", "sdk"}, "span_export", "must be native or sdk")
        _require(
            (self.tls_cert_file is None) == (self.tls_key_file is None),
            "tls_cert_file",
            "and tls_key_file must be set together (both or neither)",
        )
        _require(
            self.tls_client_ca_file is None or self.tls_cert_file is not None,
            "tls_client_ca_file",
            "needs TLS: set tls_cert_file and tls_key_file as well",
        )
        _require(self.grace_seconds >= 0, "grace_seconds", "must be >= 0")
        _require(
            1024 <= self.max_message_bytes <= 2**31 - 1,
            "max_message_bytes",
            "must be 1024..2147483647 (gRPC's limit is a 32-bit integer)",
        )
        _require(self.triton_timeout_s > 0, "triton_timeout_s", "must be > 0")
        _require(self.triton_startup_timeout_s > 0, "triton_startup_timeout_s", "must be > 0")
        _require(self.health_poll_s > 0, "health_poll_s", "must be > 0")
        _require(self.max_inflight_requests >= 1, "max_inflight_requests", "must be >= 1")
        _require(self.max_inflight_bytes >= 1024, "max_inflight_bytes", "must be >= 1024")
        _require(self.triton_retries >= 0, "triton_retries", "must be >= 0")
        _require(self.triton_retry_base_s > 0, "triton_retry_base_s", "must be > 0")
        _require(self.preprocess_workers >= 1, "preprocess_workers", "must be >= 1")
        _require(self.min_speech_seconds > 0, "min_speech_seconds", "must be > 0")
        _require(self.trim in {"energy", "vad"}, "trim", "must be energy or vad")
        _require(
            self.max_stream_seconds > self.min_speech_seconds,
            "max_stream_seconds",
            "must exceed min_speech_seconds",
        )
        _require(
            self.max_audio_seconds > self.min_speech_seconds,
            "max_audio_seconds",
            "must exceed min_speech_seconds",
        )
        _require(
            1_000 <= self.min_sample_rate_hz <= self.max_sample_rate_hz,
            "min_sample_rate_hz",
            "must be >= 1000 and <= max_sample_rate_hz",
        )
        _require(self.max_sample_rate_hz <= 768_000, "max_sample_rate_hz", "must be <= 768000")
        _require(1 <= self.max_channels <= 64, "max_channels", "must be 1..64")
        _require(
            self.encoder_model in self.encoder_models,
            "encoder_model",
            f"must be one of encoder_models {list(self.encoder_models)}",
        )
        _require(
            bool(self.vad_model) and self.vad_model not in self.encoder_models,
            "vad_model",
            "must be a model name other than the encoders'",
        )
        _require(
            self.log_level.upper() in {"DEBUG", "INFO", "WARNING", "ERROR"},
            "log_level",
            "must be DEBUG, INFO, WARNING or ERROR",
        )
        _require(self.store_pool_size >= 1, "store_pool_size", "must be >= 1")
        if self.store_url is not None:
            _require(
                self.store_url.startswith(("sqlite:///", "postgresql://", "postgres://")),
                "store_url",
                "must start with sqlite:/// or postgresql://",
            )
        if self.triton_url is not None:
            host, _, port = self.triton_url.rpartition(":")
            _require(bool(host) and port.isdigit(), "triton_url", "must be HOST:PORT")

    @property
    def triton_models(self) -> tuple[str, ...]:
        """Every Triton model the service uses: the encoders and the VAD (loaded, and required
        ready for SERVING)."""
        return (*self.encoder_models, self.vad_model)

    @functools.cached_property  # a frozen dataclass without slots keeps a __dict__ for it
    def audio_limits(self) -> AudioLimits:
        """The limits a request's audio is held to (decoding and silence trimming)."""
        from server.audio import AudioLimits

        return AudioLimits(
            max_seconds=self.max_audio_seconds,
            min_sample_rate_hz=self.min_sample_rate_hz,
            max_sample_rate_hz=self.max_sample_rate_hz,
            max_channels=self.max_channels,
            min_speech_seconds=self.min_speech_seconds,
        )

    @property
    def speaker_store_url(self) -> str:
        """`store_url`, or the default SQLite file under `state_dir`."""
        return self.store_url or f"sqlite:///{self.state_dir / 'speakers.db'}"

    @property
    def tls(self) -> bool:
        """True when the front server serves TLS (mutual TLS with `tls_client_ca_file`)."""
        return self.tls_cert_file is not None

    @property
    def embedded_triton(self) -> bool:
        """True when the front server starts and owns its own tritonserver process."""
        return self.triton_url is None

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Build settings from defaults, then `VOICEGATE_*` variables, then `overrides`.

        Overrides whose value is None are ignored, so unset CLI flags fall through.
        """
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + field.name.upper())
            if raw is not None and raw != "":
                values[field.name] = _parse(field.name, hints[field.name], raw)
        for name, value in (overrides or {}).items():
            if value is None:
                continue
            if name not in hints:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = _parse(name, hints[name], value) if isinstance(value, str) else value
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"setting {name} (env {ENV_PREFIX}{name.upper()}) {why}")


def _parse(name: str, hint: Any, raw: str) -> Any:
    """Convert one textual value (environment or flag) to the field's type."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(hint)
    if optional:
        if raw.lower() in {"", "none"}:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    parser: Callable[[str], Any]
    if hint is bool:
        parser = _parse_bool
    elif typing.get_origin(hint) is tuple:
        parser = _parse_tuple
    else:
        parser = hint
    try:
        return parser(raw)
    except ValueError as exc:
        raise ConfigError(f"setting {name} (env {ENV_PREFIX}{name.upper()}): {exc}") from None


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {raw!r}")


def _parse_tuple(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())
