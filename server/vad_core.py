"""The voice-activity core: what DetectSpeech and StreamingDetectSpeech do, knowing nothing of
gRPC.

Audio is decoded, downmixed and resampled to 16 kHz (server/audio.py), Silero VAD runs in
Triton (server/vad_model.py) and the probabilities become segments (server/vad.py). Decoding a
whole file runs in the preprocessing thread pool; a stream's chunks are small and are decoded on
the event loop (a chunk over `INLINE_CHUNK_BYTES` goes to the pool too).

A stream holds, besides the detector's state: less than one sample frame of bytes, less than one
32 ms frame of 16 kHz samples, the resampler's state, and one probability per frame
heard (8 bytes each, bounded by `max_stream_seconds`: 450 KB for the default 30 minutes).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, TypeVar

import numpy as np

from server.audio import SAMPLE_RATE, RawAudioSpec, SampleFormat, decode_content, decode_raw
from server.config import Settings
from server.deadlines import deadline_after, time_left
from server.errors import DeadlineExceeded, InvalidArgument, InvalidAudio
from server.telemetry import (
    ATTR_AUDIO_BYTES,
    ATTR_AUDIO_FIELD,
    ATTR_AUDIO_SECONDS,
    ATTR_AUDIO_SOURCE,
    ATTR_SPEECH_SECONDS,
    DISABLED,
    Telemetry,
)
from server.vad import (
    FRAME_SAMPLES,
    Segment,
    SpeechEvent,
    StreamingSegmenter,
    VadParams,
    pad_to_frames,
    speech_segments,
)
from server.vad_model import VadState

AudioInput = bytes | RawAudioSpec
T = TypeVar("T")

# Stream chunks up to this size are decoded on the event loop (microseconds of work); larger
# ones in the preprocessing pool, so that one huge chunk does not stall other calls.
INLINE_CHUNK_BYTES = 64 * 1024
ATTR_SEGMENT_COUNT = "voicegate.vad.segment_count"


class SpeechProbabilities(Protocol):
    """Per-frame speech probabilities (TritonVad in production)."""

    async def probabilities(
        self,
        samples: np.ndarray,
        state: VadState | None = None,
        timeout_s: float | None = None,
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
        wav = await self._decode(audio, deadline)
        n_samples = len(wav)
        padded = pad_to_frames(wav)
        with self._telemetry.stage("vad", {ATTR_AUDIO_SECONDS: n_samples / SAMPLE_RATE}) as span:
            probabilities, _ = await self._vad.probabilities(padded, timeout_s=time_left(deadline))
            segments = speech_segments(probabilities, n_samples, params)
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

    async def _decode(self, audio: AudioInput, deadline: float | None) -> np.ndarray:
        limits = self._settings.audio_limits
        telemetry = self._telemetry
        if isinstance(audio, RawAudioSpec):
            decode: Callable[[], np.ndarray] = lambda: decode_raw(  # noqa: E731
                audio, limits, "audio.raw", deadline
            )
            source, size = "raw", len(audio.samples)
        else:
            decode = lambda: decode_content(audio, limits, "audio.content", deadline)  # noqa: E731
            source, size = "content", len(audio)

        def work() -> np.ndarray:
            attributes: dict[str, str | int] = {
                ATTR_AUDIO_FIELD: "audio",
                ATTR_AUDIO_SOURCE: source,
                ATTR_AUDIO_BYTES: size,
            }
            with telemetry.stage("decode", attributes) as span:
                wav = decode()
                span.set_attribute(ATTR_AUDIO_SECONDS, len(wav) / SAMPLE_RATE)
            telemetry.count_audio("decoded", len(wav) / SAMPLE_RATE)
            return wav

        return await self._run(work, deadline)

    async def _run(self, work: Callable[[], T], deadline: float | None) -> T:
        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # spans of the worker are children of the RPC's
        future = loop.run_in_executor(self._executor, context.run, work)
        try:
            return await asyncio.wait_for(future, timeout=time_left(deadline))
        except TimeoutError:
            raise DeadlineExceeded("deadline passed during audio decoding") from None


class RawStreamDecoder:
    """Raw interleaved little-endian chunks, split anywhere, to mono 16 kHz float32.

    `feed` returns the 16 kHz samples the new bytes complete; bytes of an unfinished sample
    frame wait for the next chunk. The resampler is soxr's streaming one, which gives what one
    `soxr.resample` of the whole would (as server/audio.py decodes whole buffers).
    """

    def __init__(self, spec: StreamSpec, settings: Settings, field: str = "config") -> None:
        import soxr

        limits = settings.audio_limits
        if spec.format is None:
            raise InvalidArgument(
                f"{field}.format is required (SAMPLE_FORMAT_LINEAR16 or SAMPLE_FORMAT_FLOAT32)",
                field=f"{field}.format",
            )
        low, high = limits.min_sample_rate_hz, limits.max_sample_rate_hz
        if not low <= spec.sample_rate_hz <= high:
            raise InvalidArgument(
                f"{field}.sample_rate_hz: sample rate {spec.sample_rate_hz} Hz is outside the "
                f"accepted {low}..{high} Hz",
                field=f"{field}.sample_rate_hz",
            )
        channels = spec.channels or 1
        if not 1 <= channels <= limits.max_channels:
            raise InvalidArgument(
                f"{field}.channels: {spec.channels} channels; 1..{limits.max_channels} are "
                "accepted",
                field=f"{field}.channels",
            )
        self.rate = spec.sample_rate_hz
        self.channels = channels
        self.format = spec.format
        self.max_seconds = settings.max_stream_seconds
        self._dtype = np.dtype("<i2") if spec.format is SampleFormat.LINEAR16 else np.dtype("<f4")
        self._frame_bytes = self._dtype.itemsize * channels
        self._pending = b""
        self.frames = 0  # sample frames received, at the source rate
        self.bytes = 0
        self._resampler: Any = None
        if self.rate != SAMPLE_RATE:
            self._resampler = soxr.ResampleStream(
                self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ"
            )

    @property
    def seconds(self) -> float:
        return self.frames / self.rate

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
        block = samples.reshape(-1, self.channels).astype(np.float32)
        if self.format is SampleFormat.LINEAR16:
            block /= np.float32(2**15)
        elif not np.isfinite(block).all():
            raise InvalidAudio("audio_chunk contains NaN or infinite samples", field="audio_chunk")
        self.frames += len(block)
        mono = np.clip(block.mean(axis=1, dtype=np.float32), -1.0, 1.0).astype(np.float32)
        if self._resampler is None:
            return mono
        out: np.ndarray = self._resampler.resample_chunk(mono)
        return out

    def finish(self) -> np.ndarray:
        """The resampler's last samples; INVALID_ARGUMENT when the stream ends mid-frame."""
        if self._pending:
            raise InvalidAudio(
                f"audio_chunk: the stream's {self.bytes} bytes are not a whole number of "
                f"{self._frame_bytes}-byte sample frames ({self.channels} channel(s) of "
                f"{self.format.value})",
                field="audio_chunk",
            )
        if self.frames == 0:
            raise InvalidAudio("audio_chunk: the stream holds no audio", field="audio_chunk")
        if self._resampler is None:
            return np.zeros(0, np.float32)
        out: np.ndarray = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        return out


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
            if len(chunk) > INLINE_CHUNK_BYTES:
                self._decoder.check_size(len(chunk))  # before handing the work to a thread
                samples = await self._core._run(lambda: self._decoder.feed(chunk), self._deadline)
            else:
                samples = self._decoder.feed(chunk)
        return await self._detect(samples)

    async def finish(self) -> tuple[list[SpeechEvent], VadResult]:
        """The events left and every segment, once the caller has sent all its audio."""
        time_left(self._deadline)
        events = await self._detect(self._decoder.finish())
        tail = self._buffer
        n_samples = self._n_samples
        tail_probabilities = np.zeros(0, np.float32)
        if len(tail):
            padded = np.concatenate([tail, np.zeros(FRAME_SAMPLES - len(tail), np.float32)])
            with self._telemetry.timed("vad"):
                tail_probabilities, self._state = await self._core.vad.probabilities(
                    padded, self._state, timeout_s=time_left(self._deadline)
                )
            self._buffer = np.zeros(0, np.float32)
        last, segments = self._segmenter.finish(n_samples, tail_probabilities)
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
