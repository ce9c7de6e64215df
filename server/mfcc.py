"""The MFCC verifier: a cheap second opinion fused with the GE2E cosine.

An utterance becomes one fixed-length vector of per-utterance statistics of its MFCC frames
(`mfcc_statistics`); two utterances are compared by the cosine of their vectors after
standardising each dimension with the dev-set mean and standard deviation stored in the
calibration (`mfcc_score`; `standardised_units` for many at once).

What it computes, and why (held-out EERs on the dev set's degraded cross-half trials, see
`server.calibration`; about 243 same-speaker and 59,000 different-speaker trials per variant,
two degradation seeds):
- c1..c20 from 40 log-mel bands between 100 Hz and 3.8 kHz (n_fft 512, hop 10 ms, a log floor
  80 dB below the utterance's loudest band), c0 (loudness) dropped. Full-band (0-8 kHz)
  cepstra were best on clean same-recording halves (4.5 % EER) but worst once one side was
  band-passed or noisy (16-17 %): their high bands describe the recording channel as much as
  the speaker. 100 Hz-3.8 kHz is what every degradation here (and a telephone) still passes.
- the cepstral mean (20 values): with the band limited it is the strongest single statistic;
  per-utterance CMN would remove it, and with it most of the speaker information.
- the frames' covariance as its matrix logarithm, upper triangle with the diagonal (210
  values): the covariance does not depend on the cepstral mean, so it is CMVN-aware by
  construction, and captures how the coefficients move together (vocal-tract dynamics);
  the matrix log (log-Euclidean metric) makes a cosine between covariances meaningful.
  It beat means + standard deviations (18-20 % EER), +delta standard deviations (18-19 %)
  and the plain covariance (11.5-14.9 %) with 11.5-12.0 %; deltas added nothing on top.
Cost: about 1.4 ms per second of speech on one core.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TypeAlias

import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 512
HOP = 160
N_MELS = 40
N_MFCC = 20
FMIN = 100.0
FMAX = 3800.0
# Log floor: mel energies more than LOG_FLOOR_DB below the utterance's loudest band are clamped.
LOG_FLOOR_DB = 80.0
# Eigenvalues of the covariance below this fraction of the largest are clamped before the log.
EIGEN_FLOOR = 1e-6
MIN_FRAMES = 2
MFCC_DIMENSION = N_MFCC + N_MFCC * (N_MFCC + 1) // 2


def mfcc_frames(speech: np.ndarray) -> np.ndarray:
    """MFCC frames c1..c20 of a 16 kHz waveform: [n_frames, 20] float64."""
    import librosa

    wav = np.asarray(speech, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"speech must be a 1-D waveform, got shape {wav.shape}")
    if len(wav) < N_FFT:
        wav = np.pad(wav, (0, N_FFT - len(wav)))
    spectrum = np.abs(librosa.stft(wav, n_fft=N_FFT, hop_length=HOP, center=True)) ** 2
    mel = _mel_basis() @ spectrum.astype(np.float64)
    peak = float(mel.max())
    floor = max(peak, 1e-20) * 10.0 ** (-LOG_FLOOR_DB / 10.0)
    log_mel = np.log(np.maximum(mel, floor))
    cepstra = _dct_matrix() @ log_mel  # [N_MFCC + 1, frames]
    return cepstra[1:].T


def mfcc_statistics(speech: np.ndarray) -> np.ndarray:
    """Fixed-length MFCC statistics of trimmed 16 kHz mono speech: [MFCC_DIMENSION] float32.

    The per-utterance cepstral mean (20 values) and the upper triangle, diagonal included, of
    the matrix logarithm of the frames' covariance (210 values); see the module docstring.
    """
    frames = mfcc_frames(speech)
    if len(frames) < MIN_FRAMES:
        frames = np.pad(frames, ((0, MIN_FRAMES - len(frames)), (0, 0)), mode="edge")
    mean = frames.mean(axis=0)
    centred = frames - mean
    covariance = centred.T @ centred / len(centred)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    floor = max(float(eigenvalues.max()), 1e-12) * EIGEN_FLOOR
    log_cov = (eigenvectors * np.log(np.maximum(eigenvalues, floor))) @ eigenvectors.T
    upper = log_cov[np.triu_indices(N_MFCC)]
    return np.concatenate([mean, upper]).astype(np.float32)


class MfccNormalization:
    """The per-dimension (mean, std) that standardises MFCC statistics, as float64 arrays
    converted and checked once (`Calibration.mfcc_normalization` keeps one)."""

    __slots__ = ("mean", "std")

    def __init__(self, mean: Sequence[float] | np.ndarray, std: Sequence[float] | np.ndarray):
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if self.mean.ndim != 1 or self.std.shape != self.mean.shape:
            raise ValueError(
                f"normalization has {self.mean.size}/{self.std.size} values: mean and std must "
                "be vectors of one length"
            )

    @classmethod
    def of(cls, normalization: Normalization) -> MfccNormalization:
        """`normalization` itself, or one made of a (mean, std) pair."""
        if isinstance(normalization, MfccNormalization):
            return normalization
        return cls(normalization[0], normalization[1])

    def standardise(self, statistics: np.ndarray) -> np.ndarray:
        """(statistics - mean) / std in float64; the last axis must match the normalization."""
        values = np.asarray(statistics, dtype=np.float64)
        if values.shape[-1:] != self.mean.shape:
            raise ValueError(
                f"normalization has {self.mean.size}/{self.std.size} values for "
                f"{values.shape[-1] if values.ndim else 0}-dimensional statistics"
            )
        return (values - self.mean) / self.std


# A normalization, or its (mean, std) as sequences.
Normalization: TypeAlias = MfccNormalization | tuple[Sequence[float], Sequence[float]]


def standardised_units(statistics: np.ndarray, normalization: Normalization) -> np.ndarray:
    """Rows of `mfcc_statistics` [n, MFCC_DIMENSION] standardised and made unit length (a zero
    row stays zero): their dot products are `mfcc_score`s, as the index and calibration use."""
    z = MfccNormalization.of(normalization).standardise(statistics)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.where(norms > 0, norms, 1.0)


def mfcc_score(a: np.ndarray, b: np.ndarray, normalization: Normalization | None = None) -> float:
    """Cosine of two `mfcc_statistics` vectors after standardising with (mean, std)."""
    va = np.asarray(a, dtype=np.float64)
    vb = np.asarray(b, dtype=np.float64)
    if va.shape != vb.shape or va.ndim != 1:
        raise ValueError(f"MFCC statistics must be equal-length vectors: {va.shape} vs {vb.shape}")
    if normalization is not None:
        norm = MfccNormalization.of(normalization)
        va = norm.standardise(va)
        vb = norm.standardise(vb)
    denominator = float(np.linalg.norm(va) * np.linalg.norm(vb))
    if denominator == 0.0:
        return 0.0
    return float(np.clip(va @ vb / denominator, -1.0, 1.0))


@lru_cache(maxsize=1)
def _mel_basis() -> np.ndarray:
    import librosa

    return librosa.filters.mel(
        sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=FMIN, fmax=FMAX
    ).astype(np.float64)


@lru_cache(maxsize=1)
def _dct_matrix() -> np.ndarray:
    """Orthonormal DCT-II rows 0..N_MFCC over the N_MELS log-mel bands."""
    n = np.arange(N_MELS)
    k = np.arange(N_MFCC + 1)[:, None]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * N_MELS)) * np.sqrt(2.0 / N_MELS)
    basis[0] /= np.sqrt(2.0)
    return basis
