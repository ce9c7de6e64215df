"""Speech segments from Silero VAD's per-frame speech probabilities: pure, no gRPC, no Triton.

`speech_segments` is silero_vad's `get_speech_timestamps` (silero-vad 6, `utils_vad.py`,
`get_speech_timestamps_from_probs`) over a probability array: the same hysteresis (start at
`threshold`, end after `min_silence_ms` below `neg_threshold`), the same dropping of segments
not longer than `min_speech_ms`, the same splitting at `max_speech_s` (at the longest silence of
more than 98 ms inside the segment, else right there) and the same padding (each side by
`speech_pad_ms`; a gap shorter than two pads is split between its neighbours), sample for
sample, so that its boundaries equal silero's own for the same probabilities.

`StreamingSegmenter` runs the same detector one probability at a time and reports each
boundary as soon as no later audio can change it (its segments at the end equal
`speech_segments` of all the probabilities):

- a start is known once the segment is sure to be kept: its speech has lasted more than
  `min_speech_ms` (a segment not longer than that is dropped), that is `min_speech_ms` rounded
  up to a whole frame after the unpadded start (by default 256 ms after it, 286 ms after the
  padded start that is reported);
- an end is known once `min_silence_ms` of silence have followed it (rounded up to a whole
  frame, plus the frame that shows it) and, when `min_silence_ms` is shorter than two pads,
  once the next segment's start or `2 * speech_pad_ms` of audio after the end settles how the
  gap is shared (default: 160 ms after the unpadded end, 130 ms after the padded end);
- a cut at `max_speech_s` is known when it is made; an open segment ends at the end of the
  audio.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from server.audio import SAMPLE_RATE
from server.errors import InvalidArgument

FRAME_SAMPLES = 512  # one probability per 32 ms frame at 16 kHz
# silero's `min_silence_at_max_speech` (ms): silences longer than this inside a segment are
# where a segment over `max_speech_s` may be cut.
MIN_SILENCE_AT_MAX_SPEECH_MS = 98

# Upper bounds of the tunables (a caller's value above them is rejected).
MAX_DURATION_MS = 10_000
MAX_SPEECH_SECONDS_LIMIT = 86_400.0


@dataclass(frozen=True)
class VadParams:
    """The tunables of `get_speech_timestamps`, with its defaults.

    `neg_threshold` None means silero's default, `max(threshold - 0.15, 0.01)`.
    """

    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_ms: float = 250.0
    min_silence_ms: float = 100.0
    speech_pad_ms: float = 30.0
    max_speech_s: float = math.inf

    def __post_init__(self) -> None:
        self.validate()

    @property
    def negative_threshold(self) -> float:
        if self.neg_threshold is not None:
            return self.neg_threshold
        return max(self.threshold - 0.15, 0.01)

    def validate(self, prefix: str = "") -> None:
        """InvalidArgument naming the field (`prefix` + its API name) of the first bad value."""

        def bad(name: str, why: str, value: float) -> InvalidArgument:
            return InvalidArgument(f"{prefix}{name} {why}, got {value:g}", field=prefix + name)

        if not 0.0 < self.threshold <= 1.0:
            raise bad("threshold", "must be in (0, 1]", self.threshold)
        neg = self.neg_threshold
        if neg is not None and not 0.0 < neg <= self.threshold:
            raise bad("neg_threshold", f"must be in (0, threshold={self.threshold:g}]", neg)
        durations = (
            ("min_speech_duration_ms", self.min_speech_ms),
            ("min_silence_duration_ms", self.min_silence_ms),
            ("speech_pad_ms", self.speech_pad_ms),
        )
        for name, value in durations:
            if not 0.0 <= value <= MAX_DURATION_MS:
                raise bad(name, f"must be 0..{MAX_DURATION_MS} ms", value)
        # silero cuts a segment at max_speech - one frame - two pads: that must stay positive.
        shortest = FRAME_SAMPLES / SAMPLE_RATE + 2 * self.speech_pad_ms / 1000.0
        longest = self.max_speech_s
        if not (longest == math.inf or shortest < longest <= MAX_SPEECH_SECONDS_LIMIT):
            raise bad(
                "max_speech_duration_seconds",
                f"must exceed 0.032 s + 2 * speech_pad_ms (here {shortest:g} s) and be at most "
                f"{MAX_SPEECH_SECONDS_LIMIT:g} s (or unset: no limit)",
                longest,
            )

    @classmethod
    def create(
        cls,
        prefix: str = "",
        *,
        threshold: float | None = None,
        neg_threshold: float | None = None,
        min_speech_ms: float | None = None,
        min_silence_ms: float | None = None,
        speech_pad_ms: float | None = None,
        max_speech_s: float | None = None,
    ) -> VadParams:
        """Params from optional values (None: the default); errors name `prefix` + the field."""
        default = cls()
        params = dataclasses.replace(default)  # validated defaults, then the caller's values
        values = {
            "threshold": threshold,
            "neg_threshold": neg_threshold,
            "min_speech_ms": min_speech_ms,
            "min_silence_ms": min_silence_ms,
            "speech_pad_ms": speech_pad_ms,
            "max_speech_s": max_speech_s,
        }
        for name, value in values.items():
            if value is not None:
                object.__setattr__(params, name, float(value))
        params.validate(prefix)
        return params


@dataclass(frozen=True)
class Segment:
    """One speech segment, padded, in 16 kHz samples [start, end)."""

    start_sample: int
    end_sample: int
    mean_probability: float

    @property
    def start_seconds(self) -> float:
        return self.start_sample / SAMPLE_RATE

    @property
    def end_seconds(self) -> float:
        return self.end_sample / SAMPLE_RATE

    @property
    def seconds(self) -> float:
        return (self.end_sample - self.start_sample) / SAMPLE_RATE


class EventKind(Enum):
    SPEECH_START = "SPEECH_START"
    SPEECH_END = "SPEECH_END"


@dataclass(frozen=True)
class SpeechEvent:
    """A boundary of segment `index`, at `sample` (padded), known after `decided_at` samples."""

    kind: EventKind
    index: int
    sample: int
    decided_at: int

    @property
    def seconds(self) -> float:
        return self.sample / SAMPLE_RATE

    @property
    def decided_at_seconds(self) -> float:
        return self.decided_at / SAMPLE_RATE


class _Detector:
    """The loop of silero's `get_speech_timestamps_from_probs` (with its default
    `use_max_poss_sil_at_max_speech=True`), one probability per `step`.

    `kept` collects the unpadded segments [start, end) in samples, as silero's `speeches` before
    padding. `0` means "unset" for `temp_end`, as in silero.

    silero's `prev_end` and `next_start` are left out: with `use_max_poss_sil_at_max_speech`
    `prev_end` is set only inside the cut at `max_speech_s`, and reset to 0 in the same step,
    so it is 0 whenever silero reads it elsewhere; its branches `if next_start < prev_end`
    (next_start is never negative) and `elif prev_end:` (the legacy cut) never run.
    """

    def __init__(self, params: VadParams) -> None:
        sr = SAMPLE_RATE
        self.threshold = params.threshold
        self.neg_threshold = params.negative_threshold
        self.min_speech_samples = sr * params.min_speech_ms / 1000
        self.speech_pad_samples = sr * params.speech_pad_ms / 1000
        self.max_speech_samples = (
            sr * params.max_speech_s - FRAME_SAMPLES - 2 * self.speech_pad_samples
        )
        self.min_silence_samples = sr * params.min_silence_ms / 1000
        self.min_silence_samples_at_max_speech = sr * MIN_SILENCE_AT_MAX_SPEECH_MS / 1000
        self.frames = 0
        self.triggered = False
        self.start: int | None = None  # silero's current_speech['start']
        self.temp_end = 0
        self.possible_ends: list[tuple[int, int]] = []
        self.kept: list[tuple[int, int]] = []

    def step(self, prob: float) -> None:
        cur_sample = FRAME_SAMPLES * self.frames
        self.frames += 1
        threshold = self.threshold

        if prob >= threshold and self.temp_end:
            sil_dur = cur_sample - self.temp_end
            if sil_dur > self.min_silence_samples_at_max_speech:
                self.possible_ends.append((self.temp_end, sil_dur))
            self.temp_end = 0

        if prob >= threshold and not self.triggered:
            self.triggered = True
            self.start = cur_sample
            return

        if (
            self.triggered
            and self.start is not None
            and cur_sample - self.start > self.max_speech_samples
        ):
            if self.possible_ends:
                # the longest silence inside the segment (the first of equal ones)
                prev_end, dur = max(self.possible_ends, key=lambda x: x[1])
                self.kept.append((self.start, prev_end))
                self.start = None
                next_start = prev_end + dur
                if next_start < prev_end + cur_sample:
                    self.start = next_start
                else:
                    self.triggered = False
                self.temp_end = 0
                self.possible_ends = []
            else:
                self.kept.append((self.start, cur_sample))
                self.start = None
                self.temp_end = 0
                self.triggered = False
                self.possible_ends = []
                return

        if prob < self.neg_threshold and self.triggered:
            if not self.temp_end:
                self.temp_end = cur_sample
            sil_dur_now = cur_sample - self.temp_end
            if sil_dur_now < self.min_silence_samples:
                return
            end = self.temp_end
            if self.start is not None and end - self.start > self.min_speech_samples:
                self.kept.append((self.start, end))
            self.start = None
            self.temp_end = 0
            self.triggered = False
            self.possible_ends = []

    def finish(self, n_samples: int) -> None:
        """The end of the audio (`n_samples` long): an open segment long enough is kept."""
        if self.start is not None and (n_samples - self.start) > self.min_speech_samples:
            self.kept.append((self.start, n_samples))
        self.start = None
        self.triggered = False

    def open_segment_is_kept(self) -> bool:
        """True when the open segment will be in `kept` whatever the probabilities to come."""
        if self.start is None:
            return False
        received = FRAME_SAMPLES * self.frames  # the audio is at least this long
        if received - self.start <= self.min_speech_samples:
            return False
        return not self.temp_end or self.temp_end - self.start > self.min_speech_samples


def _padded_start(start: int, previous_end: int | None, pad: float) -> int:
    """silero's padding of a segment's start (needs only the previous segment's unpadded end;
    None: the first segment)."""
    if previous_end is None:
        return int(max(0, start - pad))
    silence_duration = start - previous_end
    if silence_duration < 2 * pad:
        return int(max(0, start - silence_duration // 2))
    return int(max(0, start - pad))


def _padded_end(end: int, next_start: int | None, pad: float, n_samples: int) -> int:
    """silero's padding of a segment's end (needs the next segment's unpadded start; None: the
    last segment, padded up to the audio's length `n_samples`)."""
    if next_start is not None:
        silence_duration = next_start - end
        if silence_duration < 2 * pad:
            return end + int(silence_duration // 2)
    return int(min(n_samples, end + pad))


def _segments(
    raw: Sequence[tuple[int, int]], probabilities: np.ndarray, n_samples: int, pad: float
) -> list[Segment]:
    segments = []
    for i, (start, end) in enumerate(raw):
        # mean over the frames the detector counted as speech (before padding)
        first, last = start // FRAME_SAMPLES, -(-end // FRAME_SAMPLES)
        frames = probabilities[first:last]
        mean = float(frames.mean()) if len(frames) else 0.0
        previous_end = raw[i - 1][1] if i > 0 else None
        next_start = raw[i + 1][0] if i + 1 < len(raw) else None
        segments.append(
            Segment(
                start_sample=_padded_start(start, previous_end, pad),
                end_sample=_padded_end(end, next_start, pad, n_samples),
                mean_probability=mean,
            )
        )
    return segments


def frame_count(n_samples: int) -> int:
    """Probabilities silero computes for `n_samples` (the last frame zero-padded)."""
    return -(-n_samples // FRAME_SAMPLES)


def pad_to_frames(wav: np.ndarray) -> np.ndarray:
    """`wav` zero-padded to whole frames, as silero pads its last chunk."""
    short = -len(wav) % FRAME_SAMPLES
    return np.pad(wav, (0, short)) if short else wav


def speech_segments(
    probabilities: Sequence[float] | np.ndarray, n_samples: int, params: VadParams
) -> list[Segment]:
    """The padded speech segments of audio `n_samples` long (16 kHz) whose frames have these
    speech probabilities (one per 512 samples, the last frame zero-padded), as
    `get_speech_timestamps` finds them."""
    probs = np.asarray(probabilities, dtype=np.float64)
    detector = _Detector(params)
    for prob in probs.tolist():
        detector.step(prob)
    detector.finish(n_samples)
    return _segments(detector.kept, probs, n_samples, detector.speech_pad_samples)


@dataclass
class StreamingSegmenter:
    """`speech_segments` fed incrementally, with boundary events as soon as they are certain.

    `push` takes the probabilities of the next whole frames; `finish` takes the audio's length
    (the last, partial frame's probability pushed before it) and returns the remaining events
    and every segment. Memory: one float64 per frame (bounded by the caller's duration limit).
    """

    params: VadParams
    _detector: _Detector = field(init=False)
    _probabilities: list[np.ndarray] = field(init=False, default_factory=list)
    _started: int = field(init=False, default=0)
    _ended: int = field(init=False, default=0)
    _finished: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self._detector = _Detector(self.params)

    @property
    def detector(self) -> _Detector:
        """The detector's state so far, for callers that need what is already certain (read
        it, don't change it)."""
        return self._detector

    @property
    def reported_starts(self) -> int:
        """How many SPEECH_START events have been returned so far."""
        return self._started

    def push(self, probabilities: Iterable[float] | np.ndarray) -> list[SpeechEvent]:
        if self._finished:
            raise RuntimeError("push after finish")
        probs = np.asarray(probabilities, dtype=np.float64).reshape(-1)
        self._probabilities.append(probs)
        events: list[SpeechEvent] = []
        for prob in probs.tolist():
            self._detector.step(prob)
            self._collect(events)
        return events

    def finish(
        self, n_samples: int, tail: Iterable[float] | np.ndarray = ()
    ) -> tuple[list[SpeechEvent], list[Segment]]:
        """Events not reported yet and all segments of audio `n_samples` long.

        `tail`: the probability of the last, zero-padded partial frame, if there is one
        (`push` is for whole frames only: each pushed frame proves the audio that long).
        """
        if self._finished:
            raise RuntimeError("finish twice")
        self._finished = True
        detector = self._detector
        last = np.asarray(tail, dtype=np.float64).reshape(-1)
        self._probabilities.append(last)
        for prob in last.tolist():
            detector.step(prob)
        if detector.frames != frame_count(n_samples):
            raise ValueError(
                f"{detector.frames} probabilities for {n_samples} samples; "
                f"expected {frame_count(n_samples)}"
            )
        detector.finish(n_samples)
        probs = np.concatenate(self._probabilities) if self._probabilities else np.zeros(0)
        segments = _segments(detector.kept, probs, n_samples, detector.speech_pad_samples)
        decided = max(n_samples, detector.frames * FRAME_SAMPLES)
        events = []
        for i, segment in enumerate(segments):
            if i >= self._started:
                events.append(SpeechEvent(EventKind.SPEECH_START, i, segment.start_sample, decided))
            if i >= self._ended:
                events.append(SpeechEvent(EventKind.SPEECH_END, i, segment.end_sample, decided))
        return events, segments

    def _collect(self, events: list[SpeechEvent]) -> None:
        detector = self._detector
        pad = detector.speech_pad_samples
        received = detector.frames * FRAME_SAMPLES
        kept = detector.kept
        # The segments known to be in the final list: every kept one, and the open one once it
        # is sure to be kept (its start is then final: padding needs only the previous end).
        # Segment i of that list is kept[i], or the open one at i == len(kept); no copy is made.
        n_known = len(kept)
        open_start = detector.start
        if detector.open_segment_is_kept():
            assert open_start is not None
            n_known += 1
        while True:
            if self._started == self._ended and self._started < n_known:
                i = self._started
                start = kept[i][0] if i < len(kept) else open_start
                assert start is not None
                previous_end = kept[i - 1][1] if i > 0 else None
                sample = _padded_start(start, previous_end, pad)
                events.append(SpeechEvent(EventKind.SPEECH_START, i, sample, received))
                self._started += 1
            elif self._ended < self._started and self._ended < len(kept):
                i = self._ended
                end = kept[i][1]
                if i + 1 < n_known:
                    next_start = kept[i + 1][0] if i + 1 < len(kept) else open_start
                    assert next_start is not None
                    sample = _padded_end(end, next_start, pad, received)
                else:
                    # No later segment is known: the end is end + pad once no segment can start
                    # within two pads of it (an open one starts after that, or none is open and
                    # 2 pads of audio have passed; later ones start after `received`).
                    opened = detector.start
                    later = opened if opened is not None else received
                    if later - end < 2 * pad:
                        break
                    sample = int(end + pad)
                events.append(SpeechEvent(EventKind.SPEECH_END, i, sample, received))
                self._ended += 1
            else:
                break
