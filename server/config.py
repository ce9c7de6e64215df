"""Settings as one validated object: defaults < `VOICEGATE_*` environment < explicit overrides.

Nothing here parses arguments at import time; the CLI turns its flags into overrides.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from server.errors import ConfigError

ENV_PREFIX = "VOICEGATE_"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every setting of the front server, the embedded Triton and the tools around them."""

    # gRPC front server
    host: str = "[::]"
    port: int = 50051
    grace_seconds: float = 10.0
    max_message_bytes: int = 32 * 1024 * 1024
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

    # Triton: embedded (default) or external at HOST:PORT (its gRPC endpoint)
    triton_url: str | None = None
    model_repository: Path = Path("model_repository")
    state_dir: Path = Path(".voicegate")
    triton_startup_timeout_s: float = 180.0
    triton_timeout_s: float = 30.0
    health_poll_s: float = 1.0

    # Models and preprocessing
    encoder_model: str = "ge2e_int8"
    encoder_models: tuple[str, ...] = ("ge2e_int8", "ge2e_fp32")
    preprocess_workers: int = 2
    min_speech_seconds: float = 0.5
    max_audio_seconds: float = 600.0
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
        _require(self.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024")
        _require(self.triton_timeout_s > 0, "triton_timeout_s", "must be > 0")
        _require(self.triton_startup_timeout_s > 0, "triton_startup_timeout_s", "must be > 0")
        _require(self.health_poll_s > 0, "health_poll_s", "must be > 0")
        _require(self.preprocess_workers >= 1, "preprocess_workers", "must be >= 1")
        _require(self.min_speech_seconds > 0, "min_speech_seconds", "must be > 0")
        _require(
            self.max_audio_seconds > self.min_speech_seconds,
            "max_audio_seconds",
            "must exceed min_speech_seconds",
        )
        _require(
            self.encoder_model in self.encoder_models,
            "encoder_model",
            f"must be one of encoder_models {list(self.encoder_models)}",
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
