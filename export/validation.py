"""Accuracy checks of exported models; each raises ExportError loudly when a model fails."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from server.errors import ExportError
from server.features import average_embedding

Embed = Callable[[np.ndarray], np.ndarray]  # partials [B, 160, 40] -> embeddings [B, 256]

FP32_MAX_ABS_DIFF = 1e-4
MIN_UTTERANCE_COSINE = 0.999


def random_partials(n: int, seed: int = 0) -> np.ndarray:
    """Power-mel-like noise: log-uniform over 1e-8..30, the range real partials span."""
    rng = np.random.default_rng(seed)
    return (10.0 ** rng.uniform(-8.0, 1.5, size=(n, 160, 40))).astype(np.float32)


def check_max_abs_diff(
    name: str,
    candidate: Embed,
    reference: Embed,
    batches: Sequence[np.ndarray],
    limit: float = FP32_MAX_ABS_DIFF,
) -> float:
    """Largest element-wise difference over `batches`; ExportError above `limit`."""
    worst = 0.0
    for mels in batches:
        worst = max(worst, float(np.max(np.abs(candidate(mels) - reference(mels)))))
    if not np.isfinite(worst) or worst > limit:
        raise ExportError(
            f"{name}: max abs difference {worst:.3g} to the reference exceeds {limit:g}"
        )
    return worst


def utterance_embeddings(embed: Embed, utterances: Sequence[np.ndarray]) -> np.ndarray:
    """[n_utterances, 256]: each utterance's partials in one run, then averaged, as served."""
    return np.stack([average_embedding(embed(partials)) for partials in utterances])


def batched_utterance_embeddings(
    embed: Embed, utterances: Sequence[np.ndarray], batch: int
) -> np.ndarray:
    """Like `utterance_embeddings`, but partials of several utterances share runs of up to
    `batch` rows, as Triton's dynamic batcher mixes requests."""
    flat = np.concatenate(utterances)
    out = np.concatenate([embed(flat[i : i + batch]) for i in range(0, len(flat), batch)])
    bounds = np.cumsum([0] + [len(u) for u in utterances])
    return np.stack([average_embedding(out[a:b]) for a, b in itertools.pairwise(bounds)])


def check_cosine(
    name: str,
    candidate: np.ndarray,
    reference: np.ndarray,
    files: Sequence[str],
    limit: float | None = MIN_UTTERANCE_COSINE,
) -> dict[str, Any]:
    """Per-utterance cosine of two embedding sets; ExportError when any is below `limit`
    (None: only measured, as the benchmarks do)."""
    cosine = np.sum(candidate * reference, axis=1) / (
        np.linalg.norm(candidate, axis=1) * np.linalg.norm(reference, axis=1)
    )
    cosine = np.nan_to_num(cosine, nan=-1.0)
    worst = int(np.argmin(cosine))
    figures = {
        "utterances": len(cosine),
        "cosine_min": round(float(cosine.min()), 6),
        "cosine_mean": round(float(cosine.mean()), 6),
        "worst_file": files[worst],
        "threshold": limit,
    }
    if limit is not None and cosine[worst] < limit:
        raise ExportError(
            f"{name}: utterance cosine to fp32 is {cosine[worst]:.5f} for {files[worst]}, "
            f"below {limit} (mean {cosine.mean():.5f} over {len(cosine)} utterances)"
        )
    return figures
