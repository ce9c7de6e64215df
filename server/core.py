"""The speaker core: what Embed and Verify do, knowing nothing of gRPC.

CPU-heavy preprocessing runs in a thread pool so the event loop keeps serving; the encoder
runs behind Triton, which batches the partial windows of concurrent requests together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from server.audio import RawAudioSpec, decode_content, decode_raw
from server.config import Settings
from server.errors import DeadlineExceeded, InvalidArgument
from server.features import Utterance, average_embedding, prepare_utterance
from server.fusion import Calibration
from server.mfcc import mfcc_score, mfcc_statistics

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
    """Embeds and verifies utterances; every error it raises is a `VoicegateError`."""

    def __init__(
        self,
        settings: Settings,
        encoder: Encoder,
        calibration: Calibration,
        executor: Executor,
    ) -> None:
        self._settings = settings
        self._encoder = encoder
        self._calibration = calibration
        self._executor = executor

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
        return await self._embed_prepared(prepared, model, deadline)

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
        ge2e = float(np.dot(ref_emb.embedding, prb_emb.embedding))
        mfcc = mfcc_score(ref.mfcc, prb.mfcc, self._calibration.mfcc_normalization)
        fused = self._calibration.fuse(ge2e, mfcc)
        return VerifyResult(
            score=fused,
            same_speaker=self._calibration.decide(fused),
            threshold=self._calibration.threshold,
            scores={"ge2e": ge2e, "mfcc": mfcc},
        )

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
        if isinstance(audio, RawAudioSpec):
            decode: Callable[[], np.ndarray] = lambda: decode_raw(  # noqa: E731
                audio, settings.max_audio_seconds, f"{field}.raw"
            )
        else:
            decode = lambda: decode_content(  # noqa: E731
                audio, settings.max_audio_seconds, f"{field}.content"
            )

        def work() -> _Prepared:
            return _prepare_wave(decode(), settings.min_speech_seconds, with_mfcc)

        return await self._run(work, deadline)

    async def _embed_prepared(
        self, prepared: _Prepared, model: str, deadline: float | None
    ) -> EmbedResult:
        partials = prepared.utterance.partials
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
        future = loop.run_in_executor(self._executor, work)
        try:
            return await asyncio.wait_for(future, timeout=_remaining(deadline))
        except TimeoutError:
            raise DeadlineExceeded("deadline passed during audio preprocessing") from None


def _prepare_wave(wav: np.ndarray, min_speech_seconds: float, with_mfcc: bool) -> _Prepared:
    utterance = prepare_utterance(wav, min_speech_seconds)
    mfcc = mfcc_statistics(utterance.speech) if with_mfcc else None
    return _Prepared(utterance=utterance, mfcc=mfcc)


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("deadline passed before the request could be processed")
    return remaining
