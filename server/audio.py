"""Decoding caller audio into one mono 16 kHz float32 waveform.

Functions over bytes and numpy arrays (`decode_audio` adds the request's telemetry around
them): no gRPC, no file paths from requests. Every limit (`AudioLimits`) is checked before the
samples are decoded where the header or the byte length tells enough: sample rate, channels and
declared duration. Decoding then runs block by block, each block downmixed and resampled at
once (`MonoConverter`, which raw streams use too), and stops as soon as the duration limit is
passed, so memory stays bounded by the 16 kHz mono output (a compressed file of silence expands
a thousandfold) even when a header understates the length. Only the WAV, FLAC, OGG and MP3
parsers of libsndfile ever see request bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from server.deadlines import time_left
from server.errors import InvalidArgument, InvalidAudio

if TYPE_CHECKING:
    from server.telemetry import Telemetry

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


# A request's audio: a whole encoded file, or raw samples.
AudioInput = bytes | RawAudioSpec


def decode_audio(
    audio: AudioInput,
    field: str,
    limits: AudioLimits,
    deadline: float | None,
    telemetry: Telemetry,
) -> np.ndarray:
    """A request's audio (`field`: its name, "audio" or "probe" say) decoded to mono 16 kHz
    float32 in a "decode" stage of `telemetry`, and counted as decoded audio."""
    from server.telemetry import (
        ATTR_AUDIO_BYTES,
        ATTR_AUDIO_SECONDS,
        ATTR_AUDIO_SOURCE,
        field_attributes,
    )

    if isinstance(audio, RawAudioSpec):
        source, size = "raw", len(audio.samples)
    else:
        source, size = "content", len(audio)
    attributes = {**field_attributes(field), ATTR_AUDIO_SOURCE: source, ATTR_AUDIO_BYTES: size}
    with telemetry.stage("decode", attributes) as span:
        if isinstance(audio, RawAudioSpec):
            wav = decode_raw(audio, limits, f"{field}.raw", deadline)
        else:
            wav = decode_content(audio, limits, f"{field}.content", deadline)
        seconds = len(wav) / SAMPLE_RATE
        span.set_attribute(ATTR_AUDIO_SECONDS, seconds)
    telemetry.count_audio("decoded", seconds)
    return wav


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
    sample_format, channels = check_raw_spec(
        raw.format, raw.sample_rate_hz, raw.channels, limits, field
    )
    samples_field = f"{field}.samples"
    if not raw.samples:
        raise InvalidAudio(f"{samples_field} is empty", field=samples_field)
    dtype = raw_dtype(sample_format)
    frame_bytes = dtype.itemsize * channels
    if len(raw.samples) % frame_bytes:
        raise InvalidAudio(
            f"{samples_field} has {len(raw.samples)} bytes, not a multiple of "
            f"{frame_bytes} ({channels} channel(s) of {sample_format.value})",
            field=samples_field,
        )
    n_frames = len(raw.samples) // frame_bytes
    seconds = n_frames / raw.sample_rate_hz
    if seconds > limits.max_seconds:
        raise InvalidArgument(
            _too_long(samples_field, seconds, limits.max_seconds), field=samples_field
        )
    samples = np.frombuffer(raw.samples, dtype=dtype).reshape(n_frames, channels)
    blocks = (samples[start : start + BLOCK_FRAMES] for start in range(0, n_frames, BLOCK_FRAMES))
    return _to_mono_16k(blocks, raw.sample_rate_hz, limits, samples_field, deadline)


def check_raw_spec(
    sample_format: SampleFormat | None,
    rate: int,
    channels: int,
    limits: AudioLimits,
    field: str,
) -> tuple[SampleFormat, int]:
    """The format and channel count (0 means 1) of raw samples described by `field` (a
    RawAudio or a stream's config); INVALID_ARGUMENT naming the sub-field that is wrong."""
    if sample_format is None:
        raise InvalidArgument(
            f"{field}.format is required (SAMPLE_FORMAT_LINEAR16 or SAMPLE_FORMAT_FLOAT32)",
            field=f"{field}.format",
        )
    channels = channels or 1
    _check_rate(rate, limits, f"{field}.sample_rate_hz")
    _check_channels(channels, limits, f"{field}.channels")
    return sample_format, channels


def raw_dtype(sample_format: SampleFormat) -> np.dtype[Any]:
    """The numpy type of one raw sample (little-endian)."""
    return np.dtype("<i2") if sample_format is SampleFormat.LINEAR16 else np.dtype("<f4")


class MonoConverter:
    """[frames, channels] blocks of samples at `rate` Hz, as they come, to mono 16 kHz float32.

    int16 blocks are scaled by 1/32768; float blocks must be finite (INVALID_ARGUMENT naming
    `field` otherwise). Each block is downmixed, clipped to [-1, 1] and fed to soxr's streaming
    resampler, which gives bit for bit what one `soxr.resample` of the whole would; `finish`
    returns what the resampler still holds.
    """

    def __init__(self, rate: int, field: str) -> None:
        import soxr

        self.frames = 0  # sample frames pushed, at the source rate
        self._field = field
        self._resampler: Any = None
        if rate != SAMPLE_RATE:
            self._resampler = soxr.ResampleStream(
                rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ"
            )

    def push(self, block: np.ndarray) -> np.ndarray:
        if block.dtype.kind == "i":
            block = block.astype(np.float32)
            block /= np.float32(2**15)
        else:
            block = block.astype(np.float32, copy=False)
            if not np.isfinite(block).all():
                raise InvalidAudio(
                    f"{self._field} contains NaN or infinite samples", field=self._field
                )
        self.frames += len(block)
        mono = np.clip(block.mean(axis=1, dtype=np.float32), -1.0, 1.0).astype(np.float32)
        if self._resampler is None:
            return mono
        out: np.ndarray = self._resampler.resample_chunk(mono)
        return out

    def finish(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, np.float32)
        out: np.ndarray = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
        return out


def load_file(path: str, max_seconds: float = 3600.0) -> np.ndarray:
    """Read an audio file from disk (tools and tests only; requests never name files)."""
    with open(path, "rb") as handle:
        return decode_content(handle.read(), AudioLimits(max_seconds=max_seconds), str(path))


def volume_gain(mean_square: float, target_dbfs: float = TARGET_DBFS) -> np.float32 | None:
    """The factor that raises quiet audio to `target_dbfs` RMS (never lowers it), as GE2E was
    trained, for audio whose mean square in int16 units ((sample * 32767) ** 2) is
    `mean_square`; None when it leaves the audio as it is. server/features.py applies it per
    partial window, and to the whole recording for the MFCC."""
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
    """Convert [frames, channels] blocks (`MonoConverter`) as they come, within the duration
    limit and the deadline."""
    converter = MonoConverter(rate, field)
    max_frames = limits.max_seconds * rate
    parts: list[np.ndarray] = []
    frames = 0
    for block in blocks:
        time_left(deadline, f"while decoding {field}")
        frames += len(block)
        if frames > max_frames:
            raise InvalidArgument(
                _too_long(field, frames / rate, limits.max_seconds, at_least=True), field=field
            )
        parts.append(converter.push(block))
    if frames == 0:
        raise InvalidAudio(f"{field} holds no samples", field=field)
    parts.append(converter.finish())
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
