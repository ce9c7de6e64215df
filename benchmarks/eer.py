"""Equal error rate of the running service on the development trials, through its gRPC API.

What is measured. The dev set has one recording per speaker (`server.calibration.dev_files`).
Each is cut at a pause near its middle (`split_halves`) into A and B, and B also goes through one
seeded random degradation (`server.calibration.degrade`; the same random draws as
`voicegate calibrate`, so with the same seed these are the calibration's own degraded halves).
A, clean B and degraded B are embedded with the Embed RPC (audio sent as raw 16 kHz float32,
`--concurrency` calls in flight) once per encoder (`ge2e_int8` and `ge2e_fp32`, same run).
Trials: same speaker = (A_i, B_i), different speaker = (A_i, B_j) for every i != j; the score is
the cosine of the embeddings. Reported: EER with B clean and with B degraded, per encoder.
Then the Verify RPC (default encoder, GE2E + MFCC fused and calibrated) scores the degraded
trials: every (A_i, degraded B_i) and `--verify-impostors` seeded (A_i, degraded B_j) per i;
its fused-score EER is reported beside the GE2E and MFCC scores it returns on the same trials.

Caveat: the packaged calibration was fitted on these same recordings and degradations (seed 0),
so Verify's fused EER here is an in-sample figure; the calibration's held-out (cross-validated)
EERs are in its `figures`. One same-speaker miss moves an EER by 1/#same-speaker trials.

Run (starts the service in-process with the embedded Triton, or uses `--server HOST:PORT`):

    .venv/bin/python -m benchmarks.eer [--server HOST:PORT] [--json eer.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from benchmarks.common import (
    GRPC_OPTIONS,
    add_data_dir_argument,
    in_process_service,
    log,
    model_fingerprints,
    require_data_dir,
    wait_serving,
)

MODELS = ("ge2e_int8", "ge2e_fp32")
SAMPLE_RATE = 16_000
T = TypeVar("T")


@dataclass(frozen=True)
class Recording:
    name: str
    speaker: str
    a: np.ndarray
    b_clean: np.ndarray
    b_degraded: np.ndarray
    degradation: str


def load_recordings(data_dir: Path, seed: int, limit: int | None) -> list[Recording]:
    """Split and degrade the dev recordings, drawing from the rng exactly as calibration does."""
    from server.audio import load_file
    from server.calibration import DEGRADATIONS, degrade, dev_files, speaker_of, split_halves

    rng = np.random.default_rng(seed)
    recordings = []
    for path in dev_files(data_dir)[:limit]:
        wav = load_file(str(path))
        first, second = split_halves(wav)
        rng.random()  # calibration's degrade_fraction draw (1.0: always degraded)
        kind = str(rng.choice(DEGRADATIONS))
        degraded, _ = degrade(second, rng, kind)
        recordings.append(
            Recording(
                name=path.name,
                speaker=speaker_of(path),
                a=first,
                b_clean=second,
                b_degraded=degraded,
                degradation=kind,
            )
        )
    return recordings


def raw_audio(wav: np.ndarray) -> Any:
    from server.api.voicegate.v1 import audio_pb2

    return audio_pb2.Audio(
        raw=audio_pb2.RawAudio(
            samples=np.ascontiguousarray(wav, dtype="<f4").tobytes(),
            format=audio_pb2.SAMPLE_FORMAT_FLOAT32,
            sample_rate_hz=SAMPLE_RATE,
            channels=1,
        )
    )


async def bounded(
    calls: Sequence[Callable[[], Awaitable[T]]], concurrency: int, label: str
) -> list[T | Exception]:
    """Run the calls with at most `concurrency` in flight; results (or errors) in order."""
    results: list[T | Exception] = [RuntimeError("not run")] * len(calls)
    next_index = 0
    done = 0
    started = time.monotonic()

    async def worker() -> None:
        nonlocal next_index, done
        while next_index < len(calls):
            index = next_index
            next_index += 1
            try:
                results[index] = await calls[index]()
            except Exception as exc:
                results[index] = exc
            done += 1
            if done % 500 == 0:
                log(f"{label}: {done}/{len(calls)} ({done / (time.monotonic() - started):.0f}/s)")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def not_enough_speech(exc: Exception) -> bool:
    import grpc

    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.INVALID_ARGUMENT


async def embed_all(
    stub: Any, recordings: Sequence[Recording], model: str, concurrency: int
) -> tuple[dict[str, np.ndarray], dict[int, str]]:
    """Embeddings [n, 256] of A, B clean and B degraded; recordings the server refused."""
    from server.api.voicegate.v1 import speaker_pb2

    sides = ("a", "b_clean", "b_degraded")
    jobs = [(side, i) for i in range(len(recordings)) for side in sides]

    def call(side: str, i: int) -> Callable[[], Awaitable[Any]]:
        request = speaker_pb2.EmbedRequest(
            audio=raw_audio(getattr(recordings[i], side)), model=model
        )
        return lambda: stub.Embed(request, timeout=120)

    results = await bounded([call(s, i) for s, i in jobs], concurrency, f"Embed {model}")
    out = {side: np.zeros((len(recordings), 256), dtype=np.float64) for side in sides}
    refused: dict[int, str] = {}
    for (side, i), result in zip(jobs, results, strict=True):
        if isinstance(result, Exception):
            if not not_enough_speech(result):
                raise result
            refused[i] = f"{side}: {result.details()}"  # type: ignore[attr-defined]
            continue
        if result.model != model:
            raise RuntimeError(f"asked for {model}, the server answered with {result.model}")
        out[side][i] = np.asarray(result.embedding, dtype=np.float64)
    return out, refused


def eer_with_interval(
    scores: np.ndarray, labels: np.ndarray, bootstrap: int, seed: int
) -> dict[str, Any]:
    """EER of [n, m] trials (row i: the trials of enrolment recording i) and a 95 % interval
    from resampling the rows (recordings) with replacement `bootstrap` times."""
    from server.calibration import equal_error_rate

    eer, threshold = equal_error_rate(scores.ravel(), labels.ravel())
    out: dict[str, Any] = {
        "eer_percent": round(100 * eer, 2),
        "threshold": round(threshold, 4),
        "same_speaker_trials": int(labels.sum()),
        "different_speaker_trials": int((~labels).sum()),
    }
    if bootstrap:
        rng = np.random.default_rng([seed, 2])
        replicates = []
        for _ in range(bootstrap):
            rows = rng.integers(0, len(scores), len(scores))
            if labels[rows].any() and not labels[rows].all():
                replicates.append(equal_error_rate(scores[rows].ravel(), labels[rows].ravel())[0])
        low, high = np.percentile(replicates, [2.5, 97.5])
        out["ci95_percent"] = [round(100 * float(low), 2), round(100 * float(high), 2)]
    return out


def cosine_eer(
    enrol: np.ndarray, test: np.ndarray, bootstrap: int = 0, seed: int = 0
) -> dict[str, Any]:
    """EER over all pairs: same speaker on the diagonal, different speakers off it."""
    return eer_with_interval(enrol @ test.T, np.eye(len(enrol), dtype=bool), bootstrap, seed)


def verify_trials(n: int, impostors: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(enrol, test) indices: every (i, i) and `impostors` seeded (i, j != i) per i."""
    rng = np.random.default_rng([seed, 1])
    enrol, test = [], []
    for i in range(n):
        enrol.append(i)
        test.append(i)
        others = np.delete(np.arange(n), i)
        for j in rng.choice(others, size=min(impostors, n - 1), replace=False):
            enrol.append(i)
            test.append(int(j))
    return np.asarray(enrol), np.asarray(test)


async def verify_all(
    stub: Any,
    recordings: Sequence[Recording],
    enrol: np.ndarray,
    test: np.ndarray,
    concurrency: int,
) -> dict[str, np.ndarray]:
    from server.api.voicegate.v1 import speaker_pb2

    a = [raw_audio(r.a) for r in recordings]
    b = [raw_audio(r.b_degraded) for r in recordings]

    def call(i: int, j: int) -> Callable[[], Awaitable[Any]]:
        request = speaker_pb2.VerifyRequest(reference=a[i], probe=b[j])
        return lambda: stub.Verify(request, timeout=120)

    calls = [call(int(i), int(j)) for i, j in zip(enrol, test, strict=True)]
    results = await bounded(calls, concurrency, "Verify")
    scores: dict[str, list[float]] = {"fused": [], "ge2e": [], "mfcc": []}
    for result in results:
        if isinstance(result, Exception):
            raise result
        scores["fused"].append(result.score)
        per_model = {s.model: s.score for s in result.scores}
        scores["ge2e"].append(per_model["ge2e"])
        scores["mfcc"].append(per_model["mfcc"])
    return {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}


async def measure(args: argparse.Namespace, recordings: list[Recording]) -> dict[str, Any]:
    import grpc

    from server.api.voicegate.v1 import speaker_pb2, speaker_pb2_grpc

    service: AbstractAsyncContextManager[str]
    if args.server:
        service = nullcontext(args.server)
    else:
        log("starting the service in-process (embedded Triton)")
        service = in_process_service(args.model_repository)
    async with service as target:
        await wait_serving(target, timeout_s=240)
        async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
            stub = speaker_pb2_grpc.SpeakerServiceStub(channel)
            probe = speaker_pb2.EmbedRequest(audio=raw_audio(recordings[0].a))
            default_model = (await stub.Embed(probe, timeout=120)).model
            embeddings: dict[str, dict[str, np.ndarray]] = {}
            refused: dict[int, str] = {}
            timings: dict[str, float] = {}
            for model in args.models:
                began = time.monotonic()
                embeddings[model], model_refused = await embed_all(
                    stub, recordings, model, args.concurrency
                )
                timings[f"embed_{model}_s"] = round(time.monotonic() - began, 1)
                refused.update(model_refused)
            keep = np.asarray([i for i in range(len(recordings)) if i not in refused])
            kept = [recordings[i] for i in keep]
            enrol, test = verify_trials(len(kept), args.verify_impostors, args.seed)
            began = time.monotonic()
            verify = await verify_all(stub, kept, enrol, test, args.concurrency)
            timings["verify_s"] = round(time.monotonic() - began, 1)

    per_model: dict[str, Any] = {}
    for model in args.models:
        e = {side: v[keep] for side, v in embeddings[model].items()}
        per_model[model] = {
            "clean": cosine_eer(e["a"], e["b_clean"], args.bootstrap, args.seed),
            "degraded": cosine_eer(e["a"], e["b_degraded"], args.bootstrap, args.seed),
        }
    labels = enrol == test
    per_row = 1 + min(args.verify_impostors, len(kept) - 1)  # trials of each enrolment, in order
    if default_model in embeddings:
        # The Embed cosine of the default encoder on exactly the Verify trials, for comparison.
        e = embeddings[default_model]
        cos = np.einsum("ij,ij->i", e["a"][keep][enrol], e["b_degraded"][keep][test])
        verify["embed_cosine_same_trials"] = cos
    verify_eer = {
        name: eer_with_interval(
            scores.reshape(-1, per_row), labels.reshape(-1, per_row), args.bootstrap, args.seed
        )
        for name, scores in verify.items()
    }
    kinds = [r.degradation for r in kept]
    return {
        "target": args.server or "in-process VoicegateApp (embedded Triton)",
        "data_dir": str(args.data_dir),
        "seed": args.seed,
        "local_models_sha256": model_fingerprints(args.model_repository),
        "recordings": len(kept),
        "refused": {recordings[i].name: why for i, why in sorted(refused.items())},
        "degradations": {k: kinds.count(k) for k in sorted(set(kinds))},
        "half_seconds_median": round(float(np.median([len(r.a) / SAMPLE_RATE for r in kept])), 2),
        "models": per_model,
        "verify": {
            "default_model": default_model,
            "same_speaker_trials": int(labels.sum()),
            "different_speaker_trials": int((~labels).sum()),
            "eer": verify_eer,
        },
        "one_same_speaker_miss_percent": round(100 / len(kept), 2),
        "timings": timings,
    }


def print_table(figures: dict[str, Any]) -> None:
    n = figures["recordings"]
    print(
        f"\nEER through {figures['target']}: {n} recordings (one per speaker), "
        f"halves of median {figures['half_seconds_median']} s; seed {figures['seed']}"
    )
    print(
        f"degraded B: {figures['degradations']}; refused: {len(figures['refused'])}; "
        f"local model_repository {figures['local_models_sha256']}"
    )
    print(
        f"\n{'EER, Embed cosine, all pairs':28s} {'B clean (95% CI)':>22s} "
        f"{'B degraded (95% CI)':>22s}   trials"
    )
    for model, rows in figures["models"].items():
        clean, degraded = rows["clean"], rows["degraded"]
        print(
            f"{model:28s} {_eer_text(clean):>22s} {_eer_text(degraded):>22s}   "
            f"{clean['same_speaker_trials']} same / {clean['different_speaker_trials']} different"
        )
    v = figures["verify"]
    print(
        f"\nVerify RPC on degraded trials (default encoder {v['default_model']}; "
        f"{v['same_speaker_trials']} same / {v['different_speaker_trials']} different)"
    )
    labels = {
        "fused": "fused score (calibrated)",
        "ge2e": "its ge2e score",
        "mfcc": "its mfcc score",
        "embed_cosine_same_trials": "Embed cosine, same trials",
    }
    for key, value in v["eer"].items():
        print(f"  {labels.get(key, key):26s} {_eer_text(value):>22s}")
    print(
        f"\none same-speaker miss = {figures['one_same_speaker_miss_percent']} EER points; "
        f"times: {figures['timings']}"
    )


def _eer_text(figure: dict[str, Any]) -> str:
    text = f"{figure['eer_percent']:.2f}%"
    if "ci95_percent" in figure:
        low, high = figure["ci95_percent"]
        text += f" ({low:.1f}-{high:.1f})"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--server", help="HOST:PORT of a running voicegate (default: start one)")
    add_data_dir_argument(parser)
    parser.add_argument(
        "--model-repository",
        type=Path,
        help="repository for the in-process service (default: model_repository)",
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--verify-impostors", type=int, default=10, help="per recording")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bootstrap", type=int, default=200, help="resamples of the recordings for the 95%% CIs"
    )
    parser.add_argument("--limit", type=int, help="first N speakers only (quick runs)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    args.data_dir = require_data_dir(parser, args.data_dir)

    began = time.monotonic()
    log(f"splitting and degrading the dev recordings of {args.data_dir}")
    recordings = load_recordings(args.data_dir, args.seed, args.limit)
    figures = asyncio.run(measure(args, recordings))
    figures["elapsed_s"] = round(time.monotonic() - began, 1)
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
