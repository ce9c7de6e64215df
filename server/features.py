"""GE2E preprocessing: silence trimming, power mel and the 1.6 s partial windows.

Matches what the GE2E encoder was trained on (resemblyzer): power (not log) mel with
n_fft 400 (25 ms), hop 160 (10 ms), 40 bands at 16 kHz; partials of 160 frames every
1/1.3 s, the last one kept when it covers at least 75 % of a window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from server.audio import SAMPLE_RATE, normalize_volume
from server.errors import NotEnoughSpeech

N_FFT = 400
HOP = 160
N_MELS = 40
PARTIAL_FRAMES = 160
PARTIAL_RATE = 1.3
MIN_COVERAGE = 0.75
# Energy-based trimming: 30 ms windows, quieter than TRIM_TOP_DB below the loudest window is
# silence, and pauses shorter than KEEP_PAUSE_S stay (as resemblyzer's dilation keeps them).
TRIM_WINDOW = 480
TRIM_TOP_DB = 40.0
KEEP_PAUSE_S = 0.2


@dataclass(frozen=True)
class Utterance:
    """An utterance ready for the encoder."""

    speech: np.ndarray  # trimmed, normalised 16 kHz waveform
    partials: np.ndarray  # [n, 160, 40] float32 power mel windows

    @property
    def speech_seconds(self) -> float:
        return len(self.speech) / SAMPLE_RATE


def prepare_utterance(wav: np.ndarray, min_speech_seconds: float = 0.5) -> Utterance:
    """Normalise, trim silence and cut the mel partials of a mono 16 kHz waveform."""
    speech = trim_silence(normalize_volume(wav))
    require_speech(len(speech), min_speech_seconds)
    return Utterance(speech=speech, partials=partial_windows(speech))


def require_speech(speech_samples: int, min_speech_seconds: float, field: str = "audio") -> float:
    """The seconds of `speech_samples` 16 kHz samples of trimmed speech; NotEnoughSpeech
    (naming `field`, the request's audio) below `min_speech_seconds`."""
    seconds = speech_samples / SAMPLE_RATE
    if seconds < min_speech_seconds:
        raise NotEnoughSpeech(
            f"{field} has {seconds:.2f} s of speech after silence trimming; "
            f"at least {min_speech_seconds:.2f} s is needed",
            field=field,
        )
    return seconds


def trim_silence(wav: np.ndarray) -> np.ndarray:
    """Drop silences longer than KEEP_PAUSE_S; an all-silent input comes back empty."""
    import librosa

    if len(wav) < TRIM_WINDOW or not np.any(wav):
        return wav[:0]
    intervals = librosa.effects.split(
        wav, top_db=TRIM_TOP_DB, frame_length=TRIM_WINDOW, hop_length=TRIM_WINDOW
    )
    if len(intervals) == 0:
        return wav[:0]
    keep_gap = int(KEEP_PAUSE_S * SAMPLE_RATE)
    merged = [list(intervals[0])]
    for start, end in intervals[1:]:
        if start - merged[-1][1] <= keep_gap:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return np.concatenate([wav[start:end] for start, end in merged]).astype(np.float32)


def segments_speech(wav: np.ndarray, segments: Sequence[tuple[int, int]]) -> np.ndarray:
    """The samples [start, end) of each segment, concatenated (trim "vad": the VAD's speech
    segments); an empty list gives an empty array."""
    if not segments:
        return wav[:0]
    return np.concatenate([wav[start:end] for start, end in segments]).astype(np.float32)


def power_mel(wav: np.ndarray, center: bool = True) -> np.ndarray:
    """Power mel spectrogram, frames first: [n_frames, 40] float32.

    `center`: frame t is centred on sample t * HOP, the signal zero-padded by N_FFT / 2 at both
    ends (librosa's default); else frame t starts at sample t * HOP and only whole frames count.
    """
    import librosa

    spectrum = np.abs(librosa.stft(wav, n_fft=N_FFT, hop_length=HOP, center=center)) ** 2
    return (_mel_basis() @ spectrum).astype(np.float32).T


def partial_slices(n_samples: int) -> list[slice]:
    """Mel-frame ranges of the partial windows for an utterance of `n_samples` samples."""
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    frame_step = int(np.round((SAMPLE_RATE / PARTIAL_RATE) / HOP))
    steps = max(1, n_frames - PARTIAL_FRAMES + frame_step + 1)
    slices = [slice(i, i + PARTIAL_FRAMES) for i in range(0, steps, frame_step)]
    last = slices[-1]
    coverage = (n_samples - last.start * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < MIN_COVERAGE and len(slices) > 1:
        slices.pop()
    return slices


def partial_windows(speech: np.ndarray) -> np.ndarray:
    """The [n, 160, 40] partial windows of a trimmed utterance (zero-padded at the end)."""
    slices = partial_slices(len(speech))
    needed = slices[-1].stop * HOP
    if needed >= len(speech):
        speech = np.pad(speech, (0, needed - len(speech)))
    mel = power_mel(speech)
    return np.stack([mel[s] for s in slices]).astype(np.float32)


def average_embedding(partial_embeddings: np.ndarray) -> np.ndarray:
    """The utterance embedding: mean of the partial embeddings, L2-normalised."""
    mean = partial_embeddings.astype(np.float64).mean(axis=0)
    norm = np.linalg.norm(mean)
    return (mean / norm if norm > 0 else mean).astype(np.float32)


@lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS).astype(np.float32)
