"""The MFCC verifier, score fusion and the calibration's helpers (fast unit tests)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from server.calibration import (
    DEGRADATIONS,
    Recording,
    Side,
    Trials,
    add_noise,
    assign_folds,
    band_pass,
    build_trials,
    degrade,
    equal_error_rate,
    error_rates,
    mfcc_scores,
    split_halves,
    threshold_at_far,
    worst_case_threshold,
)
from server.fusion import Calibration, CalibrationFileError
from server.mfcc import MFCC_DIMENSION, mfcc_score, mfcc_statistics

ROOT = Path(__file__).resolve().parents[1]
INT8_MODEL = ROOT / "model_repository" / "ge2e_int8" / "1" / "model.onnx"
VAD_MODEL = ROOT / "model_repository" / "silero_vad" / "1" / "model.onnx"
RATE = 16_000


def _tone(freq: float, seconds: float = 1.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _speechlike(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """Noise with a syllable-rate envelope: enough structure for the degradations."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * np.arange(n) / RATE)
    return (0.1 * envelope * rng.standard_normal(n)).astype(np.float32)


def _calibration(**changes: object) -> Calibration:
    values: dict[str, object] = {
        "ge2e_weight": 18.0,
        "mfcc_weight": 10.0,
        "bias": -14.0,
        "threshold": 0.5,
        "mfcc_mean": [0.0, 1.0, 2.0],
        "mfcc_std": [1.0, 0.5, 2.0],
        "method": "test",
        "trained_on": "nothing",
        "figures": {"held_out_eer_percent": {"fused": 8.0}},
    }
    values.update(changes)
    return Calibration(**values)  # type: ignore[arg-type]


# ---------------------------------------------------------------- MFCC statistics


def test_mfcc_statistics_shape_and_finite() -> None:
    for wav in (_speechlike(3.0), _tone(440.0, 0.6), np.zeros(8000, np.float32), _tone(300, 0.01)):
        stats = mfcc_statistics(wav)
        assert stats.shape == (MFCC_DIMENSION,)
        assert stats.dtype == np.float32
        assert np.isfinite(stats).all()


def test_mfcc_statistics_rejects_multichannel() -> None:
    with pytest.raises(ValueError, match="1-D"):
        mfcc_statistics(np.zeros((2, 16000), np.float32))


def test_mfcc_score_is_a_cosine_after_standardising() -> None:
    a = np.array([1.0, 2.0, 3.0])
    b = np.array([1.0, 2.5, 2.0])
    mean, std = [1.0, 2.0, 2.0], [1.0, 0.5, 2.0]
    za, zb = (a - mean) / std, (b - mean) / std
    expected = za @ zb / np.linalg.norm(za) / np.linalg.norm(zb)
    assert mfcc_score(a, b, (mean, std)) == pytest.approx(expected)
    assert mfcc_score(a, a, (mean, std)) == pytest.approx(1.0)
    assert mfcc_score(a, np.asarray(mean), (mean, std)) == 0.0  # zero vector: 0, not NaN
    with pytest.raises(ValueError, match="equal-length"):
        mfcc_score(a, b[:2])
    with pytest.raises(ValueError, match="normalization"):
        mfcc_score(a, b, ([0.0], [1.0]))


def test_mfcc_same_speaker_scores_higher(speech_files: list[Path]) -> None:
    """On real halves of 4 recordings, each speaker's own half beats the other speakers'."""
    from server.audio import load_file
    from server.features import prepare_utterance

    calibration = Calibration.load(None)
    firsts, seconds = [], []
    for path in speech_files[:4]:
        a, b = split_halves(load_file(str(path)))
        firsts.append(mfcc_statistics(prepare_utterance(a).speech))
        seconds.append(mfcc_statistics(prepare_utterance(b).speech))
    norm = calibration.mfcc_normalization
    scores = np.array([[mfcc_score(a, b, norm) for b in seconds] for a in firsts])
    for i in range(len(scores)):
        others = np.delete(scores[i], i)
        assert scores[i, i] > others.max(), scores


# ---------------------------------------------------------------- fusion and its file


def test_fusion_is_monotonic_in_each_score() -> None:
    calibration = Calibration.load(None)
    assert calibration.ge2e_weight > 0 and calibration.mfcc_weight > 0
    grid = np.linspace(-1.0, 1.0, 21)
    for fixed in (-0.5, 0.0, 0.5, 0.9):
        by_ge2e = [calibration.fuse(g, fixed) for g in grid]
        by_mfcc = [calibration.fuse(fixed, m) for m in grid]
        assert all(0.0 <= v <= 1.0 for v in by_ge2e + by_mfcc)
        assert np.all(np.diff(by_ge2e) > 0) and np.all(np.diff(by_mfcc) > 0)


def test_fuse_and_decide() -> None:
    calibration = _calibration()
    assert calibration.fuse(0.7, 0.14) == pytest.approx(1 / (1 + math.exp(-(12.6 + 1.4 - 14))))
    assert calibration.fuse(-100.0, -100.0) == pytest.approx(0.0)  # no overflow
    assert calibration.fuse(100.0, 100.0) == pytest.approx(1.0)
    assert calibration.decide(0.5) and not calibration.decide(0.4999)


@pytest.mark.parametrize("trim", ["vad", "energy"])
def test_packaged_calibration_matches_the_mfcc_statistics(trim: str) -> None:
    """One packaged file per silence trim, each fitted with it."""
    calibration = Calibration.load(None, trim)
    assert calibration.trim == calibration.figures["trim"] == trim
    assert len(calibration.mfcc_mean) == len(calibration.mfcc_std) == MFCC_DIMENSION
    assert 0.0 < calibration.threshold < 1.0
    eers = calibration.figures["held_out_eer_percent"]
    assert set(eers) == {"ge2e", "mfcc", "fused"}


def test_save_load_roundtrip(tmp_path: Path) -> None:
    calibration = _calibration()
    path = tmp_path / "sub" / "calibration.json"
    calibration.save(path)
    assert Calibration.load(path) == calibration
    assert json.loads(path.read_text())["format_version"] == 1
    assert not [p for p in path.parent.iterdir() if p.name != "calibration.json"]  # no temp left


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"format_version": 1}', "missing field"),
        ('{"format_version": 7}', "format_version 7"),
    ],
)
def test_bad_file_text_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CalibrationFileError, match=message) as caught:
        Calibration.load(path)
    assert str(path) in caught.value.message


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"threshold": 1.5}, "threshold must lie strictly between 0 and 1"),
        ({"ge2e_weight": "high"}, "ge2e_weight must be a number"),
        ({"bias": None}, "bias must be a number"),
        ({"mfcc_std": [1.0, 0.0, 1.0]}, "mfcc_std values must all be > 0"),
        ({"mfcc_std": [1.0]}, "mfcc_mean has 3 values but mfcc_std has 1"),
        ({"mfcc_mean": []}, "mfcc_mean must be a non-empty list"),
        ({"mfcc_mean": [0.0, "x", 1.0]}, "finite numbers"),
        ({"figures": []}, "figures must be an object"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_bad_file_content_is_a_clear_error(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    data = _calibration().to_dict()
    data.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CalibrationFileError, match=message):
        Calibration.load(path)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CalibrationFileError, match="cannot be read"):
        Calibration.load(tmp_path / "absent.json")


# ---------------------------------------------------------------- error rates


def test_eer_on_a_hand_computed_example() -> None:
    scores = np.array([0.6, 0.7, 0.8, 0.9, 0.1, 0.2, 0.3, 0.65])
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    eer, threshold = equal_error_rate(scores, labels)
    assert eer == pytest.approx(0.25)
    assert threshold == pytest.approx(0.65)
    assert error_rates(scores, labels, threshold) == (0.25, 0.25)
    assert threshold_at_far(scores, labels, 0.0) == pytest.approx(0.7)
    assert worst_case_threshold([(scores, labels)]) == pytest.approx(threshold)


def test_eer_of_separated_and_gaussian_scores() -> None:
    labels = np.array([True] * 5 + [False] * 5)
    assert equal_error_rate(np.r_[np.arange(5) + 10.0, np.arange(5)], labels)[0] == 0.0
    assert equal_error_rate(np.r_[np.arange(5), np.arange(5) + 10.0], labels)[0] == 1.0
    rng = np.random.default_rng(0)
    n = 20_000
    scores = np.r_[rng.normal(2.0, 1.0, n), rng.normal(0.0, 1.0, n)]
    gaussian_labels = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    eer, threshold = equal_error_rate(scores, gaussian_labels)
    assert eer == pytest.approx(0.1587, abs=0.006)  # Phi(-d'/2) with d' = 2
    assert threshold == pytest.approx(1.0, abs=0.05)
    far_threshold = threshold_at_far(scores, gaussian_labels, 0.01)
    assert error_rates(scores, gaussian_labels, far_threshold)[0] <= 0.01
    assert far_threshold == pytest.approx(2.326, abs=0.06)


def test_worst_case_threshold_holds_in_every_condition() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    labels = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    harsh = np.r_[rng.normal(1.5, 1.0, n), rng.normal(0.0, 1.0, n)]  # targets score lower
    easy = np.r_[rng.normal(3.0, 1.0, n), rng.normal(0.5, 1.0, n)]  # impostors score higher
    threshold = worst_case_threshold([(harsh, labels), (easy, labels)])
    far = max(error_rates(harsh, labels, threshold)[0], error_rates(easy, labels, threshold)[0])
    frr = max(error_rates(harsh, labels, threshold)[1], error_rates(easy, labels, threshold)[1])
    assert far == pytest.approx(frr, abs=0.005)
    assert threshold > equal_error_rate(harsh, labels)[1]
    strict = worst_case_threshold([(harsh, labels), (easy, labels)], target_far=0.02)
    assert error_rates(easy, labels, strict)[0] <= 0.02


def test_error_rate_helpers_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="both"):
        equal_error_rate(np.array([0.1, 0.2]), np.array([True, True]))
    with pytest.raises(ValueError, match="labels"):
        equal_error_rate(np.array([0.1, 0.2]), np.array([True]))
    with pytest.raises(ValueError, match="finite"):
        equal_error_rate(np.array([np.nan, 0.2]), np.array([True, False]))


# ---------------------------------------------------------------- degradations and trials


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_degradations_keep_length_and_finite_values(kind: str) -> None:
    wav = _speechlike(1.3)
    out, detail = degrade(wav, np.random.default_rng(3), kind)
    assert out.shape == wav.shape and out.dtype == np.float32
    assert np.isfinite(out).all() and np.abs(out).max() <= 1.0
    assert detail.startswith(kind)
    again, _ = degrade(wav, np.random.default_rng(3), kind)
    np.testing.assert_array_equal(out, again)  # seeded


def test_every_codec_roundtrips() -> None:
    from server.calibration import codec_roundtrip

    wav = _speechlike(0.7)
    for codec in ("vorbis", "opus", "mp3"):
        out = codec_roundtrip(wav, codec, 0.9)
        assert out.shape == wav.shape and np.isfinite(out).all()


def test_noise_level_and_band_pass() -> None:
    wav = _speechlike(2.0)
    noisy = add_noise(wav, 10.0, 0.0, np.random.default_rng(0))
    snr = 10 * np.log10(np.mean(wav.astype(float) ** 2) / np.mean((noisy - wav).astype(float) ** 2))
    assert snr == pytest.approx(10.0, abs=0.3)

    def kept(freq: float) -> float:
        tone = _tone(freq)
        return float(np.std(band_pass(tone, 300.0, 3400.0)[4000:]) / np.std(tone))

    assert kept(1000.0) > 0.9 and kept(60.0) < 0.05 and kept(7000.0) < 0.05


def test_degrade_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown degradation"):
        degrade(_speechlike(0.5), np.random.default_rng(0), "reverb")


def test_split_halves_cuts_near_the_middle_at_a_pause() -> None:
    wav = _speechlike(4.0)
    wav[int(2.2 * RATE) : int(2.25 * RATE)] = 0.0
    first, second = split_halves(wav)
    assert len(first) + len(second) == len(wav)
    assert 2.2 * RATE <= len(first) <= 2.25 * RATE


def test_trials_stay_within_speaker_disjoint_folds() -> None:
    rng = np.random.default_rng(0)
    folds = assign_folds(23, 5, rng)
    assert sorted(np.bincount(folds)) == [4, 4, 5, 5, 5]
    trials = build_trials(folds, impostors=3, rng=rng)
    assert trials.labels.sum() == 23
    assert np.all(folds[trials.enrol] == folds[trials.test])
    assert np.all(trials.fold == folds[trials.enrol])
    assert len(trials) == 23 + 23 * 3
    pairs = set(zip(trials.enrol.tolist(), trials.test.tolist(), strict=True))
    assert len(pairs) == len(trials)  # impostors drawn without replacement


def test_vectorised_mfcc_scores_match_the_serving_function() -> None:
    rng = np.random.default_rng(0)

    def side() -> Side:
        return Side(np.zeros(256, np.float32), rng.normal(size=6).astype(np.float32), 1.0)

    recordings = [Recording(str(i), f"{i}.flac", side(), side(), "noise", "") for i in range(4)]
    trials = Trials(
        enrol=np.array([0, 0, 1, 3]),
        test=np.array([0, 2, 1, 1]),
        labels=np.array([True, False, True, False]),
        fold=np.zeros(4, np.int64),
    )
    norm = (rng.normal(size=6).tolist(), rng.uniform(0.5, 2.0, 6).tolist())
    expected = [
        mfcc_score(recordings[i].a.statistics, recordings[j].b.statistics, norm)
        for i, j in zip(trials.enrol, trials.test, strict=True)
    ]
    np.testing.assert_allclose(mfcc_scores(recordings, trials, norm), expected, atol=1e-9)


# ---------------------------------------------------------------- the whole calibration


@pytest.mark.parametrize("trim", ["vad", "energy"])
def test_calibrate_end_to_end_on_a_few_speakers(trim: str, data_dir: Path, tmp_path: Path) -> None:
    from server.calibration import calibrate

    for model in (INT8_MODEL, VAD_MODEL):
        if not model.exists():
            pytest.skip(f"{model.relative_to(ROOT)} is not exported (run `make export`)")
    calibration = calibrate(
        data_dir,
        INT8_MODEL,
        seed=1,
        folds=2,
        impostors=4,
        limit=12,
        trim=trim,
        vad_model_path=VAD_MODEL,
    )
    assert calibration.trim == calibration.figures["trim"] == trim
    assert 0.0 < calibration.threshold < 1.0
    assert len(calibration.mfcc_mean) == MFCC_DIMENSION
    figures = calibration.figures
    assert figures["folds"] == 2 and figures["degraded_fraction"] == 1.0
    assert figures["same_speaker_trials"] + len(figures["skipped"]) == 12
    assert set(figures["held_out_eer_percent"]) == {"ge2e", "mfcc", "fused"}
    path = tmp_path / "calibration.json"
    calibration.save(path)
    assert Calibration.load(path) == calibration
