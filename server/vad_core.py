"""The voice-activity core: what DetectSpeech and StreamingDetectSpeech do, knowing nothing of
gRPC.

Audio is decoded, downmixed and resampled to 16 kHz (server/audio.py), Silero VAD runs in
Triton (server/vad_model.py) and the probabilities become segments (server/vad.py). Decoding
(a whole file, or each chunk of a stream) and the segmentation of a whole recording run in the
preprocessing thread pool, so that the event loop keeps serving.

A stream holds, besides the detector's state: less than one sample frame of bytes, less than one
32 ms frame of 16 kHz samples, the resampler's state, and one probability per frame
heard (8 bytes each, bounded by `max_stream_seconds`: 450 KB for the default 30 minutes).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeVar

import numpy as np

from server.audio import (
    SAMPLE_RATE,
    AudioInput,
    MonoConverter,
    SampleFormat,
    check_raw_spec,
    decode_audio,
    raw_dtype,
)
from server.config import Settings
from server.deadlines import deadline_after, run_in_pool, time_left
from server.errors import InvalidArgument, InvalidAudio
from server.telemetry import ATTR_AUDIO_SECONDS, ATTR_SPEECH_SECONDS, DISABLED, Telemetry
from server.vad import (
    FRAME_SAMPLES,
    Segment,
    SpeechEvent,
    StreamingSegmenter,
    VadParams,
    pad_to_frames,
    speech_segments,
)
from server.vad_model import RECORDING_WINDOW_FRAMES, VadState

T = TypeVar("T")

ATTR_SEGMENT_COUNT = "voicegate.vad.segment_count"


class SpeechProbabilities(Protocol):
    """Per-frame speech probabilities (TritonVad in production)."""

    window_frames: int  # frames per request; callers cut their audio into the same windows

    async def probabilities(
        self,
        samples: np.ndarray,
        state: VadState | None = None,
        timeout_s: float | None = None,
        window_frames: int | None = None,
    ) -> tuple[np.ndarray, VadState]: ...


@dataclass(frozen=True)
class VadResult:
    """The segments of some audio, and its length at 16 kHz."""

    segments: list[Segment]
    n_samples: int

    @property
    def audio_seconds(self) -> float:
        return self.n_samples / SAMPLE_RATE

    @property
    def speech_seconds(self) -> float:
        return sum(segment.seconds for segment in self.segments)


@dataclass(frozen=True)
class StreamSpec:
    """How a stream's raw bytes are to be read."""

    format: SampleFormat | None
    sample_rate_hz: int
    channels: int = 1


class VoiceActivityCore:
    """Speech segments of whole recordings and of streams; every error it raises is a
    `VoicegateError`.

    Stages: `decode` (a span, and `voicegate_stage_seconds`) and `vad` (a span around the
    Triton calls and the segmentation) for DetectSpeech; for a stream the per-chunk work is
    measured in `voicegate_stage_seconds` only (`decode`, `vad`), since a span per chunk would
    swamp a trace (the Triton client still makes one span per request).
    """

    def __init__(
        self,
        settings: Settings,
        vad: SpeechProbabilities,
        executor: Executor,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._limits = settings.audio_limits
        self._vad = vad
        self._executor = executor
        self._telemetry = telemetry or DISABLED
        self.active_streams = 0  # streams open now (also the voicegate_vad_streams gauge)

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def vad(self) -> SpeechProbabilities:
        return self._vad

    async def detect(
        self, audio: AudioInput, params: VadParams, timeout_s: float | None = None
    ) -> VadResult:
        """The speech segments of one whole recording."""
        deadline = deadline_after(timeout_s)
        limits, telemetry = self._limits, self._telemetry

        def decode() -> tuple[int, np.ndarray]:
            wav = decode_audio(audio, "audio", limits, deadline, telemetry)
            return len(wav), pad_to_frames(wav)

        n_samples, padded = await self._run(decode, deadline)
        with self._telemetry.stage("vad", {ATTR_AUDIO_SECONDS: n_samples / SAMPLE_RATE}) as span:
            probabilities, _ = await self._vad.probabilities(
                padded, timeout_s=time_left(deadline), window_frames=RECORDING_WINDOW_FRAMES
            )
            segments = await run_in_pool(
                self._executor,
                lambda: speech_segments(probabilities, n_samples, params),
                deadline,
                "speech segmentation",
            )
            result = VadResult(segments, n_samples)
            span.set_attribute(ATTR_SEGMENT_COUNT, len(segments))
            span.set_attribute(ATTR_SPEECH_SECONDS, result.speech_seconds)
        self._telemetry.annotate({ATTR_SPEECH_SECONDS: result.speech_seconds})
        return result

    def open_stream(
        self, spec: StreamSpec, params: VadParams, timeout_s: float | None = None
    ) -> VadStream:
        """A stream session (use `async with`); the spec is checked here."""
        return VadStream(self, spec, params, deadline_after(timeout_s))

    def _count_stream(self, change: int) -> None:
        self.active_streams += change
        metrics = self._telemetry.metrics
        if metrics is not None:
            metrics.vad_streams.set(self.active_streams)

    async def _run(self, work: Callable[[], T], deadline: float | None) -> T:
        return await run_in_pool(self._executor, work, deadline, "audio decoding")


class RawStreamDecoder:
    """Raw interleaved little-endian chunks, split anywhere, to mono 16 kHz float32.

    `feed` returns the 16 kHz samples the new bytes complete; bytes of an unfinished sample
    frame wait for the next chunk. Whole frames are converted as server/audio.py converts whole
    buffers (`audio.MonoConverter`: the same scaling, downmix, clipping and streamed
    resampling, bit for bit); this class adds the framing and the stream's duration limit.
    """

    def __init__(
        self,
        spec: StreamSpec,
        settings: Settings,
        field: str = "config",
    ) -> None:
        self.format, self.channels = check_raw_spec(
            spec.format, spec.sample_rate_hz, spec.channels, settings.audio_limits, field
        )
        self.rate = spec.sample_rate_hz
        self.max_seconds = settings.max_stream_seconds
        self._dtype = raw_dtype(self.format)
        self._frame_bytes = self._dtype.itemsize * self.channels
        self._pending = b""
        self.bytes = 0
        self._converter = MonoConverter(self.rate, "audio_chunk")

    def check_size(self, chunk_bytes: int) -> None:
        """INVALID_ARGUMENT when `chunk_bytes` more would pass the stream duration limit."""
        frames = (self.bytes + chunk_bytes) // self._frame_bytes
        if frames > self.max_seconds * self.rate:
            raise InvalidArgument(
                f"audio_chunk: the stream lasts at least {frames / self.rate:.1f} s, over the "
                f"limit of {self.max_seconds:g} s (max_stream_seconds)",
                field="audio_chunk",
            )

    def feed(self, chunk: bytes) -> np.ndarray:
        self.check_size(len(chunk))
        self.bytes += len(chunk)
        data = self._pending + chunk if self._pending else chunk
        whole = len(data) - len(data) % self._frame_bytes
        self._pending = data[whole:]
        if not whole:
            return np.zeros(0, np.float32)
        samples = np.frombuffer(data, dtype=self._dtype, count=whole // self._dtype.itemsize)
        return self._converter.push(samples.reshape(-1, self.channels))

    def finish(self) -> np.ndarray:
        """The resampler's last samples; INVALID_ARGUMENT when the stream ends mid-frame."""
        if self._pending:
            raise InvalidAudio(
                f"audio_chunk: the stream's {self.bytes} bytes are not a whole number of "
                f"{self._frame_bytes}-byte sample frames ({self.channels} channel(s) of "
                f"{self.format.value})",
                field="audio_chunk",
            )
        if self._converter.frames == 0:
            raise InvalidAudio("audio_chunk: the stream holds no audio", field="audio_chunk")
        return self._converter.finish()


class VadStream:
    """One StreamingDetectSpeech call: `feed` chunks, get events; `finish` for the rest.

    Calls must not overlap (the servicer awaits each). Counted in `core.active_streams` while
    open (`async with`).
    """

    def __init__(
        self, core: VoiceActivityCore, spec: StreamSpec, params: VadParams, deadline: float | None
    ) -> None:
        self._core = core
        self._telemetry = core._telemetry
        self._decoder = RawStreamDecoder(spec, core.settings)
        self._segmenter = StreamingSegmenter(params)
        self._deadline = deadline
        self._state: VadState | None = None
        self._buffer = np.zeros(0, np.float32)  # < one frame of 16 kHz samples
        self._n_samples = 0  # 16 kHz samples decoded
        self._opened = False

    async def __aenter__(self) -> VadStream:
        self._core._count_stream(+1)
        self._opened = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._opened:
            self._opened = False
            self._core._count_stream(-1)

    async def feed(self, chunk: bytes) -> list[SpeechEvent]:
        """Events that the audio so far makes certain (often none)."""
        time_left(self._deadline)
        if not chunk:
            return []
        with self._telemetry.timed("decode"):
            self._decoder.check_size(len(chunk))  # before handing the work to a thread
            samples = await self._core._run(lambda: self._decoder.feed(chunk), self._deadline)
        return await self._detect(samples)

    async def finish(self) -> tuple[list[SpeechEvent], VadResult]:
        """The events left and every segment, once the caller has sent all its audio."""
        time_left(self._deadline)
        samples = await self._core._run(self._decoder.finish, self._deadline)
        self._n_samples += len(samples)
        n_samples = self._n_samples
        # the frames left, the last zero-padded, in one request (as StreamingEmbed's last window)
        rest = np.concatenate([self._buffer, samples]) if len(self._buffer) else samples
        self._buffer = np.zeros(0, np.float32)
        whole = len(rest) // FRAME_SAMPLES
        probabilities = np.zeros(0, np.float32)
        if len(rest):
            with self._telemetry.timed("vad"):
                probabilities, self._state = await self._core.vad.probabilities(
                    pad_to_frames(rest), self._state, timeout_s=time_left(self._deadline)
                )
        events = self._segmenter.push(probabilities[:whole])
        last, segments = self._segmenter.finish(n_samples, probabilities[whole:])
        result = VadResult(segments, n_samples)
        self._telemetry.count_audio("decoded", result.audio_seconds)
        self._telemetry.annotate(
            {
                ATTR_AUDIO_SECONDS: result.audio_seconds,
                ATTR_SPEECH_SECONDS: result.speech_seconds,
                ATTR_SEGMENT_COUNT: len(segments),
            }
        )
        return events + last, result

    async def _detect(self, samples: np.ndarray) -> list[SpeechEvent]:
        self._n_samples += len(samples)
        buffered = np.concatenate([self._buffer, samples]) if len(self._buffer) else samples
        whole = len(buffered) - len(buffered) % FRAME_SAMPLES
        self._buffer = buffered[whole:].copy()
        if not whole:
            return []
        with self._telemetry.timed("vad"):
            probabilities, self._state = await self._core.vad.probabilities(
                buffered[:whole], self._state, timeout_s=time_left(self._deadline)
            )
            return self._segmenter.push(probabilities)
