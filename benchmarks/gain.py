"""Loudness normalisation, per recording (resemblyzer) against per partial window (shipped):
dev-set EER of both, in one run, with each silence trim.

Why it matters: a recording's gain is known only at its end, so StreamingEmbed could not encode
a window before then; a window's gain is known with the window (server/features.py). This
checks that the change costs no accuracy.

What runs: `voicegate calibrate`'s recordings (one per speaker, cut at a pause near the middle
into A and B, B also degraded with the calibration's seeded degradations), prepared in process
exactly as the service prepares them (`core.prepare_wave`; trim "vad" with the exported VAD run
in process, `vad_model.OnnxVad`), embedded with the exported encoder in process (ONNX Runtime).
The "recording" rule scales every window's mel frames by the whole recording's gain (the rule
before); "window" is the service's. EER of the cosine over all A_i x B_j, B clean and B
degraded, and the paired difference window - recording with a 95 % bootstrap interval.

    .venv/bin/python -m benchmarks.gain [--limit N] [--bootstrap 1000] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import MODEL_REPOSITORY, add_data_dir_argument, log, require_data_dir
from benchmarks.eer import load_recordings
from benchmarks.trim import paired_difference

ENCODER = MODEL_REPOSITORY / "ge2e_int8" / "1" / "model.onnx"
VAD = MODEL_REPOSITORY / "silero_vad" / "1" / "model.onnx"
RULES = ("recording", "window")
SIDES = ("a", "b_clean", "b")


def recording_rule_partials(speech: np.ndarray, gain: np.float32 | None) -> np.ndarray:
    """The partial windows of `speech` (unscaled), every one scaled by one recording gain."""
    from server.features import HOP, partial_slices, power_mel

    slices = partial_slices(len(speech))
    padded = np.pad(speech, (0, max(0, slices[-1].stop * HOP - len(speech))))
    mel = power_mel(padded)
    factor = np.float32(1.0 if gain is None else float(gain) ** 2)
    return np.stack([mel[s] * factor for s in slices]).astype(np.float32)


def both_rules(wav: np.ndarray, vad: Any) -> dict[str, np.ndarray]:
    """The partial windows of one half under each rule (NotEnoughSpeech as the service)."""
    from server.calibration import MIN_HALF_SECONDS
    from server.core import prepare_wave
    from server.features import recording_gain, segments_speech, trim_silence
    from server.streaming_embed import vad_features
    from server.vad import VadParams, pad_to_frames

    if vad is None:
        prepared = prepare_wave(wav, MIN_HALF_SECONDS, with_mfcc=False)
        speech = trim_silence(wav)
        old = recording_rule_partials(speech, recording_gain(wav))
    else:
        trim = (vad.probabilities(pad_to_frames(wav)), VadParams(), vad.window_frames)
        prepared = prepare_wave(wav, MIN_HALF_SECONDS, with_mfcc=False, vad=trim)
        features = vad_features(wav, *trim)
        spans = [(s.start_sample, s.end_sample) for s in features.segments]
        old = recording_rule_partials(segments_speech(wav, spans), recording_gain(wav))
    return {"recording": old, "window": prepared.partials}


def embed_dev_set(
    data_dir: Path, trim: str, limit: int | None
) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """{rule: {side: [n, 256]}} over the recordings where every half has enough speech."""
    from server.calibration import OnnxEncoder
    from server.errors import NotEnoughSpeech
    from server.vad_model import OnnxVad

    encoder = OnnxEncoder(ENCODER)
    vad = OnnxVad(VAD) if trim == "vad" else None
    rows: dict[str, dict[str, list[np.ndarray]]] = {r: {s: [] for s in SIDES} for r in RULES}
    skipped = 0
    for recording in load_recordings(data_dir, 0, limit):  # the calibration's draws (seed 0)
        waves = (recording.a, recording.b_clean, recording.b_degraded)
        wavs = dict(zip(SIDES, waves, strict=True))
        try:
            halves = {side: both_rules(wav, vad) for side, wav in wavs.items()}
        except NotEnoughSpeech:
            skipped += 1
            continue
        for side, by_rule in halves.items():
            for rule, partials in by_rule.items():
                rows[rule][side].append(encoder.embed_partials(partials))
    stacked = {r: {s: np.stack(v) for s, v in sides.items()} for r, sides in rows.items()}
    return stacked, skipped


def compare(
    embeddings: dict[str, dict[str, np.ndarray]], bootstrap: int, seed: int
) -> dict[str, Any]:
    from server.calibration import equal_error_rate

    out: dict[str, Any] = {}
    for side in ("b_clean", "b"):
        figures: dict[str, Any] = {}
        for rule in RULES:
            e = embeddings[rule]
            n = len(e["a"])
            labels = np.eye(n, dtype=bool).ravel()
            eer = equal_error_rate((e["a"] @ e[side].T).ravel(), labels)[0]
            figures[f"eer_percent_{rule}"] = round(100 * float(eer), 2)
        figures["window_minus_recording"] = paired_difference(
            embeddings, side, bootstrap, seed, new="window", old="recording"
        )
        out["clean" if side == "b_clean" else "degraded"] = figures
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_dir_argument(parser)
    parser.add_argument("--limit", type=int, help="first N speakers only")
    parser.add_argument("--trims", default="energy,vad")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    data_dir = require_data_dir(parser, args.data_dir)
    from threadpoolctl import threadpool_limits

    results: dict[str, Any] = {}
    for trim in args.trims.split(","):
        started = time.monotonic()
        with threadpool_limits(limits=1):
            embeddings, skipped = embed_dev_set(data_dir, trim, args.limit)
        results[trim] = {
            "recordings": len(embeddings["window"]["a"]),
            "skipped": skipped,
            **compare(embeddings, args.bootstrap, args.seed),
        }
        log(f"trim {trim}: {time.monotonic() - started:.0f} s")
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
