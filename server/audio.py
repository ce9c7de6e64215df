"""Decoding caller audio into one mono 16 kHz float32 waveform.

Pure functions over bytes and numpy arrays: no gRPC, no file paths from requests.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from enum import Enum

import numpy as np

from server.errors import InvalidArgument, InvalidAudio

SAMPLE_RATE = 16_000
MIN_SOURCE_RATE = 8_000
MAX_SOURCE_RATE = 192_000
MAX_CHANNELS = 8
INT16_MAX = 2**15 - 1
# resemblyzer's target loudness; quieter audio is raised to it, louder is left alone.
TARGET_DBFS = -30.0


class SampleFormat(Enum):
    """Raw sample encodings, mirroring `voicegate.v1.SampleFormat`."""

    LINEAR16 = "LINEAR16"
    FLOAT32 = "FLOAT32"


@dataclass(frozen=True)
class RawAudioSpec:
    """Raw interleaved little-endian samples and how to read them."""

    samples: bytes
    format: SampleFormat | None
    sample_rate_hz: int
    channels: int = 1


def decode_content(content: bytes, max_seconds: float, field: str = "audio.content") -> np.ndarray:
    """Decode a whole encoded file (WAV, FLAC, OGG, MP3) to mono 16 kHz float32."""
    import soundfile

    if not content:
        raise InvalidAudio(f"{field} is empty")
    try:
        info = soundfile.info(io.BytesIO(content))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidAudio(
            f"{field} is not a decodable audio file (WAV, FLAC, OGG or MP3): {_reason(exc)}"
        ) from None
    _check_rate_and_channels(info.samplerate, info.channels, field)
    if info.frames > 0 and info.frames / info.samplerate > max_seconds:
        raise InvalidArgument(_too_long(field, info.frames / info.samplerate, max_seconds))
    try:
        frames, rate = soundfile.read(io.BytesIO(content), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidAudio(f"{field} could not be decoded: {_reason(exc)}") from None
    return _to_mono_16k(frames, rate, max_seconds, field)


def decode_raw(raw: RawAudioSpec, max_seconds: float, field: str = "audio.raw") -> np.ndarray:
    """Decode raw interleaved PCM to mono 16 kHz float32."""
    channels = raw.channels or 1
    if raw.format is None:
        raise InvalidArgument(f"{field}.format is required (LINEAR16 or FLOAT32)")
    _check_rate_and_channels(raw.sample_rate_hz, channels, field)
    if not raw.samples:
        raise InvalidAudio(f"{field}.samples is empty")
    dtype = np.dtype("<i2") if raw.format is SampleFormat.LINEAR16 else np.dtype("<f4")
    frame_bytes = dtype.itemsize * channels
    if len(raw.samples) % frame_bytes:
        raise InvalidAudio(
            f"{field}.samples has {len(raw.samples)} bytes, not a multiple of "
            f"{frame_bytes} ({channels} channel(s) of {raw.format.value})"
        )
    n_frames = len(raw.samples) // frame_bytes
    if n_frames / raw.sample_rate_hz > max_seconds:
        raise InvalidArgument(_too_long(field, n_frames / raw.sample_rate_hz, max_seconds))
    samples = np.frombuffer(raw.samples, dtype=dtype).reshape(n_frames, channels)
    if raw.format is SampleFormat.LINEAR16:
        frames = samples.astype(np.float32) / np.float32(2**15)
    else:
        frames = samples.astype(np.float32)
    return _to_mono_16k(frames, raw.sample_rate_hz, max_seconds, field)


def load_file(path: str, max_seconds: float = 3600.0) -> np.ndarray:
    """Read an audio file from disk (tools and tests only; requests never name files)."""
    with open(path, "rb") as handle:
        return decode_content(handle.read(), max_seconds, field=str(path))


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Raise quiet audio to `target_dbfs` RMS (never lowers it), as GE2E was trained."""
    rms = float(np.sqrt(np.mean((wav.astype(np.float64) * INT16_MAX) ** 2)))
    if rms == 0.0:
        return wav
    change_db = target_dbfs - 20.0 * np.log10(rms / INT16_MAX)
    if change_db < 0:
        return wav
    return (wav * np.float32(10.0 ** (change_db / 20.0))).astype(np.float32)


def _to_mono_16k(frames: np.ndarray, rate: int, max_seconds: float, field: str) -> np.ndarray:
    import soxr

    if frames.size == 0:
        raise InvalidAudio(f"{field} holds no samples")
    if frames.shape[0] / rate > max_seconds:
        raise InvalidArgument(_too_long(field, frames.shape[0] / rate, max_seconds))
    if not np.isfinite(frames).all():
        raise InvalidAudio(f"{field} contains NaN or infinite samples")
    mono = frames.mean(axis=1, dtype=np.float32) if frames.ndim == 2 else frames
    mono = np.clip(mono, -1.0, 1.0).astype(np.float32)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return mono


def _check_rate_and_channels(rate: int, channels: int, field: str) -> None:
    if not MIN_SOURCE_RATE <= rate <= MAX_SOURCE_RATE:
        raise InvalidArgument(
            f"{field} sample rate {rate} Hz is outside {MIN_SOURCE_RATE}..{MAX_SOURCE_RATE} Hz"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidArgument(f"{field} has {channels} channels; 1..{MAX_CHANNELS} are accepted")


def _too_long(field: str, seconds: float, limit: float) -> str:
    return f"{field} lasts {seconds:.1f} s, over the limit of {limit:.0f} s"


def _reason(exc: Exception) -> str:
    # libsndfile's messages name the problem ("Format not recognised") and hold no paths here,
    # since we only ever decode from memory.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.removeprefix("Error opening <_io.BytesIO object at ").split(">: ")[-1]
