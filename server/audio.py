"""Decoding caller audio into one mono 16 kHz float32 waveform.

Pure functions over bytes and numpy arrays: no gRPC, no file paths from requests. Every limit
(`AudioLimits`) is checked before the samples are decoded where the header or the byte length
tells enough: sample rate, channels and declared duration. Decoding then runs block by block,
each block downmixed and resampled at once, and stops as soon as the duration limit is passed,
so memory stays bounded by the 16 kHz mono output (a compressed file of silence expands a
thousandfold) even when a header understates the length. Only the WAV, FLAC, OGG and MP3
parsers of libsndfile ever see request bytes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from server.errors import DeadlineExceeded, InvalidArgument, InvalidAudio

SAMPLE_RATE = 16_000
INT16_MAX = 2**15 - 1
# resemblyzer's target loudness; quieter audio is raised to it, louder is left alone.
TARGET_DBFS = -30.0
# Frames decoded (and converted, downmixed, resampled) at a time; also how often the deadline
# is checked. 64 Ki frames: 0.34 s at 192 kHz, 2 MiB at 8 float32 channels.
BLOCK_FRAMES = 65_536
# libsndfile's "frame count unknown" (SF_COUNT_MAX), for example a streamed FLAC.
UNKNOWN_FRAMES = 2**63 - 1
# The containers we decode (libsndfile knows many more; we do not expose their parsers).
ACCEPTED_FORMATS = frozenset({"WAV", "WAVEX", "FLAC", "OGG", "MP3"})
FORMATS_TEXT = "WAV, FLAC, OGG or MP3"


@dataclass(frozen=True)
class AudioLimits:
    """What a request's audio may be (`Settings.audio_limits`; settings in parentheses)."""

    max_seconds: float = 600.0  # before trimming (max_audio_seconds)
    min_sample_rate_hz: int = 8_000  # (min_sample_rate_hz)
    max_sample_rate_hz: int = 192_000  # (max_sample_rate_hz)
    max_channels: int = 8  # (max_channels)
    min_speech_seconds: float = 0.5  # after trimming, checked by features.require_speech


DEFAULT_LIMITS = AudioLimits()


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


def decode_content(
    content: bytes,
    limits: AudioLimits = DEFAULT_LIMITS,
    field: str = "audio.content",
    deadline: float | None = None,
) -> np.ndarray:
    """Decode a whole encoded file (WAV, FLAC, OGG, MP3) to mono 16 kHz float32.

    `field` names the bytes in errors; `deadline` (time.monotonic) stops a long decode.
    """
    import soundfile

    if not content:
        raise InvalidAudio(f"{field} is empty", field=field)
    if _container(content) is None:
        raise InvalidAudio(
            f"{field} is not a decodable audio file ({FORMATS_TEXT}): no such header at its start",
            field=field,
        )
    try:
        sound = soundfile.SoundFile(io.BytesIO(content))
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidAudio(
            f"{field} is not a decodable audio file ({FORMATS_TEXT}): {_reason(exc)}",
            field=field,
        ) from None
    with sound:
        if sound.format not in ACCEPTED_FORMATS:
            raise InvalidAudio(
                f"{field} is not a decodable audio file ({FORMATS_TEXT}): it is {sound.format}",
                field=field,
            )
        rate, channels = sound.samplerate, sound.channels
        _check_rate(rate, limits, field)
        _check_channels(channels, limits, field)
        if sound.frames >= UNKNOWN_FRAMES:  # libsndfile cannot read such a stream past a seek
            raise InvalidAudio(
                f"{field} does not state its length (a streamed FLAC?); encode it as a file",
                field=field,
            )
        if sound.frames / rate > limits.max_seconds:
            raise InvalidArgument(
                _too_long(field, sound.frames / rate, limits.max_seconds), field=field
            )

        def blocks() -> Iterator[np.ndarray]:
            while True:
                try:
                    block = sound.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
                except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
                    raise InvalidAudio(
                        f"{field} could not be decoded: {_reason(exc)}", field=field
                    ) from None
                if not len(block):
                    return
                yield block

        return _to_mono_16k(blocks(), rate, limits, field, deadline)


def decode_raw(
    raw: RawAudioSpec,
    limits: AudioLimits = DEFAULT_LIMITS,
    field: str = "audio.raw",
    deadline: float | None = None,
) -> np.ndarray:
    """Decode raw interleaved PCM to mono 16 kHz float32 (`field`: the RawAudio's path)."""
    channels = raw.channels or 1
    if raw.format is None:
        raise InvalidArgument(
            f"{field}.format is required (LINEAR16 or FLOAT32)", field=f"{field}.format"
        )
    _check_rate(raw.sample_rate_hz, limits, f"{field}.sample_rate_hz")
    _check_channels(channels, limits, f"{field}.channels")
    samples_field = f"{field}.samples"
    if not raw.samples:
        raise InvalidAudio(f"{samples_field} is empty", field=samples_field)
    dtype = np.dtype("<i2") if raw.format is SampleFormat.LINEAR16 else np.dtype("<f4")
    frame_bytes = dtype.itemsize * channels
    if len(raw.samples) % frame_bytes:
        raise InvalidAudio(
            f"{samples_field} has {len(raw.samples)} bytes, not a multiple of "
            f"{frame_bytes} ({channels} channel(s) of {raw.format.value})",
            field=samples_field,
        )
    n_frames = len(raw.samples) // frame_bytes
    seconds = n_frames / raw.sample_rate_hz
    if seconds > limits.max_seconds:
        raise InvalidArgument(
            _too_long(samples_field, seconds, limits.max_seconds), field=samples_field
        )
    samples = np.frombuffer(raw.samples, dtype=dtype).reshape(n_frames, channels)
    scale = np.float32(2**15)

    def blocks() -> Iterator[np.ndarray]:
        for start in range(0, n_frames, BLOCK_FRAMES):
            block = samples[start : start + BLOCK_FRAMES].astype(np.float32)
            yield block / scale if raw.format is SampleFormat.LINEAR16 else block

    return _to_mono_16k(blocks(), raw.sample_rate_hz, limits, samples_field, deadline)


def load_file(path: str, max_seconds: float = 3600.0) -> np.ndarray:
    """Read an audio file from disk (tools and tests only; requests never name files)."""
    with open(path, "rb") as handle:
        return decode_content(handle.read(), AudioLimits(max_seconds=max_seconds), str(path))


def normalize_volume(wav: np.ndarray, target_dbfs: float = TARGET_DBFS) -> np.ndarray:
    """Raise quiet audio to `target_dbfs` RMS (never lowers it), as GE2E was trained."""
    gain = volume_gain(float(np.mean((wav.astype(np.float64) * INT16_MAX) ** 2)), target_dbfs)
    if gain is None:
        return wav
    return (wav * gain).astype(np.float32)


def volume_gain(mean_square: float, target_dbfs: float = TARGET_DBFS) -> np.float32 | None:
    """The factor `normalize_volume` applies to audio whose mean square, in int16 units
    ((sample * 32767) ** 2), is `mean_square`; None when it leaves the audio as it is."""
    rms = float(np.sqrt(mean_square))
    if rms == 0.0:
        return None
    change_db = target_dbfs - 20.0 * np.log10(rms / INT16_MAX)
    if change_db < 0:
        return None
    return np.float32(10.0 ** (change_db / 20.0))


def _to_mono_16k(
    blocks: Iterator[np.ndarray],
    rate: int,
    limits: AudioLimits,
    field: str,
    deadline: float | None,
) -> np.ndarray:
    """Downmix, clip and resample [frames, channels] float32 blocks as they come.

    The streamed resampler gives bit for bit what one `soxr.resample` of the whole would.
    """
    import soxr

    resampler: Any = None
    if rate != SAMPLE_RATE:
        resampler = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
    max_frames = limits.max_seconds * rate
    parts: list[np.ndarray] = []
    frames = 0
    for block in blocks:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(f"deadline passed while decoding {field}")
        frames += len(block)
        if frames > max_frames:
            raise InvalidArgument(
                _too_long(field, frames / rate, limits.max_seconds, at_least=True), field=field
            )
        if not np.isfinite(block).all():
            raise InvalidAudio(f"{field} contains NaN or infinite samples", field=field)
        mono = np.clip(block.mean(axis=1, dtype=np.float32), -1.0, 1.0).astype(np.float32)
        parts.append(mono if resampler is None else resampler.resample_chunk(mono))
    if frames == 0:
        raise InvalidAudio(f"{field} holds no samples", field=field)
    if resampler is not None:
        parts.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    return np.concatenate(parts).astype(np.float32, copy=False)


def _container(content: bytes, offset: int = 0, tags: int = 0) -> str | None:
    """The container the first bytes announce, or None: libsndfile only ever parses these.

    ID3v2 tags in front are skipped as libsndfile skips them (10 bytes and the syncsafe size),
    so that what follows them must be one of ours too.
    """
    head = content[offset : offset + 12]
    if head[:4] in (b"RIFF", b"RIFX") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] == b"fLaC":
        return "FLAC"
    if head[:4] == b"OggS":
        return "OGG"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "MP3"  # an MPEG audio frame sync
    if head[:3] == b"ID3" and len(head) >= 10 and tags < 4:
        size = 0
        for byte in head[6:10]:
            size = size << 7 | (byte & 0x7F)
        return _container(content, offset + 10 + size, tags + 1)
    return None


def _check_rate(rate: int, limits: AudioLimits, field: str) -> None:
    low, high = limits.min_sample_rate_hz, limits.max_sample_rate_hz
    if not low <= rate <= high:
        raise InvalidArgument(
            f"{field}: sample rate {rate} Hz is outside the accepted {low}..{high} Hz",
            field=field,
        )


def _check_channels(channels: int, limits: AudioLimits, field: str) -> None:
    if not 1 <= channels <= limits.max_channels:
        raise InvalidArgument(
            f"{field}: {channels} channels; 1..{limits.max_channels} are accepted", field=field
        )


def _too_long(field: str, seconds: float, limit: float, at_least: bool = False) -> str:
    lasts = "at least " if at_least else ""
    return f"{field} lasts {lasts}{seconds:.1f} s, over the limit of {limit:g} s"


def _reason(exc: Exception) -> str:
    # libsndfile's messages name the problem ("Format not recognised") and hold no paths here,
    # since we only ever decode from memory.
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text.removeprefix("Error opening <_io.BytesIO object at ").split(">: ")[-1]
