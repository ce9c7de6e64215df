"""Decoding and preprocessing: real formats, raw PCM and every way audio can be wrong."""

import numpy as np
import pytest

from server.audio import (
    SAMPLE_RATE,
    AudioLimits,
    RawAudioSpec,
    SampleFormat,
    decode_content,
    decode_raw,
)
from server.errors import InvalidArgument, InvalidAudio, NotEnoughSpeech
from server.features import (
    PARTIAL_FRAMES,
    average_embedding,
    partial_slices,
    power_mel,
    prepare_utterance,
    recording_gain,
    scaled,
    trim_silence,
)
from tests.speech import tone, wav_bytes

LIMITS = AudioLimits(max_seconds=10)


@pytest.mark.parametrize(("fmt", "subtype"), [("WAV", "PCM_16"), ("FLAC", None), ("OGG", None)])
@pytest.mark.parametrize("rate", [8000, 44100])
def test_encoded_files_decode_to_mono_16k(fmt: str, subtype: str | None, rate: int) -> None:
    content = wav_bytes(tone(1.0, rate, channels=2), rate, fmt, subtype)
    wave = decode_content(content, LIMITS)
    assert wave.dtype == np.float32
    assert abs(len(wave) - SAMPLE_RATE) <= 64


def test_mp3_decodes() -> None:
    content = wav_bytes(tone(1.0, 44100), 44100, "MP3")
    wave = decode_content(content, LIMITS)
    assert abs(len(wave) / SAMPLE_RATE - 1.0) < 0.1


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "audio.content is empty"),
        (b"not audio at all" * 10, "not a decodable audio file"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", "not a decodable audio file"),
    ],
)
def test_bad_content_is_invalid_audio(content: bytes, message: str) -> None:
    with pytest.raises(InvalidAudio, match=message):
        decode_content(content, LIMITS)


def test_truncated_wav_still_decodes_what_is_there_or_fails_cleanly() -> None:
    content = wav_bytes(tone(1.0), SAMPLE_RATE, "WAV", "PCM_16")[:5000]
    try:
        wave = decode_content(content, LIMITS)
    except InvalidAudio:
        return
    assert 0 < len(wave) < SAMPLE_RATE


def test_too_long_content_is_rejected_before_decoding() -> None:
    content = wav_bytes(tone(3.0), SAMPLE_RATE, "WAV", "PCM_16")
    with pytest.raises(InvalidArgument, match="over the limit of 2 s"):
        decode_content(content, AudioLimits(max_seconds=2))


def test_raw_linear16_and_float32_agree() -> None:
    wave = tone(0.5)[:, 0]
    pcm16 = RawAudioSpec((wave * 32767).astype("<i2").tobytes(), SampleFormat.LINEAR16, 16000)
    f32 = RawAudioSpec(wave.astype("<f4").tobytes(), SampleFormat.FLOAT32, 16000)
    a = decode_raw(pcm16, LIMITS)
    b = decode_raw(f32, LIMITS)
    assert np.max(np.abs(a - b)) < 1e-3


def test_raw_stereo_is_downmixed() -> None:
    left = np.full(1600, 0.5, dtype="<f4")
    frames = np.stack([left, -left], axis=1).reshape(-1)
    wave = decode_raw(
        RawAudioSpec(frames.tobytes(), SampleFormat.FLOAT32, 16000, channels=2), LIMITS
    )
    assert np.allclose(wave, 0.0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (RawAudioSpec(b"\x00\x00", None, 16000), "format is required"),
        (RawAudioSpec(b"", SampleFormat.LINEAR16, 16000), "samples is empty"),
        (RawAudioSpec(b"\x00\x00\x00", SampleFormat.LINEAR16, 16000), "not a multiple of 2"),
        (RawAudioSpec(b"\x00" * 12, SampleFormat.FLOAT32, 16000, 2), "not a multiple of 8"),
        (
            RawAudioSpec(b"\x00\x00", SampleFormat.LINEAR16, 100),
            "audio.raw.sample_rate_hz: sample rate 100 Hz is outside the accepted 8000..192000 Hz",
        ),
        (
            RawAudioSpec(b"\x00\x00", SampleFormat.LINEAR16, 16000, 9),
            r"audio.raw.channels: 9 channels; 1\.\.8 are accepted",
        ),
        (
            RawAudioSpec(np.array([np.nan], "<f4").tobytes(), SampleFormat.FLOAT32, 16000),
            "NaN or infinite",
        ),
    ],
)
def test_bad_raw_audio_names_the_problem(raw: RawAudioSpec, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        decode_raw(raw, LIMITS)


def test_recording_gain_raises_quiet_audio_only() -> None:
    quiet = tone(1.0)[:, 0] * 0.001
    loud = tone(1.0)[:, 0]
    raised = scaled(quiet, recording_gain(quiet))
    rms_dbfs = 20 * np.log10(np.sqrt(np.mean((raised.astype(np.float64) * 32767) ** 2)) / 32767)
    assert rms_dbfs == pytest.approx(-30.0, abs=0.01)
    assert recording_gain(loud) is None and scaled(loud, None) is loud
    assert recording_gain(np.zeros(10, np.float32)) is None


def test_trim_silence_drops_long_silences_and_keeps_short_pauses() -> None:
    speech = tone(1.0)[:, 0]
    silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
    short_pause = np.zeros(SAMPLE_RATE // 10, dtype=np.float32)
    trimmed = trim_silence(np.concatenate([silence, speech, silence, speech, silence]))
    assert abs(len(trimmed) - 2 * SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    kept = trim_silence(np.concatenate([speech, short_pause, speech]))
    assert len(kept) >= 2 * SAMPLE_RATE + len(short_pause) - 960
    assert len(trim_silence(silence)) == 0


def test_power_mel_matches_ge2e_framing() -> None:
    mel = power_mel(tone(1.0)[:, 0])
    assert mel.shape == (101, 40)
    assert mel.dtype == np.float32
    assert (mel >= 0).all()


def test_partial_slices_follow_resemblyzer() -> None:
    # 4 s at 16 kHz: 401 frames, a window every 77 frames.
    slices = partial_slices(4 * SAMPLE_RATE)
    assert [s.start for s in slices] == [0, 77, 154, 231]
    assert all(s.stop - s.start == PARTIAL_FRAMES for s in slices)
    assert len(partial_slices(SAMPLE_RATE // 2)) == 1


def test_prepare_utterance_rejects_too_little_speech() -> None:
    with pytest.raises(NotEnoughSpeech, match=r"at least 0\.50 s"):
        prepare_utterance(np.zeros(4 * SAMPLE_RATE, dtype=np.float32), 0.5)
    utterance = prepare_utterance(tone(2.0)[:, 0], 0.5)
    assert utterance.partials.shape[1:] == (160, 40)
    assert utterance.speech_seconds == pytest.approx(2.0, abs=0.05)


def test_average_embedding_is_unit_norm() -> None:
    partial = np.random.default_rng(0).random((5, 256)).astype(np.float32)
    assert np.linalg.norm(average_embedding(partial)) == pytest.approx(1.0, abs=1e-6)
