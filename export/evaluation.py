"""Development-speech figures of each exported precision: verification EER, cosine to fp32,
batch invariance, and the int8 calibration sample.

Trials. The dev set holds one recording per speaker (LibriSpeech, `server.calibration`'s
selection), so each recording is cut at a pause near its middle (`split_halves`, as
`voicegate calibrate` does): the same-speaker trials pair the two halves of one recording, the
different-speaker trials pair the first half of one recording with the second half of every
other. The halves are clean and come from one session, so the EER is low and mostly measures
how much a precision moves the scores: what this report is for. The recordings used to
calibrate the int8 weights are left out of these trials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.validation import Embed, batched_utterance_embeddings
from server.errors import ExportError, NotEnoughSpeech

SERVED_BATCH = 64
INVARIANCE_LIMIT = 1e-5
# An EER on fewer same-speaker trials moves by whole trials (1/n): too coarse to hold a
# precision to 0.1 points, so below this it is reported but not enforced.
EER_MIN_RECORDINGS = 100
EER_MAX_DELTA_POINTS = 0.1


@dataclass(frozen=True)
class Halves:
    """Both halves of each trial recording, cut into mel partials."""

    files: tuple[str, ...]
    first: tuple[np.ndarray, ...]
    second: tuple[np.ndarray, ...]
    skipped: tuple[str, ...]


def recordings(data_dir: Path) -> list[Path]:
    """One recording per speaker, in name order (the selection `voicegate calibrate` uses)."""
    from server.calibration import CalibrationError, dev_files

    try:
        return dev_files(data_dir)
    except CalibrationError as exc:
        raise ExportError(str(exc)) from None


def calibration_sample(
    files: Sequence[Path], seed: int, n_files: int, n_partials: int
) -> tuple[np.ndarray, list[str]]:
    """A seeded sample of `n_partials` mel partials from `n_files` of `files`."""
    from server.audio import load_file
    from server.features import prepare_utterance

    if not files:
        raise ExportError("no recordings left to calibrate the int8 weights on")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(files), size=min(n_files, len(files)), replace=False))
    paths = [files[i] for i in chosen]
    partials = np.concatenate([prepare_utterance(load_file(str(p))).partials for p in paths])
    rows = np.sort(rng.choice(len(partials), size=min(n_partials, len(partials)), replace=False))
    return np.ascontiguousarray(partials[rows]), [p.name for p in paths]


def load_halves(files: Sequence[Path]) -> Halves:
    """Split each recording in two (`server.calibration.split_halves`) and cut its partials;
    recordings with a half under `server.calibration.MIN_HALF_SECONDS` of speech are skipped
    (and listed)."""
    from server.audio import load_file
    from server.calibration import prepare_half, split_halves

    names, first, second, skipped = [], [], [], []
    for path in files:
        a, b = split_halves(load_file(str(path)))
        try:
            pa = prepare_half(a).partials
            pb = prepare_half(b).partials
        except NotEnoughSpeech:
            skipped.append(path.name)
            continue
        names.append(path.name)
        first.append(pa)
        second.append(pb)
    return Halves(tuple(names), tuple(first), tuple(second), tuple(skipped))


def embed_halves(embed: Embed, halves: Halves) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the first and of the second halves; partials of several halves share
    runs of up to SERVED_BATCH rows, as Triton's batcher mixes requests."""
    both = batched_utterance_embeddings(embed, [*halves.first, *halves.second], SERVED_BATCH)
    return both[: len(halves.files)], both[len(halves.files) :]


def equal_error_rate(first: np.ndarray, second: np.ndarray) -> dict[str, Any]:
    """EER of cosine scores: first[i] vs second[i] same speaker, first[i] vs second[j] not."""
    from server.calibration import equal_error_rate as eer

    scores = first.astype(np.float64) @ second.astype(np.float64).T
    labels = np.eye(len(first), dtype=bool)
    rate, threshold = eer(scores.ravel(), labels.ravel())
    return {
        "eer_percent": round(100.0 * rate, 3),
        "threshold": round(threshold, 5),
        "same_speaker_trials": int(labels.sum()),
        "different_speaker_trials": int((~labels).sum()),
    }


def batch_invariance(
    embed: Embed,
    targets: np.ndarray,
    mates: np.ndarray,
    batch_sizes: Sequence[int] = (2, 7, 32, SERVED_BATCH),
    seed: int = 0,
) -> dict[str, Any]:
    """Largest |embedding alone - embedding batched| over `targets` [n, 160, 40].

    Each target partial is embedded alone (a batch of 1), then shuffled with `mates` (other
    partials) into batches of each size, as Triton's dynamic batcher would put it with other
    requests; every row of every batch is compared with its embedding alone.
    """
    alone = np.concatenate([embed(targets[i : i + 1]) for i in range(len(targets))])
    rows = np.concatenate([targets, mates])
    reference = np.concatenate([alone, np.full((len(mates), alone.shape[1]), np.nan)])
    rng = np.random.default_rng(seed)
    worst = 0.0
    for size in batch_sizes:
        order = rng.permutation(len(rows))
        out = np.concatenate([embed(rows[order[i : i + size]]) for i in range(0, len(order), size)])
        is_target = order < len(targets)
        diff = np.abs(out[is_target] - reference[order[is_target]])
        worst = max(worst, float(diff.max()))
    return {
        "max_abs_diff": float(f"{worst:.3g}"),
        "limit": INVARIANCE_LIMIT,
        "partials": len(targets),
        "batch_sizes": list(batch_sizes),
        "method": "each partial alone vs shuffled with other partials into batches of each size",
    }
