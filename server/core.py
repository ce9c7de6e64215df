"""The speaker core: what Embed and Verify do, knowing nothing of gRPC.

CPU-heavy preprocessing runs in a thread pool so the event loop keeps serving; the encoder
runs behind Triton, which batches the partial windows of concurrent requests together.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

import numpy as np

from server.audio import SAMPLE_RATE, AudioInput, decode_audio
from server.config import Settings
from server.deadlines import deadline_after, run_in_pool, time_left
from server.errors import InvalidArgument
from server.features import (
    EmbeddingMean,
    Utterance,
    average_embedding,
    partial_windows,
    recording_gain,
    require_speech,
    scaled,
    segments_speech,
    trim_silence,
)
from server.fusion import Calibration
from server.mfcc import mfcc_score, mfcc_statistics
from server.streaming_embed import StreamingEmbedSession, VadSpeechFeatures, vad_features
from server.telemetry import (
    ATTR_MODEL,
    ATTR_PARTIAL_COUNT,
    ATTR_SPEECH_SECONDS,
    DISABLED,
    Telemetry,
    field_attributes,
)
from server.vad import VadParams, pad_to_frames
from server.vad_core import SpeechProbabilities, StreamSpec
from server.vad_model import RECORDING_WINDOW_FRAMES

__all__ = ["AudioInput", "EmbedResult", "Encoder", "SpeakerCore", "VerifyResult"]

T = TypeVar("T")

# StreamingEmbed sends its partial windows to the encoder in groups of this many as they are
# cut (about 3 s of speech): a Triton request costs ~1 ms of CPU, a window ~2 ms, so groups
# keep the requests' share small while the stream holds at most this many windows (100 KB).
STREAM_ENCODE_PARTIALS = 4


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
    """An utterance ready for the encoder: its partial windows, the seconds of speech, and with
    `with_mfcc` its MFCC statistics and `speech`, the trimmed waveform raised to -30 dBFS as a
    whole (what the MFCC is taken from).
    """

    partials: np.ndarray
    speech_seconds: float
    mfcc: np.ndarray | None
    speech: np.ndarray | None = None

    @property
    def utterance(self) -> Utterance:
        assert self.speech is not None, "the speech waveform was not built"
        return Utterance(speech=self.speech, partials=self.partials)


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
        vad: SpeechProbabilities | None = None,
    ) -> None:
        """`vad`: Silero VAD, required with the setting trim="vad" (silero's default segment
        rules, `vad.VadParams()`)."""
        if settings.trim == "vad" and vad is None:
            raise ValueError('trim="vad" needs a VAD')
        self._settings = settings
        self._limits = settings.audio_limits
        self._encoder = encoder
        self._calibration = calibration
        self._executor = executor
        self._telemetry = telemetry or DISABLED
        self._vad = vad if settings.trim == "vad" else None
        self._vad_params = VadParams()
        self._vad_window_frames = vad.window_frames if vad is not None else 0  # its Triton requests
        self.active_streams = 0  # StreamingEmbed calls open now

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
        deadline = deadline_after(timeout_s)
        model = self._check_model(model)
        prepared = await self._prepare(audio, "audio", with_mfcc=False, deadline=deadline)
        result = await self._encode(prepared.partials, prepared.speech_seconds, model, deadline)
        self._annotate(model, result.speech_seconds, result.partial_count)
        return result

    async def verify(
        self, reference: AudioInput, probe: AudioInput, timeout_s: float | None = None
    ) -> VerifyResult:
        """Same speaker or not: GE2E cosine and MFCC score, fused and thresholded."""
        deadline = deadline_after(timeout_s)
        model = self._settings.encoder_model
        ref, prb = await asyncio.gather(
            self._prepare(reference, "reference", with_mfcc=True, deadline=deadline),
            self._prepare(probe, "probe", with_mfcc=True, deadline=deadline),
        )
        ref_emb, prb_emb = await asyncio.gather(
            self._encode(ref.partials, ref.speech_seconds, model, deadline),
            self._encode(prb.partials, prb.speech_seconds, model, deadline),
        )
        assert ref.mfcc is not None and prb.mfcc is not None
        self._annotate(
            model,
            ref_emb.speech_seconds + prb_emb.speech_seconds,
            ref_emb.partial_count + prb_emb.partial_count,
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
        deadline = deadline_after(timeout_s)
        prepared = await self._prepare(audio, field, with_mfcc=True, deadline=deadline)
        model = self._settings.encoder_model
        result = await self._encode(prepared.partials, prepared.speech_seconds, model, deadline)
        assert prepared.mfcc is not None
        return result, prepared.mfcc

    async def embed_stream(
        self,
        spec: StreamSpec,
        chunks: AsyncIterable[bytes],
        model: str | None = None,
        timeout_s: float | None = None,
    ) -> EmbedResult:
        """The embedding of a recording that arrives as raw chunks: Embed's for the whole
        recording (within float rounding), computed as the chunks come (trim "vad"), or from
        the decoded audio kept until the end (trim "energy"); see server/streaming_embed.py.

        Cancelling the caller's task (a client gone) stops the work at the next await: no
        Triton request is sent after it, and the session's memory goes with it.
        """
        deadline = deadline_after(timeout_s)
        model = self._check_model(model)
        vad = self._vad
        session = StreamingEmbedSession(
            spec,
            self._settings,
            vad_params=self._vad_params,
            vad_window_frames=self._vad_window_frames,
        )
        metrics = self._telemetry.metrics
        held = 0

        def account() -> None:
            nonlocal held
            if metrics is not None:
                now = session.nbytes
                metrics.streaming_bytes.inc(now - held)
                held = now

        self.active_streams += 1
        if metrics is not None:
            metrics.streaming_sessions.inc()
        mean = EmbeddingMean()  # trim "vad": the embeddings of the windows encoded so far
        try:
            async for chunk in chunks:
                time_left(deadline)
                if not chunk:
                    continue
                await self._run(partial(session.feed, chunk), deadline)
                if vad is not None:
                    await self._stream_vad(session, vad, False, deadline)
                    if session.ready_partials() >= STREAM_ENCODE_PARTIALS:
                        await self._encode_into(mean, session.take_partials(), model, deadline)
                account()
            await self._run(session.end, deadline)
            self._telemetry.count_audio("decoded", session.decoded_seconds)
            if vad is None:
                result = await self._embed_kept_audio(session, model, deadline)
            else:
                await self._stream_vad(session, vad, True, deadline)
                min_speech = self._limits.min_speech_seconds
                speech_seconds = require_speech(session.speech_samples, min_speech)
                self._telemetry.count_audio("speech", speech_seconds)
                with self._telemetry.stage("features") as span:
                    rest = await self._run(session.final_partials, deadline)
                    span.set_attribute(ATTR_PARTIAL_COUNT, mean.count + len(rest))
                account()
                await self._encode_into(mean, rest, model, deadline)
                result = EmbedResult(mean.result(), model, speech_seconds, mean.count)
        finally:
            self.active_streams -= 1
            if metrics is not None:
                metrics.streaming_sessions.dec()
                metrics.streaming_bytes.dec(held)
        self._annotate(model, result.speech_seconds, result.partial_count)
        return result

    async def _embed_kept_audio(
        self, session: StreamingEmbedSession, model: str, deadline: float | None
    ) -> EmbedResult:
        """Trim "energy": Embed's own preparation of the decoded audio the stream kept."""
        min_speech, telemetry = self._limits.min_speech_seconds, self._telemetry
        prepared = await self._run(
            lambda: prepare_wave(session.audio(), min_speech, False, telemetry), deadline
        )
        return await self._encode(prepared.partials, prepared.speech_seconds, model, deadline)

    async def _encode_into(
        self, mean: EmbeddingMean, partials: list[np.ndarray], model: str, deadline: float | None
    ) -> None:
        """Encode a stream's cut windows (one Triton request) and add them to `mean`."""
        if partials:
            mean.add(await self._embed_partials(np.stack(partials), model, deadline))

    async def _stream_vad(
        self,
        session: StreamingEmbedSession,
        vad: SpeechProbabilities,
        final: bool,
        deadline: float | None,
    ) -> None:
        """Send the stream's whole VAD windows (`final`: all that is left) and hand their
        probabilities to the session, which turns decided speech into mel frames."""
        while (window := session.vad_window(final)) is not None:
            samples, count = window
            with self._telemetry.timed("vad"):
                probabilities, state = await vad.probabilities(
                    samples, session.vad_state(), timeout_s=time_left(deadline)
                )
            accept = partial(session.accept_probabilities, probabilities, count, state, final)
            await self._run(accept, deadline)
            if final:
                return

    async def warm_up(self) -> None:
        """Run the preprocessing once so JIT compilation does not land on a caller."""
        rng = np.random.default_rng(0)
        noise = (0.1 * rng.standard_normal(32_000)).astype(np.float32)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, prepare_wave, noise, 0.1, True)

    def _check_model(self, model: str | None) -> str:
        if not model:
            return self._settings.encoder_model
        if model not in self._settings.encoder_models:
            served = list(self._settings.encoder_models)
            raise InvalidArgument(
                f"model {model!r} is not served; choose one of {served}", field="model"
            )
        return model

    def _annotate(self, model: str, speech_seconds: float, partial_count: int) -> None:
        """The RPC span's attributes of an embedding (or two, Verify's)."""
        self._telemetry.annotate(
            {
                ATTR_MODEL: model,
                ATTR_SPEECH_SECONDS: speech_seconds,
                ATTR_PARTIAL_COUNT: partial_count,
            }
        )

    async def _prepare(
        self, audio: AudioInput, field: str, with_mfcc: bool, deadline: float | None
    ) -> _Prepared:
        telemetry = self._telemetry
        limits = self._limits
        min_speech = limits.min_speech_seconds

        def decode() -> np.ndarray:
            return decode_audio(audio, field, limits, deadline, telemetry)

        if self._vad is None:  # trim "energy": decode and prepare in one trip to the pool
            return await self._run(
                lambda: prepare_wave(decode(), min_speech, with_mfcc, telemetry, field), deadline
            )
        wav, padded = await self._run(lambda: _with_padded(decode()), deadline)
        # Metrics only: the VAD's Triton calls are this step's spans (a stage span around them
        # would only repeat their timing, at the price of a span per call).
        with telemetry.timed("vad"):
            probabilities, _ = await self._vad.probabilities(
                padded, timeout_s=time_left(deadline), window_frames=RECORDING_WINDOW_FRAMES
            )
        del padded
        vad = (probabilities, self._vad_params, self._vad_window_frames)
        return await self._run(
            lambda: prepare_wave(wav, min_speech, with_mfcc, telemetry, field, vad), deadline
        )

    async def _encode(
        self, partials: np.ndarray, speech_seconds: float, model: str, deadline: float | None
    ) -> EmbedResult:
        """The encoder's embedding of an utterance's partial windows (one Triton request)."""
        return EmbedResult(
            embedding=average_embedding(await self._embed_partials(partials, model, deadline)),
            model=model,
            speech_seconds=speech_seconds,
            partial_count=len(partials),
        )

    async def _embed_partials(
        self, partials: np.ndarray, model: str, deadline: float | None
    ) -> np.ndarray:
        with self._telemetry.timed("triton"):
            return await self._encoder.embed_partials(
                partials, model, timeout_s=time_left(deadline)
            )

    async def _run(self, work: Callable[[], T], deadline: float | None) -> T:
        return await run_in_pool(self._executor, work, deadline, "audio preprocessing")


def _with_padded(wav: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`wav` and, for the VAD, `wav` zero-padded to whole frames."""
    return wav, pad_to_frames(wav)


def prepare_wave(
    wav: np.ndarray,
    min_speech_seconds: float,
    with_mfcc: bool,
    telemetry: Telemetry = DISABLED,
    field: str = "audio",
    vad: tuple[np.ndarray, VadParams, int] | None = None,
) -> _Prepared:
    """`features.prepare_utterance`, step by step so that each step gets its span.

    `vad`: the recording's VAD probabilities (one per 512 samples), segment rules and the VAD
    client's window: the speech is then its VAD segments (trim "vad"), and its mel frames are
    computed as StreamingEmbed computes them (`streaming_embed.vad_features`, during "trim");
    the speech waveform itself is built only for the MFCC, scaled by the recording's gain.
    The partial windows are loudness-normalised one by one (server/features.py); the MFCC
    takes the whole recording's gain.
    """
    attributes = field_attributes(field)
    features: VadSpeechFeatures | None = None
    speech: np.ndarray | None = None
    with telemetry.stage("trim", attributes) as span:
        if vad is None:
            speech = trim_silence(wav)
            speech_samples = len(speech)
        else:
            features = vad_features(wav, *vad)
            speech_samples = features.speech_samples
        span.set_attribute(ATTR_SPEECH_SECONDS, speech_samples / SAMPLE_RATE)
        seconds = require_speech(speech_samples, min_speech_seconds, field)
    telemetry.count_audio("speech", seconds)
    with telemetry.stage("features", attributes) as span:
        if features is None:
            assert speech is not None
            partials = partial_windows(speech)
        else:
            partials = features.partials()
        span.set_attribute(ATTR_PARTIAL_COUNT, len(partials))
    mfcc = None
    if with_mfcc:
        with telemetry.stage("mfcc", attributes):
            if features is not None:
                spans = [(s.start_sample, s.end_sample) for s in features.segments]
                speech = segments_speech(wav, spans)
            assert speech is not None
            speech = scaled(speech, recording_gain(wav))  # the MFCC's: the recording's gain
            mfcc = mfcc_statistics(speech)
    return _Prepared(
        partials=partials, speech_seconds=seconds, mfcc=mfcc, speech=speech if with_mfcc else None
    )
