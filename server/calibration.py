"""Calibration of Verify's fused score: `voicegate calibrate`.

How it is calibrated. The dev set has one recording per speaker, so each recording is cut at a
pause near its middle into halves A and B, and B goes through one seeded random degradation
(coloured noise at 5-20 dB SNR, a 200-400 Hz to 3.0-3.8 kHz band-pass, a Vorbis/Opus/MP3
round-trip, or a -30..+12 dB gain change with clipping and 16-bit quantisation) before the
service's own preprocessing; a same-speaker trial pairs A_i with degraded B_i and a
different-speaker trial pairs A_i with degraded B_j, so no score comes from two clean pieces
of one recording. Each trial gets the GE2E cosine (the exported ONNX encoder run in-process
with ONNX Runtime) and the MFCC score. Speakers are dealt into 5 folds and every trial stays
within one fold; for each fold, the MFCC normalisation and a class-balanced logistic
regression `sigmoid(w1*ge2e + w2*mfcc + b)` are fitted on the other folds and score the held-out
one. The reported EERs (GE2E alone, MFCC alone, fused) come from these held-out scores only.
The threshold is the held-out equal-error point of the fused score, taken as a worst case over
two conditions: the degraded trials and the same pairs with B left clean (clean impostor pairs
score higher, degraded target pairs lower), so it holds in both; with a target FAR it is the
lowest threshold meeting it in both. The shipped weights and normalisation are then refitted on
all trials. Everything is seeded; the figures (counts, EERs per degradation, the operating
point) are stored with the weights.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from server.audio import SAMPLE_RATE, load_file
from server.core import prepare_wave
from server.errors import NotEnoughSpeech, VoicegateError
from server.features import Utterance, average_embedding
from server.fusion import TRIMS, Calibration
from server.mfcc import Normalization, mfcc_statistics, standardised_units
from server.vad import VadParams, pad_to_frames
from server.vad_model import OnnxVad

DEGRADATIONS = ("noise", "bandpass", "codec", "gain")
DEFAULT_FOLDS = 5
DEFAULT_IMPOSTORS = 40
# The service's own minimum (Settings.min_speech_seconds): shorter halves are skipped.
MIN_HALF_SECONDS = 0.5


class CalibrationError(VoicegateError):
    """The calibration could not run on the data or model it was given."""


# ---------------------------------------------------------------- degradations


def add_noise(wav: np.ndarray, snr_db: float, slope: float, rng: np.random.Generator) -> np.ndarray:
    """Add coloured Gaussian noise (power spectrum ~ 1/f**slope) at `snr_db` to the speech."""
    n = len(wav)
    white = rng.standard_normal(n)
    if slope:
        spectrum = np.fft.rfft(white)
        freqs = np.fft.rfftfreq(n, d=1.0 / SAMPLE_RATE)
        freqs[0] = freqs[1] if n > 1 else 1.0
        spectrum *= freqs ** (-slope / 2.0)
        white = np.fft.irfft(spectrum, n=n)
    signal_power = float(np.mean(wav.astype(np.float64) ** 2))
    noise_power = float(np.mean(white**2))
    if signal_power == 0.0 or noise_power == 0.0:
        return wav.astype(np.float32)
    scale = math.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return np.clip(wav + scale * white, -1.0, 1.0).astype(np.float32)


def band_pass(wav: np.ndarray, low_hz: float, high_hz: float, order: int = 4) -> np.ndarray:
    """Causal Butterworth band-pass, as a telephone or narrow-band channel would apply."""
    from scipy.signal import butter, sosfilt

    sos = butter(order, [low_hz, high_hz], btype="bandpass", fs=SAMPLE_RATE, output="sos")
    return np.clip(sosfilt(sos, wav.astype(np.float64)), -1.0, 1.0).astype(np.float32)


def codec_roundtrip(wav: np.ndarray, codec: str, compression: float) -> np.ndarray:
    """Encode and decode through libsndfile's lossy codecs (vorbis, opus, mp3)."""
    import soundfile

    formats = {"vorbis": ("OGG", "VORBIS"), "opus": ("OGG", "OPUS"), "mp3": ("MP3", None)}
    container, subtype = formats[codec]
    buffer = io.BytesIO()
    soundfile.write(
        buffer,
        wav.astype(np.float32),
        SAMPLE_RATE,
        format=container,
        subtype=subtype,
        compression_level=compression,
    )
    buffer.seek(0)
    decoded, _ = soundfile.read(buffer, dtype="float32", always_2d=False)
    return _same_length(np.asarray(decoded, dtype=np.float32), len(wav))


def change_gain(wav: np.ndarray, gain_db: float) -> np.ndarray:
    """Scale by `gain_db`, clip and quantise to 16 bits (loud gains clip, quiet ones lose bits)."""
    scaled = np.clip(wav.astype(np.float64) * 10.0 ** (gain_db / 20.0), -1.0, 1.0)
    return (np.round(scaled * 32767.0) / 32767.0).astype(np.float32)


def degrade(
    wav: np.ndarray, rng: np.random.Generator, kind: str | None = None
) -> tuple[np.ndarray, str]:
    """Apply one random degradation (or the named `kind`); returns (audio, description)."""
    kind = kind if kind is not None else str(rng.choice(DEGRADATIONS))
    if kind == "noise":
        snr = float(rng.uniform(5.0, 20.0))
        slope = float(rng.choice([0.0, 1.0, 2.0]))
        return add_noise(wav, snr, slope, rng), f"noise snr={snr:.1f}dB slope={slope:g}"
    if kind == "bandpass":
        low = float(rng.uniform(200.0, 400.0))
        high = float(rng.uniform(3000.0, 3800.0))
        return band_pass(wav, low, high), f"bandpass {low:.0f}-{high:.0f}Hz"
    if kind == "codec":
        codec = str(rng.choice(["vorbis", "opus", "mp3"]))
        compression = float(rng.uniform(0.5, 1.0))
        return codec_roundtrip(wav, codec, compression), f"codec {codec} level={compression:.2f}"
    if kind == "gain":
        gain = float(rng.uniform(-30.0, 12.0))
        return change_gain(wav, gain), f"gain {gain:+.1f}dB"
    raise ValueError(f"unknown degradation {kind!r}; expected one of {DEGRADATIONS}")


def _same_length(wav: np.ndarray, n: int) -> np.ndarray:
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    if len(wav) >= n:
        return wav[:n]
    return np.pad(wav, (0, n - len(wav)))


# ---------------------------------------------------------------- error rates


def error_rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> tuple[float, float]:
    """(false-accept rate, false-reject rate) when accepting scores >= threshold."""
    scores, labels = _check_scores(scores, labels)
    far = float(np.mean(scores[~labels] >= threshold))
    frr = float(np.mean(scores[labels] < threshold))
    return far, frr


def det_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAR and FRR for every candidate threshold (accept when score >= threshold).

    Returns (thresholds ascending, far, frr); the first threshold accepts everything and the
    last (+inf) rejects everything.
    """
    scores, labels = _check_scores(scores, labels)
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_labels = labels[order]
    n_target = int(labels.sum())
    n_impostor = len(labels) - n_target
    # Rejected below index k: targets sorted_labels[:k].sum(), impostors accepted from k on.
    cum_target = np.concatenate([[0], np.cumsum(sorted_labels)])
    cum_impostor = np.concatenate([[0], np.cumsum(~sorted_labels)])
    # Only thresholds between distinct scores are meaningful.
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_scores)) + 1, [len(scores)]])
    thresholds = np.concatenate([sorted_scores[starts[:-1]], [np.inf]])
    frr = cum_target[starts] / n_target
    far = (n_impostor - cum_impostor[starts]) / n_impostor
    return thresholds, far.astype(np.float64), frr.astype(np.float64)


def equal_error_rate(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(EER, threshold) for scores where higher means same speaker (labels True).

    The EER is where the FAR and FRR curves cross, linearly interpolated between the two
    neighbouring thresholds; the threshold returned is the one of those two whose FAR and FRR
    are closest (accept scores >= threshold).
    """
    thresholds, far, frr = det_curve(scores, labels)
    diff = far - frr  # +1 at the first threshold (accept all), -1 at +inf (reject all)
    k = int(np.flatnonzero(diff <= 0)[0])
    t = diff[k - 1] / (diff[k - 1] - diff[k])
    eer = float(far[k - 1] + t * (far[k] - far[k - 1]))
    best = k if abs(diff[k]) <= abs(diff[k - 1]) and np.isfinite(thresholds[k]) else k - 1
    return eer, float(thresholds[best])


def threshold_at_far(scores: np.ndarray, labels: np.ndarray, target_far: float) -> float:
    """The lowest threshold whose false-accept rate is at most `target_far`."""
    if not 0.0 <= target_far <= 1.0:
        raise ValueError(f"target_far must be within 0..1, got {target_far}")
    thresholds, far, _ = det_curve(scores, labels)
    k = int(np.flatnonzero(far <= target_far)[0])
    return float(thresholds[k]) if np.isfinite(thresholds[k]) else float(thresholds[k - 1])


def worst_case_threshold(
    conditions: Sequence[tuple[np.ndarray, np.ndarray]], target_far: float | None = None
) -> float:
    """A threshold that holds in every condition (each a (scores, labels) pair).

    At each candidate threshold take the worst FAR and the worst FRR over the conditions; return
    the candidate where the two are closest (the worst-case equal-error point), or with
    `target_far` the lowest candidate whose worst FAR is at most `target_far`. With one
    condition this is the EER threshold (or `threshold_at_far`).
    """
    if not conditions:
        raise ValueError("need at least one condition")
    checked = [_check_scores(scores, labels) for scores, labels in conditions]
    candidates = np.unique(np.concatenate([scores for scores, _ in checked]))
    worst_far = np.zeros(len(candidates))
    worst_frr = np.zeros(len(candidates))
    for scores, labels in checked:
        impostors = np.sort(scores[~labels])
        targets = np.sort(scores[labels])
        far = 1.0 - np.searchsorted(impostors, candidates, side="left") / len(impostors)
        frr = np.searchsorted(targets, candidates, side="left") / len(targets)
        worst_far = np.maximum(worst_far, far)
        worst_frr = np.maximum(worst_frr, frr)
    if target_far is not None:
        if not 0.0 <= target_far <= 1.0:
            raise ValueError(f"target_far must be within 0..1, got {target_far}")
        ok = np.flatnonzero(worst_far <= target_far)
        # Above the highest score everything is rejected; FAR 0 holds there.
        return float(candidates[ok[0]]) if len(ok) else float(np.nextafter(candidates[-1], np.inf))
    gap = np.abs(worst_far - worst_frr)
    best = np.flatnonzero(gap == gap.min())
    return float(candidates[best[np.argmin(np.maximum(worst_far, worst_frr)[best])]])


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores but {len(y)} labels")
    if not y.any() or y.all():
        raise ValueError("need both same-speaker and different-speaker trials")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, y


# ---------------------------------------------------------------- data and embeddings


class OnnxEncoder:
    """The exported GE2E encoder run in-process with ONNX Runtime (input mels, output embedding)."""

    def __init__(self, model_path: Path, threads: int = 1) -> None:
        import onnxruntime

        path = Path(model_path)
        if not path.is_file():
            raise CalibrationError(f"encoder model {path} does not exist (run `voicegate export`)")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own exception types
            raise CalibrationError(f"encoder model {path} cannot be loaded: {exc}") from None
        inputs = [i.name for i in self._session.get_inputs()]
        outputs = [o.name for o in self._session.get_outputs()]
        if inputs != ["mels"] or "embedding" not in outputs:
            raise CalibrationError(
                f"encoder model {path} has inputs {inputs} and outputs {outputs}; "
                "expected input 'mels' [B,160,40] and output 'embedding' [B,256]"
            )
        self.path = path

    def embed(self, utterance: Utterance) -> np.ndarray:
        """The utterance embedding (its partials in one batch, averaged, L2-normalised)."""
        return self.embed_partials(utterance.partials)

    def embed_partials(self, partials: np.ndarray) -> np.ndarray:
        (embeddings,) = self._session.run(["embedding"], {"mels": partials})
        return average_embedding(np.asarray(embeddings))


@dataclass(frozen=True)
class Side:
    """One half of a recording, ready to score."""

    embedding: np.ndarray
    statistics: np.ndarray
    seconds: float


@dataclass(frozen=True)
class Recording:
    """A dev recording split into a clean enrolment half A and a degraded test half B."""

    speaker: str
    name: str
    a: Side
    b: Side
    degradation: str  # the kind, one of DEGRADATIONS, or "none"
    detail: str
    b_clean: Side | None = None  # B before degradation: the same-recording reference


def speaker_of(path: Path) -> str:
    """LibriSpeech file names are SPEAKER-CHAPTER-UTTERANCE."""
    return path.name.split("-", 1)[0]


def dev_files(data_dir: Path) -> list[Path]:
    """One file per speaker (the first in name order when a speaker has several)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CalibrationError(f"data directory {data_dir} does not exist")
    chosen: dict[str, Path] = {}
    for path in sorted(data_dir.glob("*.flac")) + sorted(data_dir.glob("*.wav")):
        chosen.setdefault(speaker_of(path), path)
    if len(chosen) < 10:
        raise CalibrationError(
            f"data directory {data_dir} has {len(chosen)} speakers; at least 10 are needed"
        )
    return sorted(chosen.values(), key=lambda p: p.name)


def split_halves(wav: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cut at the quietest 10 ms frame near the middle (within 0.5 s and 1/8 of the length)."""
    middle = len(wav) // 2
    frame = SAMPLE_RATE // 100
    reach = min(SAMPLE_RATE // 2, len(wav) // 8)
    lo = max(0, middle - reach)
    hi = min(len(wav) - frame, middle + reach)
    if hi - lo <= frame:
        return wav[:middle], wav[middle:]
    starts = np.arange(lo, hi, frame)
    energies = [float(np.sum(wav[s : s + frame].astype(np.float64) ** 2)) for s in starts]
    cut = int(starts[int(np.argmin(energies))]) + frame // 2
    return wav[:cut], wav[cut:]


def prepare_half(wav: np.ndarray, vad: OnnxVad | None = None) -> Utterance:
    """One half of a split recording as the service prepares audio (`core.prepare_wave`):
    trim "energy", or with `vad` trim "vad" (the exported VAD run in process, in the windows
    the service sends to Triton, silero's default segment rules); NotEnoughSpeech under
    MIN_HALF_SECONDS of speech."""
    trim = None
    if vad is not None:
        trim = (vad.probabilities(pad_to_frames(wav)), VadParams(), vad.window_frames)
    return prepare_wave(wav, MIN_HALF_SECONDS, with_mfcc=True, vad=trim).utterance


def prepare_recordings(
    files: Sequence[Path],
    encoder: OnnxEncoder,
    rng: np.random.Generator,
    degrade_fraction: float = 1.0,
    clean_reference: bool = True,
    progress: Callable[[str], None] | None = None,
    vad: OnnxVad | None = None,
) -> tuple[list[Recording], list[str]]:
    """Split, degrade B, trim, embed and take MFCC statistics; returns (recordings, skipped).

    Each recording draws from `rng` in file order, so a seed fixes every degradation.
    """
    recordings: list[Recording] = []
    skipped: list[str] = []
    for index, path in enumerate(files):
        wav = load_file(str(path))
        first, second = split_halves(wav)
        if rng.random() < degrade_fraction:
            kind = str(rng.choice(DEGRADATIONS))
            degraded, detail = degrade(second, rng, kind)
        else:
            kind, detail, degraded = "none", "none", second
        try:
            a = prepare_half(first, vad)
            b = prepare_half(degraded, vad)
            b_clean = prepare_half(second, vad) if clean_reference else None
        except NotEnoughSpeech as exc:
            skipped.append(f"{path.name}: {exc.message}")
            continue
        recordings.append(
            Recording(
                speaker=speaker_of(path),
                name=path.name,
                a=_side(a, encoder),
                b=_side(b, encoder),
                degradation=kind,
                detail=detail,
                b_clean=None if b_clean is None else _side(b_clean, encoder),
            )
        )
        if progress is not None and (index + 1) % 50 == 0:
            progress(f"prepared {index + 1}/{len(files)} recordings")
    return recordings, skipped


def _side(utterance: Utterance, encoder: OnnxEncoder) -> Side:
    return Side(
        embedding=encoder.embed(utterance),
        statistics=mfcc_statistics(utterance.speech),
        seconds=utterance.speech_seconds,
    )


# ---------------------------------------------------------------- trials and fusion


@dataclass(frozen=True)
class Trials:
    """Pairs (A half of recording `enrol`, B half of recording `test`) with their fold."""

    enrol: np.ndarray
    test: np.ndarray
    labels: np.ndarray  # True: same speaker
    fold: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def assign_folds(n_recordings: int, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold of each recording: a seeded permutation dealt round-robin (one speaker each)."""
    if not 2 <= n_folds <= n_recordings:
        raise CalibrationError(f"need 2..{n_recordings} folds, got {n_folds}")
    folds = np.empty(n_recordings, dtype=np.int64)
    folds[rng.permutation(n_recordings)] = np.arange(n_recordings) % n_folds
    return folds


def build_trials(folds: np.ndarray, impostors: int, rng: np.random.Generator) -> Trials:
    """One same-speaker trial per recording and `impostors` different-speaker ones, all within
    the recording's fold, so every trial's two speakers are held out together."""
    enrol: list[int] = []
    test: list[int] = []
    for i, fold in enumerate(folds):
        enrol.append(i)
        test.append(i)
        others = np.flatnonzero((folds == fold) & (np.arange(len(folds)) != i))
        chosen = rng.choice(others, size=min(impostors, len(others)), replace=False)
        enrol.extend([i] * len(chosen))
        test.extend(int(j) for j in chosen)
    enrol_array = np.asarray(enrol, dtype=np.int64)
    test_array = np.asarray(test, dtype=np.int64)
    return Trials(
        enrol=enrol_array,
        test=test_array,
        labels=enrol_array == test_array,
        fold=folds[enrol_array],
    )


def ge2e_scores(recordings: Sequence[Recording], trials: Trials, clean: bool = False) -> np.ndarray:
    """Cosine of the (unit-norm) GE2E embeddings of each trial."""
    a = np.stack([r.a.embedding for r in recordings]).astype(np.float64)
    b = np.stack([_b(r, clean).embedding for r in recordings]).astype(np.float64)
    return np.einsum("ij,ij->i", a[trials.enrol], b[trials.test])


def mfcc_normalization(
    recordings: Sequence[Recording], subset: np.ndarray | None = None
) -> tuple[list[float], list[float]]:
    """Mean and std of the MFCC statistics over both halves of the (subset of) recordings."""
    chosen = [recordings[i] for i in subset] if subset is not None else list(recordings)
    stats = np.stack([s.statistics for r in chosen for s in (r.a, r.b)]).astype(np.float64)
    std = np.maximum(stats.std(axis=0), 1e-6)
    return stats.mean(axis=0).tolist(), std.tolist()


def mfcc_scores(
    recordings: Sequence[Recording],
    trials: Trials,
    normalization: Normalization,
    clean: bool = False,
) -> np.ndarray:
    """`mfcc_score` of each trial (vectorised; equal to calling it pair by pair)."""
    a = standardised_units(np.stack([r.a.statistics for r in recordings]), normalization)
    b = standardised_units(np.stack([_b(r, clean).statistics for r in recordings]), normalization)
    return np.clip(np.einsum("ij,ij->i", a[trials.enrol], b[trials.test]), -1.0, 1.0)


def fit_fusion(
    ge2e: np.ndarray, mfcc: np.ndarray, labels: np.ndarray
) -> tuple[float, float, float]:
    """Class-balanced logistic regression of the label on (ge2e, mfcc): (w_ge2e, w_mfcc, bias).

    Balanced classes make sigmoid(w . x + b) a same-speaker probability under equal priors.
    """
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(class_weight="balanced", C=100.0, max_iter=1000)
    model.fit(np.column_stack([ge2e, mfcc]), np.asarray(labels, dtype=bool))
    w_ge2e, w_mfcc = (float(w) for w in model.coef_[0])
    return w_ge2e, w_mfcc, float(model.intercept_[0])


def _b(recording: Recording, clean: bool) -> Side:
    if not clean:
        return recording.b
    if recording.b_clean is None:
        raise CalibrationError("clean reference scores need recordings prepared with it")
    return recording.b_clean


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


# ---------------------------------------------------------------- the calibration


@dataclass
class _HeldOut:
    ge2e: np.ndarray
    mfcc: np.ndarray
    fused: np.ndarray
    clean_ge2e: np.ndarray | None = None
    clean_fused: np.ndarray | None = None
    weights: list[list[float]] = field(default_factory=list)


def calibrate(
    data_dir: Path,
    model_path: Path,
    seed: int = 0,
    target_far: float | None = None,
    *,
    folds: int = DEFAULT_FOLDS,
    impostors: int = DEFAULT_IMPOSTORS,
    degrade_fraction: float = 1.0,
    clean_reference: bool = True,
    limit: int | None = None,
    progress: Callable[[str], None] | None = None,
    trim: str = "energy",
    vad_model_path: Path | None = None,
) -> Calibration:
    """Fit the fusion and its threshold on the dev recordings (see the module docstring).

    `trim`: the silence trim the service will run ("vad" needs `vad_model_path`, the exported
    VAD); `limit` keeps the first N speakers (tests); `progress` receives status messages.
    """
    from threadpoolctl import threadpool_limits

    if target_far is not None and not 0.0 < target_far < 1.0:
        raise CalibrationError(f"target_far must lie strictly between 0 and 1, got {target_far}")
    if not 0.0 <= degrade_fraction <= 1.0:
        raise CalibrationError(f"degrade_fraction must be within 0..1, got {degrade_fraction}")
    if impostors < 1:
        raise CalibrationError(f"impostors must be >= 1, got {impostors}")
    if trim not in TRIMS:
        raise CalibrationError(f"trim must be one of {list(TRIMS)}, got {trim!r}")
    started = time.monotonic()
    rng = np.random.default_rng(seed)
    files = dev_files(Path(data_dir))[:limit]
    with threadpool_limits(limits=1):
        encoder = OnnxEncoder(Path(model_path))
        vad = _onnx_vad(vad_model_path) if trim == "vad" else None
        recordings, skipped = prepare_recordings(
            files, encoder, rng, degrade_fraction, clean_reference, progress, vad
        )
        if len(recordings) < 2 * folds:
            raise CalibrationError(
                f"only {len(recordings)} recordings have {MIN_HALF_SECONDS} s of speech in both "
                f"halves; {2 * folds} are needed for {folds} folds"
            )
        fold_of = assign_folds(len(recordings), folds, rng)
        trials = build_trials(fold_of, impostors, rng)
        held = _cross_validate(recordings, trials, folds, clean_reference)
        normalization = mfcc_normalization(recordings)
        w_ge2e, w_mfcc, bias = fit_fusion(
            held.ge2e, mfcc_scores(recordings, trials, normalization), trials.labels
        )
    labels = trials.labels
    eer_fused, eer_threshold = equal_error_rate(held.fused, labels)
    conditions = [(held.fused, labels)]
    if held.clean_fused is not None:
        conditions.append((held.clean_fused, labels))
    threshold = float(np.clip(worst_case_threshold(conditions, target_far), 1e-6, 1.0 - 1e-6))
    goal = f"FAR <= {target_far:g}" if target_far is not None else "FAR = FRR"
    rule = (
        f"{goal} on held-out fused scores, worst case over "
        f"{'degraded-B and clean-B trials' if len(conditions) > 1 else 'degraded-B trials'}"
    )
    far, frr = error_rates(held.fused, labels, threshold)

    kinds = np.array([r.degradation for r in recordings])
    trial_kind = kinds[trials.test]
    figures: dict[str, Any] = {
        "seed": seed,
        "trim": trim,
        "model": _model_label(Path(model_path)),
        "model_sha256": _sha256(Path(model_path)),
        "recordings": len(recordings),
        "speakers": len({r.speaker for r in recordings}),
        "skipped": skipped,
        "folds": folds,
        "same_speaker_trials": int(labels.sum()),
        "different_speaker_trials": int((~labels).sum()),
        "degraded_fraction": round(float(np.mean(trial_kind != "none")), 4),
        "degradations": {k: int(np.sum(kinds == k)) for k in (*DEGRADATIONS, "none")},
        "half_speech_seconds_median": round(
            float(np.median([s.seconds for r in recordings for s in (r.a, r.b)])), 2
        ),
        "held_out_eer_percent": {
            "ge2e": _pct(equal_error_rate(held.ge2e, labels)[0]),
            "mfcc": _pct(equal_error_rate(held.mfcc, labels)[0]),
            "fused": _pct(eer_fused),
        },
        "held_out_eer_percent_by_degradation": _by_kind(held, labels, trial_kind),
        "operating_point": {
            "rule": rule,
            "target_far": target_far if target_far is not None else 0.0,
            "threshold": round(threshold, 6),
            "held_out_far_percent": _pct(far),
            "held_out_frr_percent": _pct(frr),
            "degraded_only_eer_threshold": round(eer_threshold, 6),
        },
        "fold_weights": held.weights,
        "one_same_speaker_miss_percent": _pct(1.0 / int(labels.sum())),
    }
    if held.clean_ge2e is not None and held.clean_fused is not None:
        clean_far, clean_frr = error_rates(held.clean_fused, labels, threshold)
        figures["clean_same_recording"] = {
            "note": "B half not degraded: the easier same-recording condition, for comparison",
            "eer_percent_ge2e": _pct(equal_error_rate(held.clean_ge2e, labels)[0]),
            "eer_percent_fused": _pct(equal_error_rate(held.clean_fused, labels)[0]),
            "far_percent_at_threshold": _pct(clean_far),
            "frr_percent_at_threshold": _pct(clean_frr),
        }
    figures["elapsed_s"] = round(time.monotonic() - started, 1)
    return Calibration(
        ge2e_weight=w_ge2e,
        mfcc_weight=w_mfcc,
        bias=bias,
        threshold=threshold,
        mfcc_mean=normalization[0],
        mfcc_std=normalization[1],
        method=METHOD.format(folds=folds, rule=rule),
        trained_on=(
            f"{Path(data_dir).name}: {len(recordings)} recordings, one per speaker, split in "
            f"halves with the second half degraded (seed {seed}); encoder {figures['model']}; "
            f"trim {trim}"
        ),
        figures=figures,
        trim=trim,
    )


METHOD = (
    "class-balanced logistic-regression fusion of the GE2E cosine and the MFCC score, "
    "speaker-disjoint {folds}-fold cross-validation on trials (clean half A, degraded half B); "
    "threshold: {rule}"
)


def _cross_validate(
    recordings: Sequence[Recording], trials: Trials, folds: int, clean_reference: bool
) -> _HeldOut:
    """Held-out scores: each fold scored by a fusion and MFCC normalisation fitted without it."""
    n = len(trials)
    ge2e = ge2e_scores(recordings, trials)
    clean_ge2e = ge2e_scores(recordings, trials, clean=True) if clean_reference else None
    held = _HeldOut(ge2e=ge2e, mfcc=np.zeros(n), fused=np.zeros(n))
    clean_fused = np.zeros(n) if clean_reference else None
    fold_of_recording = np.zeros(len(recordings), dtype=np.int64)
    fold_of_recording[trials.enrol] = trials.fold
    for k in range(folds):
        train_trials = trials.fold != k
        test_trials = ~train_trials
        normalization = mfcc_normalization(recordings, np.flatnonzero(fold_of_recording != k))
        mfcc = mfcc_scores(recordings, trials, normalization)
        w_ge2e, w_mfcc, bias = fit_fusion(
            ge2e[train_trials], mfcc[train_trials], trials.labels[train_trials]
        )
        held.weights.append([round(w_ge2e, 4), round(w_mfcc, 4), round(bias, 4)])
        held.mfcc[test_trials] = mfcc[test_trials]
        held.fused[test_trials] = _sigmoid(
            w_ge2e * ge2e[test_trials] + w_mfcc * mfcc[test_trials] + bias
        )
        if clean_fused is not None and clean_ge2e is not None:
            clean_mfcc = mfcc_scores(recordings, trials, normalization, clean=True)
            clean_fused[test_trials] = _sigmoid(
                w_ge2e * clean_ge2e[test_trials] + w_mfcc * clean_mfcc[test_trials] + bias
            )
    held.clean_ge2e = clean_ge2e
    held.clean_fused = clean_fused
    return held


def _by_kind(held: _HeldOut, labels: np.ndarray, trial_kind: np.ndarray) -> dict[str, Any]:
    """Held-out EERs when half B went through one kind of degradation (both trial classes)."""
    out: dict[str, Any] = {}
    for kind in (*DEGRADATIONS, "none"):
        mask = trial_kind == kind
        if not (labels[mask].any() and (~labels[mask]).any()):
            continue
        out[kind] = {
            "same_speaker_trials": int(labels[mask].sum()),
            "ge2e": _pct(equal_error_rate(held.ge2e[mask], labels[mask])[0]),
            "mfcc": _pct(equal_error_rate(held.mfcc[mask], labels[mask])[0]),
            "fused": _pct(equal_error_rate(held.fused[mask], labels[mask])[0]),
        }
    return out


def _pct(rate: float) -> float:
    return round(100.0 * rate, 2)


def _onnx_vad(path: Path | None) -> OnnxVad:
    if path is None or not Path(path).is_file():
        raise CalibrationError(f'trim "vad" needs the exported VAD model; {path} does not exist')
    return OnnxVad(Path(path))


def _model_label(path: Path) -> str:
    """`ge2e_int8/1/model.onnx` for a model repository layout, else the file name."""
    if path.parent.name.isdigit():
        return f"{path.parent.parent.name}/{path.parent.name}/{path.name}"
    return path.name


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- command


def main(
    data_dir: Path,
    model_path: Path,
    output: Path,
    seed: int = 0,
    target_far: float | None = None,
    trim: str = "energy",
    vad_model_path: Path | None = None,
) -> int:
    """`voicegate calibrate`: calibrate, write `output`, print the figures; exit status.

    `target_far`: the threshold meets this false-accept rate (None: the equal-error point);
    `trim`, `vad_model_path`: as `calibrate`.
    """
    import json
    import sys

    def progress(message: str) -> None:
        print(f"calibrate: {message}", file=sys.stderr, flush=True)

    try:
        calibration = calibrate(
            Path(data_dir),
            Path(model_path),
            seed=seed,
            target_far=target_far,
            progress=progress,
            trim=trim,
            vad_model_path=vad_model_path,
        )
        calibration.save(Path(output))
    except VoicegateError as exc:
        print(f"calibrate: error: {exc.message}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "ge2e_weight": round(calibration.ge2e_weight, 4),
                "mfcc_weight": round(calibration.mfcc_weight, 4),
                "bias": round(calibration.bias, 4),
                "threshold": round(calibration.threshold, 6),
                **{k: v for k, v in calibration.figures.items() if k != "skipped"},
                "skipped": len(calibration.figures["skipped"]),
            },
            indent=2,
        )
    )
    print(f"calibrate: wrote {output}", file=sys.stderr)
    return 0
