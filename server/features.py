"""GE2E preprocessing: silence trimming, power mel and the 1.6 s partial windows.

Matches what the GE2E encoder was trained on (resemblyzer): power (not log) mel with
n_fft 400 (25 ms), hop 160 (10 ms), 40 bands at 16 kHz; partials of 160 frames every
1/1.3 s, the last one kept when it covers at least 75 % of a window.

Loudness, the one departure from resemblyzer: quiet speech is raised to -30 dBFS RMS per
partial window (the mean square of the speech samples the window covers), not per recording.
A recording's gain is known only at its end, so a stream could not encode any window before
then and would have to keep every mel frame; a window's gain is known once its 1.6 s are,
so StreamingEmbed encodes windows as they complete and holds only the window being filled
(server/streaming_embed.py). The mel is a power spectrum, mel(g x) = g^2 mel(x), so the gain
scales the window's frames. Dev-set EER is unchanged by it (benchmarks/gain.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from server.audio import INT16_MAX, SAMPLE_RATE, volume_gain
from server.errors import NotEnoughSpeech

N_FFT = 400
HOP = 160
N_MELS = 40
PARTIAL_FRAMES = 160
PARTIAL_RATE = 1.3
MIN_COVERAGE = 0.75
PARTIAL_STEP = int(np.round((SAMPLE_RATE / PARTIAL_RATE) / HOP))  # frames between windows: 77
# Energy-based trimming: 30 ms windows, quieter than TRIM_TOP_DB below the loudest window is
# silence, and pauses shorter than KEEP_PAUSE_S stay (as resemblyzer's dilation keeps them).
TRIM_WINDOW = 480
TRIM_TOP_DB = 40.0
KEEP_PAUSE_S = 0.2


@dataclass(frozen=True)
class Utterance:
    """An utterance ready for the encoder."""

    speech: np.ndarray  # trimmed 16 kHz waveform, raised to -30 dBFS as a whole (the MFCC's)
    partials: np.ndarray  # [n, 160, 40] float32 power mel windows, each loudness-normalised

    @property
    def speech_seconds(self) -> float:
        return len(self.speech) / SAMPLE_RATE


def prepare_utterance(wav: np.ndarray, min_speech_seconds: float = 0.5) -> Utterance:
    """Trim silence and cut the loudness-normalised mel partials of a mono 16 kHz waveform."""
    speech = trim_silence(wav)
    require_speech(len(speech), min_speech_seconds)
    return Utterance(speech=scaled(speech, recording_gain(wav)), partials=partial_windows(speech))


def recording_gain(wav: np.ndarray) -> np.float32 | None:
    """The factor raising the whole of `wav` to -30 dBFS RMS (None: loud enough already)."""
    if not len(wav):
        return None
    return volume_gain(float(np.mean((wav.astype(np.float64) * INT16_MAX) ** 2)))


def scaled(wav: np.ndarray, gain: np.float32 | None) -> np.ndarray:
    return wav if gain is None else (wav * gain).astype(np.float32)


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
    steps = max(1, n_frames - PARTIAL_FRAMES + PARTIAL_STEP + 1)
    slices = [slice(i, i + PARTIAL_FRAMES) for i in range(0, steps, PARTIAL_STEP)]
    last = slices[-1]
    coverage = (n_samples - last.start * HOP) / (PARTIAL_FRAMES * HOP)
    if coverage < MIN_COVERAGE and len(slices) > 1:
        slices.pop()
    return slices


def partial_windows(speech: np.ndarray) -> np.ndarray:
    """The [n, 160, 40] partial windows of a trimmed utterance (zero-padded at the end), each
    loudness-normalised (`normalised_partial`)."""
    speech_samples = len(speech)
    slices = partial_slices(speech_samples)
    needed = slices[-1].stop * HOP
    if needed >= speech_samples:
        speech = np.pad(speech, (0, needed - speech_samples))
    mel = power_mel(speech)
    energies = hop_energies(speech)
    return np.stack([normalised_partial(mel[s], energies[s], s, speech_samples) for s in slices])


def hop_energies(samples: np.ndarray) -> np.ndarray:
    """The sum of squares, in int16 units (float64), of each HOP-sample block of `samples`,
    the last block zero-filled. Each block's sum is taken over its own 160 samples, so the
    figures do not depend on how a stream cut the samples."""
    blocks = -(-len(samples) // HOP)
    wide = np.zeros(blocks * HOP, np.float64)
    wide[: len(samples)] = samples
    wide *= INT16_MAX
    wide = wide.reshape(blocks, HOP)
    return np.einsum("ij,ij->i", wide, wide)


def normalised_partial(
    frames: np.ndarray, energies: np.ndarray, window: slice, speech_samples: int
) -> np.ndarray:
    """The mel `frames` [160, 40] of partial `window` (frame numbers in an utterance of
    `speech_samples` samples), raised to -30 dBFS by the mean square of the speech samples the
    window covers; `energies`: the `hop_energies` of its blocks (those past the speech may be
    left out)."""
    if len(energies) < PARTIAL_FRAMES:  # summed over 160 always: the same rounding
        energies = np.pad(energies, (0, PARTIAL_FRAMES - len(energies)))
    covered = min(window.stop * HOP, speech_samples) - window.start * HOP
    gain = volume_gain(float(np.sum(energies)) / covered) if covered > 0 else None
    if gain is None:
        return frames.astype(np.float32, copy=True)
    return (frames * np.float32(float(gain) ** 2)).astype(np.float32)


def average_embedding(partial_embeddings: np.ndarray) -> np.ndarray:
    """The utterance embedding: mean of the partial embeddings, L2-normalised."""
    mean = EmbeddingMean()
    mean.add(partial_embeddings)
    return mean.result()


class EmbeddingMean:
    """`average_embedding` of partial embeddings that arrive in groups (StreamingEmbed): the
    rows are summed one at a time in float64, so the grouping cannot change the result."""

    def __init__(self) -> None:
        self._sum: np.ndarray | None = None
        self.count = 0

    def add(self, partial_embeddings: np.ndarray) -> None:
        for row in np.asarray(partial_embeddings, dtype=np.float64):
            self._sum = row.copy() if self._sum is None else self._sum + row
            self.count += 1

    def result(self) -> np.ndarray:
        if self._sum is None:
            raise ValueError("no partial embeddings")
        mean = self._sum / self.count
        norm = np.linalg.norm(mean)
        return (mean / norm if norm > 0 else mean).astype(np.float32)


@lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS).astype(np.float32)
