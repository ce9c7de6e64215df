"""server/vad.py: silero's segmentation reproduced on probability arrays, and its streaming form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.errors import InvalidArgument
from server.vad import (
    FRAME_SAMPLES,
    EventKind,
    Segment,
    SpeechEvent,
    StreamingSegmenter,
    VadParams,
    speech_segments,
)

PARAM_CHOICES = {
    "threshold": [0.5, 0.3, 0.7],
    "min_speech_ms": [0, 100, 250, 500],
    "min_silence_ms": [0, 30, 100, 300],
    "speech_pad_ms": [0, 30, 100, 200],
    "max_speech_s": [math.inf, 1.0, 2.5],
}


def random_case(rng: np.random.Generator, trial: int) -> tuple[np.ndarray, int, dict[str, float]]:
    n = int(rng.integers(1, 400))
    # uniform noise, or a random walk through a sigmoid: runs of speech and silence
    walk = 1 / (1 + np.exp(-np.cumsum(rng.normal(0, 0.3, n))))
    probs = rng.random(n) if trial % 3 == 0 else walk
    n_samples = (n - 1) * FRAME_SAMPLES + int(rng.integers(1, FRAME_SAMPLES + 1))
    params = {name: float(rng.choice(values)) for name, values in PARAM_CHOICES.items()}
    return probs.astype(np.float32), n_samples, params


def stream(
    probs: np.ndarray, n_samples: int, params: VadParams, rng: np.random.Generator
) -> tuple[list[SpeechEvent], list[Segment]]:
    """Push the whole frames in random pieces, the partial last one at the end."""
    segmenter = StreamingSegmenter(params)
    events: list[SpeechEvent] = []
    whole = n_samples // FRAME_SAMPLES
    i = 0
    while i < whole:
        step = int(rng.integers(1, 20))
        events += segmenter.push(probs[i : min(i + step, whole)])
        i = min(i + step, whole)
    last, segments = segmenter.finish(n_samples, probs[whole:])
    return events + last, segments


def test_segments_equal_silero_on_random_probabilities() -> None:
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    rng = np.random.default_rng(0)
    for trial in range(1500):
        probs, n_samples, values = random_case(rng, trial)
        expected = get_speech_timestamps_from_probs(
            probs.tolist(),
            threshold=values["threshold"],
            min_speech_duration_ms=values["min_speech_ms"],
            min_silence_duration_ms=values["min_silence_ms"],
            speech_pad_ms=values["speech_pad_ms"],
            max_speech_duration_s=values["max_speech_s"],
            audio_length_samples=n_samples,
        )
        segments = speech_segments(probs, n_samples, VadParams(**values))
        got = [(s.start_sample, s.end_sample) for s in segments]
        assert got == [(d["start"], d["end"]) for d in expected], (trial, values)


def test_stream_events_are_the_final_segments_in_order() -> None:
    rng = np.random.default_rng(1)
    for trial in range(1500):
        probs, n_samples, values = random_case(rng, trial)
        params = VadParams(**values)
        events, segments = stream(probs, n_samples, params, rng)
        assert segments == speech_segments(probs, n_samples, params)
        expected = []
        for i, segment in enumerate(segments):
            expected.append((EventKind.SPEECH_START, i, segment.start_sample))
            expected.append((EventKind.SPEECH_END, i, segment.end_sample))
        assert [(e.kind, e.index, e.sample) for e in events] == expected, (trial, values)
        for event in events:
            assert event.sample <= event.decided_at
        decided = [e.decided_at for e in events]
        assert decided == sorted(decided)


def test_stream_latency_with_default_options() -> None:
    """Start known min_speech (250 ms, 8 frames) after the onset, end 160 ms after speech."""
    probs = np.array([0.0] * 20 + [0.9] * 40 + [0.0] * 30, np.float32)
    segmenter = StreamingSegmenter(VadParams())
    events: list[tuple[int, SpeechEvent]] = []
    for i, prob in enumerate(probs):
        events += [(i, e) for e in segmenter.push([prob])]
    (start_frame, start), (end_frame, end) = events
    onset, offset = 20 * FRAME_SAMPLES, 60 * FRAME_SAMPLES
    assert start.kind is EventKind.SPEECH_START and start.sample == onset - 480
    assert start.decided_at == onset + 8 * FRAME_SAMPLES  # 256 ms: speech > 250 ms
    assert end.kind is EventKind.SPEECH_END and end.sample == offset + 480
    assert end.decided_at == offset + 5 * FRAME_SAMPLES  # silence >= 100 ms seen at frame 4
    assert (start_frame, end_frame) == (27, 64)


def test_short_speech_is_never_announced() -> None:
    probs = np.array([0.0] * 10 + [0.9] * 5 + [0.0] * 30, np.float32)  # 160 ms of speech
    segmenter = StreamingSegmenter(VadParams())
    assert segmenter.push(probs) == []
    assert segmenter.finish(len(probs) * FRAME_SAMPLES) == ([], [])


def test_open_segment_ends_with_the_audio() -> None:
    probs = np.array([0.0] * 10 + [0.9] * 20, np.float32)
    n_samples = len(probs) * FRAME_SAMPLES - 100
    segmenter = StreamingSegmenter(VadParams())
    events = segmenter.push(probs[:-1])
    assert [e.kind for e in events] == [EventKind.SPEECH_START]
    last, segments = segmenter.finish(n_samples, probs[-1:])
    assert [e.kind for e in last] == [EventKind.SPEECH_END]
    assert segments[0].end_sample == n_samples
    assert segments[0].mean_probability == pytest.approx(0.9)


def test_defaults_are_silero_defaults() -> None:
    params = VadParams()
    assert (params.threshold, params.negative_threshold) == (0.5, pytest.approx(0.35))
    assert (params.min_speech_ms, params.min_silence_ms, params.speech_pad_ms) == (250, 100, 30)
    assert params.max_speech_s == math.inf
    assert VadParams(threshold=0.1).negative_threshold == 0.01


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"threshold": 0.0}, "options.threshold"),
        ({"threshold": 1.5}, "options.threshold"),
        ({"threshold": float("nan")}, "options.threshold"),
        ({"threshold": 0.5, "neg_threshold": 0.6}, "options.neg_threshold"),
        ({"min_speech_ms": -1}, "options.min_speech_duration_ms"),
        ({"min_silence_ms": 20_000}, "options.min_silence_duration_ms"),
        ({"speech_pad_ms": -5}, "options.speech_pad_ms"),
        ({"max_speech_s": 0.05}, "options.max_speech_duration_seconds"),
        ({"max_speech_s": -math.inf}, "options.max_speech_duration_seconds"),
    ],
)
def test_bad_params_name_the_field(values: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        VadParams.create("options.", **values)
    assert caught.value.message.startswith(field + " ")
    assert caught.value.field == field


def test_create_keeps_defaults_for_unset_values() -> None:
    assert VadParams.create(threshold=None) == VadParams()
    assert VadParams.create(speech_pad_ms=0).speech_pad_ms == 0
