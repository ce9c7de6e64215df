"""Helpers that turn dev speech into request payloads."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import soundfile

from server.api.voicegate.v1 import audio_pb2


def read(path: Path) -> tuple[np.ndarray, int]:
    samples, rate = soundfile.read(path, dtype="float32")
    return samples, rate


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


def content(samples: np.ndarray, rate: int, fmt: str = "WAV") -> audio_pb2.Audio:
    return audio_pb2.Audio(content=wav_bytes(samples, rate, fmt))


def raw16(samples: np.ndarray, rate: int) -> audio_pb2.Audio:
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    return audio_pb2.Audio(
        raw=audio_pb2.RawAudio(
            samples=pcm,
            format=audio_pb2.SAMPLE_FORMAT_LINEAR16,
            sample_rate_hz=rate,
            channels=1,
        )
    )


def halves(path: Path) -> tuple[audio_pb2.Audio, audio_pb2.Audio]:
    """The two halves of one recording, as two WAV files."""
    samples, rate = read(path)
    middle = len(samples) // 2
    return content(samples[:middle], rate), content(samples[middle:], rate)
