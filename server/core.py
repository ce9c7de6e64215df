"""The speaker core: what Embed and Verify do, knowing nothing of gRPC.

CPU-heavy preprocessing runs in a thread pool so the event loop keeps serving; the encoder
runs behind Triton, which batches the partial windows of concurrent requests together.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from server.audio import SAMPLE_RATE, RawAudioSpec, decode_content, decode_raw, normalize_volume
from server.config import Settings
from server.errors import DeadlineExceeded, InvalidArgument
from server.features import (
    Utterance,
    average_embedding,
    partial_windows,
    require_speech,
    trim_silence,
)
from server.fusion import Calibration
from server.mfcc import mfcc_score, mfcc_statistics
from server.telemetry import (
    ATTR_AUDIO_BYTES,
    ATTR_AUDIO_FIELD,
    ATTR_AUDIO_SECONDS,
    ATTR_AUDIO_SOURCE,
    ATTR_MODEL,
    ATTR_PARTIAL_COUNT,
    ATTR_SPEECH_SECONDS,
    DISABLED,
    Telemetry,
)

AudioInput = bytes | RawAudioSpec
T = TypeVar("T")


class Encoder(Protocol):
    """Computes embeddings of mel partials (Triton in production)."""

    async def embed_partials(
        self,
        partials: np.ndarray,
        model: str,
        timeout_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> np.ndarray: ...


@dataclass(frozen=True)
class EmbedResult:
    embedding: np.ndarray
    model: str
    speech_seconds: float
    partial_count: int


@dataclass(frozen=True)
class VerifyResult:
    score: float
    same_speaker: bool
    threshold: float
    scores: dict[str, float]


@dataclass(frozen=True)
class _Prepared:
    utterance: Utterance
    mfcc: np.ndarray | None


class SpeakerCore:
    """Embeds and verifies utterances; every error it raises is a `VoicegateError`.

    Each step is a child span of the current one (the RPC's) and a `voicegate_stage_seconds`
    observation: decode, trim, features, mfcc, triton (metrics only: the Triton client makes
    one span per request), fusion.
    """

    def __init__(
        self,
        settings: Settings,
        encoder: Encoder,
        calibration: Calibration,
        executor: Executor,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._encoder = encoder
        self._calibration = calibration
        self._executor = executor
        self._telemetry = telemetry or DISABLED

    @property
    def telemetry(self) -> Telemetry:
        return self._telemetry

    @property
    def calibration(self) -> Calibration:
        return self._calibration

    async def embed(
        self, audio: AudioInput, model: str | None = None, timeout_s: float | None = None
    ) -> EmbedResult:
        """The L2-normalised embedding of one utterance."""
        deadline = _deadline(timeout_s)
        model = self._check_model(model)
        prepared = await self._prepare(audio, "audio", with_mfcc=False, deadline=deadline)
        result = await self._embed_prepared(prepared, model, deadline)
        self._telemetry.annotate(
            {
                ATTR_MODEL: model,
                ATTR_SPEECH_SECONDS: result.speech_seconds,
                ATTR_PARTIAL_COUNT: result.partial_count,
            }
        )
        return result

    async def verify(
        self, reference: AudioInput, probe: AudioInput, timeout_s: float | None = None
    ) -> VerifyResult:
        """Same speaker or not: GE2E cosine and MFCC score, fused and thresholded."""
        deadline = _deadline(timeout_s)
        model = self._settings.encoder_model
        ref, prb = await asyncio.gather(
            self._prepare(reference, "reference", with_mfcc=True, deadline=deadline),
            self._prepare(probe, "probe", with_mfcc=True, deadline=deadline),
        )
        ref_emb, prb_emb = await asyncio.gather(
            self._embed_prepared(ref, model, deadline),
            self._embed_prepared(prb, model, deadline),
        )
        assert ref.mfcc is not None and prb.mfcc is not None
        self._telemetry.annotate(
            {
                ATTR_MODEL: model,
                ATTR_SPEECH_SECONDS: ref_emb.speech_seconds + prb_emb.speech_seconds,
                ATTR_PARTIAL_COUNT: ref_emb.partial_count + prb_emb.partial_count,
            }
        )
        with self._telemetry.stage("fusion"):  # scores stay out of spans: biometric results
            ge2e = float(np.dot(ref_emb.embedding, prb_emb.embedding))
            mfcc = mfcc_score(ref.mfcc, prb.mfcc, self._calibration.mfcc_normalization)
            fused = self._calibration.fuse(ge2e, mfcc)
            same = self._calibration.decide(fused)
        return VerifyResult(
            score=fused,
            same_speaker=same,
            threshold=self._calibration.threshold,
            scores={"ge2e": ge2e, "mfcc": mfcc},
        )

    async def embed_with_mfcc(
        self, audio: AudioInput, field: str, timeout_s: float | None = None
    ) -> tuple[EmbedResult, np.ndarray]:
        """The embedding (server's default encoder) and MFCC statistics of one utterance.

        For enrollment and the speaker directory; `field` names the audio in errors.
        """
        deadline = _deadline(timeout_s)
        prepared = await self._prepare(audio, field, with_mfcc=True, deadline=deadline)
        result = await self._embed_prepared(prepared, self._settings.encoder_model, deadline)
        assert prepared.mfcc is not None
        return result, prepared.mfcc

    async def warm_up(self) -> None:
        """Run the preprocessing once so JIT compilation does not land on a caller."""
        rng = np.random.default_rng(0)
        noise = (0.1 * rng.standard_normal(32_000)).astype(np.float32)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, _prepare_wave, noise, 0.1, True)

    def _check_model(self, model: str | None) -> str:
        if not model:
            return self._settings.encoder_model
        if model not in self._settings.encoder_models:
            served = list(self._settings.encoder_models)
            raise InvalidArgument(f"model {model!r} is not served; choose one of {served}")
        return model

    async def _prepare(
        self, audio: AudioInput, field: str, with_mfcc: bool, deadline: float | None
    ) -> _Prepared:
        settings = self._settings
        telemetry = self._telemetry
        if isinstance(audio, RawAudioSpec):
            decode: Callable[[], np.ndarray] = lambda: decode_raw(  # noqa: E731
                audio, settings.max_audio_seconds, f"{field}.raw"
            )
            source, size = "raw", len(audio.samples)
        else:
            decode = lambda: decode_content(  # noqa: E731
                audio, settings.max_audio_seconds, f"{field}.content"
            )
            source, size = "content", len(audio)

        def work() -> _Prepared:
            attributes: dict[str, str | int] = {
                ATTR_AUDIO_FIELD: field,
                ATTR_AUDIO_SOURCE: source,
                ATTR_AUDIO_BYTES: size,
            }
            with telemetry.stage("decode", attributes) as span:
                wav = decode()
                seconds = len(wav) / SAMPLE_RATE
                span.set_attribute(ATTR_AUDIO_SECONDS, seconds)
            telemetry.count_audio("decoded", seconds)
            return _prepare_wave(wav, settings.min_speech_seconds, with_mfcc, telemetry, field)

        return await self._run(work, deadline)

    async def _embed_prepared(
        self, prepared: _Prepared, model: str, deadline: float | None
    ) -> EmbedResult:
        partials = prepared.utterance.partials
        with self._telemetry.timed("triton"):
            embeddings = await self._encoder.embed_partials(
                partials, model, timeout_s=_remaining(deadline)
            )
        return EmbedResult(
            embedding=average_embedding(embeddings),
            model=model,
            speech_seconds=prepared.utterance.speech_seconds,
            partial_count=len(partials),
        )

    async def _run(self, work: Callable[[], T], deadline: float | None) -> T:
        loop = asyncio.get_running_loop()
        # The worker runs in the caller's context: its spans are children of the RPC's span.
        context = contextvars.copy_context()
        future = loop.run_in_executor(self._executor, context.run, work)
        try:
            return await asyncio.wait_for(future, timeout=_remaining(deadline))
        except TimeoutError:
            raise DeadlineExceeded("deadline passed during audio preprocessing") from None


def _prepare_wave(
    wav: np.ndarray,
    min_speech_seconds: float,
    with_mfcc: bool,
    telemetry: Telemetry = DISABLED,
    field: str = "audio",
) -> _Prepared:
    """`features.prepare_utterance`, step by step so that each step gets its span."""
    attributes = {ATTR_AUDIO_FIELD: field}
    with telemetry.stage("trim", attributes) as span:
        speech = trim_silence(normalize_volume(wav))
        span.set_attribute(ATTR_SPEECH_SECONDS, len(speech) / SAMPLE_RATE)
        seconds = require_speech(speech, min_speech_seconds)
    telemetry.count_audio("speech", seconds)
    with telemetry.stage("features", attributes) as span:
        partials = partial_windows(speech)
        span.set_attribute(ATTR_PARTIAL_COUNT, len(partials))
    mfcc = None
    if with_mfcc:
        with telemetry.stage("mfcc", attributes):
            mfcc = mfcc_statistics(speech)
    return _Prepared(utterance=Utterance(speech=speech, partials=partials), mfcc=mfcc)


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("deadline passed before the request could be processed")
    return remaining
