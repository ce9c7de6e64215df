"""Calls into Triton over gRPC (tritonclient's asyncio client), with our error mapping.

Transport and model-availability failures become BackendUnavailable, an expired deadline becomes
DeadlineExceeded; their messages are short and safe to show a caller, Triton's own text goes to
the log. Anything else is re-raised unchanged and ends up as INTERNAL.

Requests that fail UNAVAILABLE (no connection, server not ready) or CANCELLED by the server
(Triton stopping) are retried, `retries` times at most, after an exponential backoff with full
jitter, and only while the call's deadline leaves time for another attempt: inference and the
model queries are pure reads, so a repeat is safe. A model that is not ready or not loaded is
not retried (a configuration problem, not a blip). Each retry is a `retry` event on the current
span and counts in `voicegate_triton_retries_total`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Self, TypeVar

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from server.deadlines import deadline_after, time_left
from server.errors import BackendUnavailable, DeadlineExceeded
from server.telemetry import DISABLED, Telemetry, add_retry_event

log = logging.getLogger(__name__)

MELS_INPUT = "mels"
EMBEDDING_OUTPUT = "embedding"
PARTIAL_FRAMES = 160
MEL_BANDS = 40

_INT32_MAX = 2**31 - 1
# tritonclient's defaults (it drops them all once channel_args is given) plus a short reconnect
# backoff. gRPC's own grows 1.6x per failed connect up to 120 s, and calls fail fast meanwhile:
# measured, a server back after a 10-20 s outage got its first call 5-6 s later, 0.2 s with these.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _INT32_MAX),
    ("grpc.max_receive_message_length", _INT32_MAX),
    ("grpc.keepalive_time_ms", _INT32_MAX),
    ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_WARN_INTERVAL_S = 10.0
# A retry is only worth it when at least this much of the deadline is left after its backoff.
_MIN_ATTEMPT_S = 0.05
_RETRY_MAX_S = 1.0  # the longest backoff before a retry
PROBE_TIMEOUT_S = 2.0  # each call of a readiness probe (is_ready)
T = TypeVar("T")
# Words in gRPC's own UNAVAILABLE details that mean "no connection" rather than "model not ready".
_TRANSPORT_WORDS = ("connect", "socket", "connection", "goaway", "broken pipe", "unreachable")


def _status(exc: InferenceServerException) -> str:
    """`StatusCode.UNAVAILABLE` -> `UNAVAILABLE` ('' for client-side errors)."""
    return str(exc.status() or "").rpartition(".")[2]


def map_triton_error(exc: InferenceServerException, model: str | None = None) -> Exception:
    """Our exception for a tritonclient error (the original is returned when nothing fits)."""
    status = _status(exc)
    detail = str(exc.message() or "").lower()
    if status == "DEADLINE_EXCEEDED":
        return DeadlineExceeded("deadline exceeded while waiting for the inference backend")
    if status == "UNAVAILABLE":
        if model is not None and "model" in detail and "connect" not in detail:
            reason = f"model {model!r} is not ready"
        elif any(word in detail for word in _TRANSPORT_WORDS):
            reason = "cannot connect"
        else:
            reason = "server not ready"
    elif status == "NOT_FOUND":
        reason = f"model {model!r} is not loaded" if model else "not found"
    elif status == "CANCELLED":
        reason = "request cancelled by the backend"  # our channel closed or Triton stopping
    else:
        return exc
    return BackendUnavailable(f"inference backend unavailable: {reason}")


class TritonClient:
    """A generic inference client for Triton's gRPC endpoint at `url` (HOST:PORT).

    Each inference request is a CLIENT span (`inference.GRPCInferenceService/ModelInfer`) whose
    context goes to Triton as `traceparent` metadata, so Triton's own spans join the trace.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 30.0,
        telemetry: Telemetry | None = None,
        retries: int = 2,
        retry_base_s: float = 0.05,
    ) -> None:
        self._url = url
        self._retries = retries
        self._retry_base_s = retry_base_s
        self._telemetry = telemetry or DISABLED
        self._timeout_s = timeout_s
        self._client = self._connect(url)
        self._configs: dict[str, Any] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        self._old_clients: list[Any] = []
        self._closed = False
        self._last_warning = -_WARN_INTERVAL_S

    @staticmethod
    def _connect(url: str) -> Any:
        return grpcclient.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)

    @property
    def url(self) -> str:
        return self._url

    def set_url(self, url: str) -> None:
        """Point later calls at `url` (the embedded Triton moved after a restart).

        Calls in flight keep the old channel, which is closed a timeout later: closing it now
        would cancel them.
        """
        if url == self._url or self._closed:
            return
        old = self._client
        self._url = url
        self._client = self._connect(url)
        self._configs.clear()
        self._old_clients.append(old)
        task = asyncio.get_running_loop().create_task(self._close_later(old, self._timeout_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_later(self, client: Any, delay: float) -> None:
        await asyncio.sleep(delay)
        with contextlib.suppress(Exception):
            self._old_clients.remove(client)
            await client.close()

    async def close(self) -> None:
        """Close every channel (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._retiring):
            task.cancel()
        clients = [self._client, *self._old_clients]
        self._old_clients.clear()
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def is_ready(self, models: Iterable[str]) -> bool:
        """Server ready and every model in `models` ready. Never raises."""
        timeout = PROBE_TIMEOUT_S
        try:
            if not await self._client.is_server_ready(client_timeout=timeout):
                return False
            for name in models:
                if not await self._client.is_model_ready(name, client_timeout=timeout):
                    return False
        except Exception as exc:  # unreachable, half started, closed: all mean "not ready"
            log.debug("Triton at %s not ready: %s", self._url, exc)
            return False
        return True

    async def model_config(self, model: str, timeout_s: float | None = None) -> Any:
        """The model's `ModelConfig` protobuf, fetched once per model and cached."""
        config = self._configs.get(model)
        if config is None:
            response = await self._retrying(
                lambda timeout: self._client.get_model_config(model, client_timeout=timeout),
                model,
                timeout_s,
            )
            config = response.config
            self._configs[model] = config
        return config

    async def model_version(self, model: str, timeout_s: float | None = None) -> str:
        """The newest version of `model` Triton has loaded, from its model metadata."""
        metadata = await self._retrying(
            lambda timeout: self._client.get_model_metadata(model, client_timeout=timeout),
            model,
            timeout_s,
        )
        versions = [str(v) for v in metadata.versions]
        if not versions:
            return ""
        return max(versions, key=lambda v: (len(v), v))  # numeric order of digit strings

    async def max_batch_size(self, model: str, timeout_s: float | None = None) -> int:
        """The model's `max_batch_size` (0: the model takes no batch dimension)."""
        return int((await self.model_config(model, timeout_s)).max_batch_size)

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, np.ndarray]:
        """One inference request; returns each requested output as a numpy array.

        `timeout_s` (default: the client's) becomes the gRPC deadline; `headers` go out as gRPC
        metadata, after the current trace context (`traceparent`, so Triton's trace joins ours).
        Each attempt (see the module's note on retries) is a span of its own.
        """
        infer_inputs = []
        batch_size = None
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
            if batch_size is None and array.ndim:
                batch_size = int(array.shape[0])
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs]

        async def attempt(timeout_s: float) -> Any:
            with self._telemetry.triton_call(model, self._url, batch_size, headers) as call:
                try:
                    result = await self._client.infer(
                        model,
                        infer_inputs,
                        outputs=requested,
                        client_timeout=timeout_s,
                        headers=call.headers or None,  # keys in lower case, as gRPC needs
                    )
                except InferenceServerException as exc:
                    call.fail(_status(exc) or "UNKNOWN")
                    raise
                call.model_version = str(result.get_response().model_version)
            return result

        result = await self._retrying(attempt, model, timeout_s)
        arrays = {}
        for name in outputs:
            value = result.as_numpy(name)
            if value is None:
                raise RuntimeError(f"Triton model {model!r} returned no output {name!r}")
            arrays[name] = value
        return arrays

    async def _retrying(
        self,
        call: Callable[[float], Awaitable[T]],
        model: str | None,
        timeout_s: float | None,
    ) -> T:
        """`call(timeout)`, retried as the module says; errors mapped (map_triton_error)."""
        deadline = self._deadline(timeout_s)
        attempt = 0
        while True:
            try:
                return await call(_time_left(deadline))
            except InferenceServerException as exc:
                delay = self._retry_delay(exc, attempt, deadline - time.monotonic())
                if delay is None:
                    raise self._mapped(exc, model) from exc
                attempt += 1
                code = _status(exc)
                log.debug(
                    "Triton call to %s (model %s) failed (%s); retry %d in %.3fs",
                    self._url,
                    model,
                    exc,
                    attempt,
                    delay,
                )
                add_retry_event(attempt, code, delay)
                metrics = self._telemetry.metrics
                if metrics is not None:
                    metrics.triton_retries.labels(model or "", code).inc()
            await asyncio.sleep(delay)

    def _retry_delay(
        self, exc: InferenceServerException, attempt: int, remaining: float
    ) -> float | None:
        """Backoff before retry number `attempt + 1`; None when `exc` is final."""
        if attempt >= self._retries or self._closed or not _retryable(exc):
            return None
        ceiling = min(_RETRY_MAX_S, self._retry_base_s * 2.0**attempt)
        delay = random.uniform(0.0, ceiling)  # full jitter: replicas do not retry in step
        if remaining - delay < _MIN_ATTEMPT_S:
            return None
        return delay

    def _deadline(self, timeout_s: float | None) -> float:
        """The monotonic deadline of a call of `timeout_s` (None: the client's timeout)."""
        deadline = deadline_after(self._timeout_s if timeout_s is None else timeout_s)
        assert deadline is not None
        return deadline

    def _mapped(self, exc: InferenceServerException, model: str | None) -> Exception:
        mapped = map_triton_error(exc, model)
        if mapped is not exc:
            # While Triton is down every call fails fast: one warning per interval, not per call.
            now = time.monotonic()
            quiet = now - self._last_warning < _WARN_INTERVAL_S
            if not quiet:
                self._last_warning = now
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "Triton call to %s (model %s) failed: %s",
                self._url,
                model,
                exc,
            )
        return mapped


def _time_left(deadline: float) -> float:
    """Seconds left before `deadline`, for the next request; DEADLINE_EXCEEDED once passed."""
    left = time_left(deadline, what="before calling the inference backend")
    assert left is not None
    return left


def _retryable(exc: InferenceServerException) -> bool:
    """UNAVAILABLE (except a model that is not ready) or CANCELLED by the server."""
    status = _status(exc)
    if status == "CANCELLED":
        return True
    if status != "UNAVAILABLE":
        return False
    detail = str(exc.message() or "").lower()
    return not ("model" in detail and "connect" not in detail)


class TritonEncoder(TritonClient):
    """The speaker-encoder models: [n, 160, 40] power-mel partials in, [n, D] embeddings out."""

    async def embed_partials(
        self,
        partials: np.ndarray,
        model: str,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> np.ndarray:
        """Embeddings of `partials` ([n, 160, 40] float32) as a new float32 [n, D] array.

        One Triton request, or several concurrent ones of at most `max_batch_size` partials when
        n exceeds it. `timeout_s` bounds the whole call.
        """
        if partials.ndim != 3 or partials.shape[1:] != (PARTIAL_FRAMES, MEL_BANDS):
            raise ValueError(
                f"partials must be [n, {PARTIAL_FRAMES}, {MEL_BANDS}], got {partials.shape}"
            )
        partials = np.ascontiguousarray(partials, dtype=np.float32)
        deadline = self._deadline(timeout_s)
        config = await self.model_config(model, _time_left(deadline))
        n = len(partials)
        if n == 0:
            dims = next((o.dims for o in config.output if o.name == EMBEDDING_OUTPUT), [0])
            return np.zeros((0, int(dims[-1])), dtype=np.float32)
        limit = int(config.max_batch_size) or n
        chunks = [partials[i : i + limit] for i in range(0, n, limit)]
        remaining = _time_left(deadline)
        results = await asyncio.gather(
            *(
                self.infer(
                    model,
                    {MELS_INPUT: chunk},
                    [EMBEDDING_OUTPUT],
                    timeout_s=remaining,
                    headers=headers,
                )
                for chunk in chunks
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        embeddings = np.concatenate(
            [r[EMBEDDING_OUTPUT] for r in results if not isinstance(r, BaseException)], axis=0
        )
        if embeddings.ndim != 2 or len(embeddings) != n:
            raise RuntimeError(f"Triton model {model!r} returned shape {embeddings.shape} for {n}")
        return embeddings.astype(np.float32, copy=False)


__all__ = [
    "EMBEDDING_OUTPUT",
    "MELS_INPUT",
    "TritonClient",
    "TritonEncoder",
    "map_triton_error",
]
