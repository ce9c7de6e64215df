"""Helpers that turn dev speech and test tones into request payloads, and read the errors."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import soundfile
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from server.api.voicegate.v1 import audio_pb2


def read(path: Path) -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(path, dtype="float32")
    return samples, rate


def tone(seconds: float, rate: int = 16_000, channels: int = 1) -> np.ndarray:
    """A 220 Hz sine at 0.3, float32 frames [n, channels]."""
    t = np.arange(int(seconds * rate)) / rate
    wave = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1)


def wav_bytes(
    samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = None
) -> bytes:
    """`samples` as an audio file in memory (WAV: 16-bit PCM unless `subtype` says otherwise)."""
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def content(samples: np.ndarray, rate: int, fmt: str = "WAV") -> audio_pb2.Audio:
    return audio_pb2.Audio(content=wav_bytes(samples, rate, fmt))


def pcm16(samples: np.ndarray, rounded: bool = False) -> bytes:
    """LINEAR16 bytes of float samples (scale 32767): clipped to [-1, 1] and truncated toward
    zero, or with `rounded` rounded to the nearest integer and clipped to the int16 range."""
    if rounded:
        return np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2").tobytes()
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def raw_audio(data: bytes, rate: int = 16_000, channels: int = 1) -> audio_pb2.Audio:
    """LINEAR16 `data` (interleaved) as `Audio.raw`."""
    return audio_pb2.Audio(
        raw=audio_pb2.RawAudio(
            samples=data,
            format=audio_pb2.SAMPLE_FORMAT_LINEAR16,
            sample_rate_hz=rate,
            channels=channels,
        )
    )


def raw16(samples: np.ndarray, rate: int) -> audio_pb2.Audio:
    """Float samples ([n] or frames [n, channels]) as truncated LINEAR16 `Audio.raw`."""
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    return raw_audio(pcm16(samples), rate, channels)


def clip(path: Path, seconds: float = 4.0) -> audio_pb2.Audio:
    """`seconds` of a recording from 1 s in, as a WAV file."""
    samples, rate = read(path)
    return content(samples[rate : rate + int(seconds * rate)], rate)


def long_audio(files: Sequence[Path], seconds: float) -> audio_pb2.Audio:
    """One WAV of about `seconds` of speech, dev files joined end to end."""
    parts, total, rate = [], 0.0, 16_000
    for path in files:
        samples, rate = read(path)
        parts.append(samples)
        total += len(samples) / rate
        if total >= seconds:
            break
    return content(np.concatenate(parts)[: int(seconds * rate)], rate)


def bad_request(error: grpc.aio.AioRpcError) -> error_details_pb2.FieldViolation:
    """The one field violation of a failed call's google.rpc.BadRequest detail (its
    google.rpc.Status must match the call's code and message)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == error.code().value[0] and status.message == error.details()
    (detail,) = status.details
    found = error_details_pb2.BadRequest()
    assert detail.Unpack(found)
    (violation,) = found.field_violations
    return violation


def halves(path: Path) -> tuple[audio_pb2.Audio, audio_pb2.Audio]:
    """The two halves of one recording, as two WAV files."""
    samples, rate = read(path)
    middle = len(samples) // 2
    return content(samples[:middle], rate), content(samples[middle:], rate)
