"""`voicegate export`: GE2E weights → validated ONNX models → Triton model repository.

Every model is built and validated in a scratch folder first; the repository is only written
once all checks pass, so a failed export never leaves a broken model behind.
"""

from __future__ import annotations

import functools
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export import evaluation, vad, validation
from export import repository as repo
from export.devdata import DevSet, load_dev_set, resolve_data_dir
from server.errors import ExportError

log = logging.getLogger("voicegate.export")

# Batch size of the mixed-utterance check: what Triton's dynamic batcher can put together.
SERVED_BATCH = evaluation.SERVED_BATCH


def run_export(
    target: str = "cpu",
    repository: Path | None = None,
    data_dir: Path | None = None,
    validation_utterances: int = 40,
    trial_recordings: int | None = None,
    throughput_rounds: int = 3,
    vad_only: bool = False,
) -> dict[str, Any]:
    """Export, validate and install the `target` models; returns the report (also printed).

    repository None: model_repository/ for cpu, build/model_repository_gpu/ for gpu.
    data_dir None: `VOICEGATE_DATA_DIR`, else the shared LibriSpeech folder when it exists
    (`devdata.resolve_data_dir`); without dev speech the real-speech checks are skipped loudly.
    validation_utterances: whole dev utterances for the cosine checks (the first in name order).
    trial_recordings: dev recordings whose halves make the EER trials (None: every recording
    not used for calibration). throughput_rounds: rounds of the partials/s comparison.
    vad_only: build, validate and install only the Silero VAD model (seconds instead of a
    minute; `make` uses it when only that model is missing), leaving the encoders as they are.
    """
    if vad_only:
        return run_vad_export(target, repository, data_dir)
    import onnx
    import onnxruntime
    import torch

    from export.encoder import load_encoder, pretrained_path
    from export.onnx_export import OPSET, export_onnx

    if validation_utterances < 1:
        raise ExportError("validation_utterances must be at least 1")
    repository = _check_repository(target, repository)
    started = time.perf_counter()
    warnings: list[str] = []
    dev_dir = resolve_data_dir(data_dir)
    with tempfile.TemporaryDirectory(prefix="voicegate-export-") as scratch:
        work = Path(scratch)
        # The VAD first: it takes seconds, the encoders a minute, and either can fail.
        vad_file, vad_report = _export_vad(work, target, dev_dir)
        dev = _dev_set(dev_dir, data_dir, validation_utterances, warnings)
        report: dict[str, Any] = {
            "target": target,
            "repository": str(repository),
            "opset": OPSET,
            "versions": {
                "onnxruntime": onnxruntime.__version__,
                "onnx": onnx.__version__,
                "torch": torch.__version__,
            },
            "weights": str(pretrained_path()),
            "data": _data_report(dev),
            "warnings": warnings,
        }
        encoder = load_encoder()
        fp32 = export_onnx(encoder, work / "ge2e_fp32.onnx")
        report["fp32_vs_torch"] = check_fp32(encoder, fp32, dev)
        models = {"ge2e_fp32": {"precision": "fp32", "fp32_vs_torch": report["fp32_vs_torch"]}}
        files = {"ge2e_fp32": fp32}
        recordings = evaluation.recordings(dev.data_dir) if dev else []
        calibration = None
        if target == "cpu":
            if dev:
                candidates = [p for p in recordings if p.name not in set(dev.files)]
                calibration = _calibration(candidates)
                report["calibration"] = calibration.figures
            files["ge2e_int8"], models["ge2e_int8"] = build_int8(
                encoder, work, calibration, warnings
            )
        else:
            files["ge2e_fp16"], models["ge2e_fp16"] = build_fp16(fp32, work)
            files["ge2e_trt_fp16"] = fp32
            models["ge2e_trt_fp16"] = {
                "precision": "TensorRT FP16 engine built from the fp32 ONNX at model load",
                "validated_on": (
                    "not validated here (needs a GPU with TensorRT): "
                    "python benchmarks/gpu_precision.py --onnx-dir <dir with these ONNX files>"
                ),
            }
        trials = [p for p in recordings if not calibration or p.name not in calibration.files]
        trials = trials[:trial_recordings] if trial_recordings is not None else trials
        report["precision"] = evaluate_precisions(
            target, files, models, dev, trials, throughput_rounds, warnings
        )
        common = {k: report[k] for k in ("target", "opset", "versions", "data")}
        summary = {"precision_summary": report["precision"]["table"]}
        reports = {
            name: {"model": name, **common, **figures, **summary}
            for name, figures in models.items()
        }
        files[vad.MODEL_NAME], reports[vad.MODEL_NAME] = vad_file, vad_report
        report["models"] = repo.write_repository(repository, target, files, reports)
    report["export_seconds"] = round(time.perf_counter() - started, 1)
    print_summary(report)
    return report


def run_vad_export(
    target: str = "cpu", repository: Path | None = None, data_dir: Path | None = None
) -> dict[str, Any]:
    """Only the Silero VAD model: build, validate (export/vad.py) and install it."""
    repository = _check_repository(target, repository)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="voicegate-export-") as scratch:
        path, vad_report = _export_vad(Path(scratch), target, resolve_data_dir(data_dir))
        models = repo.write_repository(
            repository, target, {vad.MODEL_NAME: path}, {vad.MODEL_NAME: vad_report}
        )
    report = {
        **{key: vad_report[key] for key in ("target", "versions", "data")},
        "repository": str(repository),
        "models": models,
        "export_seconds": round(time.perf_counter() - started, 1),
    }
    print(
        f"voicegate export: {vad.MODEL_NAME} ({target}) → {repository} in "
        f"{report['export_seconds']} s"
    )
    print(_vad_summary(models[vad.MODEL_NAME]))
    return report


def _check_repository(target: str, repository: Path | None) -> Path:
    """The repository to write `target` into (None: its default), checked to hold no other
    target's models."""
    repo.check_target(target)
    repository = repository or repo.DEFAULT_REPOSITORY[target]
    repo.check_no_other_target(repository, target)
    return repository


def _export_vad(work: Path, target: str, data_dir: Path | None) -> tuple[Path, dict[str, Any]]:
    """Build and validate the Silero VAD model in `work` (export/vad.py), checked on the dev
    speech in `data_dir` (None: noise only); its ONNX file and its export report."""
    import onnx
    import onnxruntime

    path, figures = vad.build_and_validate(work, data_dir)
    report = {
        "model": vad.MODEL_NAME,
        "target": target,
        "versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
        "data": {"data_dir": str(data_dir) if data_dir else None},
        **figures,
    }
    return path, report


def _vad_summary(info: dict[str, Any]) -> str:
    chunk, batch = info["vs_per_chunk"], info["batch_invariance"]
    return (
        f"  {vad.MODEL_NAME}: max abs diff {chunk['max_abs_diff']:.2g} to the per-chunk "
        f"silero_vad.onnx over {chunk['frames']} frames (limit {chunk['limit']:g}), batch "
        f"dependence {batch['max_abs_diff']:.2g} (limit {batch['limit']:g})"
    )


def check_fp32(encoder: Any, fp32: Path, dev: DevSet | None) -> dict[str, Any]:
    """ONNX Runtime fp32 against torch on real partials (when there are) and on noise."""
    import torch

    from export.onnx_export import run, session

    sess = session(fp32)

    def torch_embed(mels: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return encoder(torch.from_numpy(mels)).numpy()

    random = [validation.random_partials(n, seed=n) for n in (1, 7, 64)]
    real = _batches(dev.all_partials, SERVED_BATCH) if dev else []
    diff = validation.check_max_abs_diff(
        "fp32 ONNX vs torch", lambda m: run(sess, m), torch_embed, random + real
    )
    return {
        "max_abs_diff": float(f"{diff:.3g}"),
        "limit": validation.FP32_MAX_ABS_DIFF,
        "real_partials": sum(len(b) for b in real),
        "random_partials": sum(len(b) for b in random),
    }


@dataclass(frozen=True)
class Calibration:
    """The seeded dev-speech sample the int8 weights are rounded for (GPTQ)."""

    partials: np.ndarray
    files: frozenset[str]
    figures: dict[str, Any]


def _calibration(candidates: list[Path]) -> Calibration:
    from export import int8_invariant as inv

    partials, names = evaluation.calibration_sample(
        candidates, inv.CALIBRATION_SEED, inv.CALIBRATION_FILES, inv.CALIBRATION_PARTIALS
    )
    figures = {
        "seed": inv.CALIBRATION_SEED,
        "recordings": len(names),
        "partials": len(partials),
        "partials_sha256": inv.partials_digest(partials),
        "files": names,
        "drawn_from": (
            f"{len(candidates)} dev recordings (one per speaker) not among the validation "
            "utterances; they are also left out of the EER trials"
        ),
    }
    return Calibration(partials, frozenset(names), figures)


def build_int8(
    encoder: Any, work: Path, calibration: Calibration | None, warnings: list[str]
) -> tuple[Path, dict[str, Any]]:
    """The batch-invariant int8 encoder (export/int8_invariant.py) and its layout check."""
    import onnx

    from export import int8_invariant as inv
    from export.quantize import lstm_nodes

    bounds = inv.kernel_bounds()
    if calibration is None:
        note = (
            "no development speech to calibrate on: int8 weights are rounded to nearest "
            "instead of GPTQ (about 3x the embedding error)"
        )
        log.warning(note)
        warnings.append(note)
    model = inv.build_model(encoder, bounds, calibration.partials if calibration else None)
    path = work / "ge2e_int8.onnx"
    onnx.save(model, str(path))
    layout = [node.op_type for node in lstm_nodes(model)]
    if layout != ["LSTM", "DynamicQuantizeLSTM", "DynamicQuantizeLSTM"]:
        raise ExportError(f"int8 model has LSTM layout {layout}; expected the first one fp32")
    scale, zero_point = bounds.quantization()
    figures: dict[str, Any] = {
        "precision": (
            "int8, batch-invariant: DynamicQuantizeLSTM with activation ranges pinned by "
            "anchor units, GPTQ per-channel weights; first LSTM fp32"
        ),
        "lstm_layout": layout,
        "hidden_units": {"real": inv.HIDDEN, "anchors": inv.ANCHORS},
        "activation_quantization": {
            "scale": scale,
            "zero_point": zero_point,
            "how": (
                "uint8, per tensor; every tensor holds the anchors' h_max and h_min, so "
                "ONNX Runtime's min/max scale is this constant for any batch"
            ),
        },
        "anchors": bounds.as_dict(),
        "weights": {
            "type": "int8 symmetric, one scale per output channel (max |w| / 127)",
            "rounding": "GPTQ, act-order" if calibration else "round to nearest",
            "gptq_damping": inv.GPTQ_DAMPING if calibration else None,
        },
        "calibration": calibration.figures if calibration else None,
    }
    return path, figures


def build_fp16(fp32: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """Convert to fp16; `evaluate_precisions` compares it on ORT CPU where it runs.

    ORT's CPU provider has no fp16 LSTM: it inserts casts and computes those nodes in fp32, so
    this check covers the fp16 weights and fp16 tensors between nodes, not GPU fp16 arithmetic.
    """
    from export.quantize import convert_fp16

    path = work / "ge2e_fp16.onnx"
    convert_fp16(fp32, path)
    figures: dict[str, Any] = {
        "precision": "fp16 weights and compute, fp32 input/output",
        "validated_on": "ONNX Runtime CPU (fp16 nodes without CPU kernels run in fp32 there)",
    }
    return path, figures


# Models of each target that ONNX Runtime runs on this machine's CPU, and the ones whose
# partials/s on this CPU mean something (the gpu target's are measured on the GPU).
CPU_RUNNABLE = {"cpu": ("ge2e_fp32", "ge2e_int8"), "gpu": ("ge2e_fp32", "ge2e_fp16")}
CPU_TIMED = {"cpu": ("ge2e_fp32", "ge2e_int8"), "gpu": ()}
THROUGHPUT_BATCHES = (1, 8, 32)
# Issue 3: int8 partials/s at batch 32 at least this multiple of fp32's, same run.
MIN_INT8_SPEEDUP = 1.8


def evaluate_precisions(
    target: str,
    files: dict[str, Path],
    models: dict[str, dict[str, Any]],
    dev: DevSet | None,
    trials: list[Path],
    throughput_rounds: int,
    warnings: list[str],
) -> dict[str, Any]:
    """Every precision against fp32 on dev speech: cosine, EER, batch invariance, partials/s.

    Adds each model's figures to `models[name]`; raises ExportError when a reduced precision
    falls below the cosine floor, moves the EER by more than 0.1 points (with enough trials) or
    an int8 embedding depends on its batch-mates; returns the summary table.
    """
    from export.onnx_export import run, session
    from export.throughput import compare, speedup
    from server.calibration import MIN_HALF_SECONDS

    reference = "ge2e_fp32"
    embeds: dict[str, validation.Embed] = {}
    for name in CPU_RUNNABLE[target]:
        try:
            sess = session(files[name])
        except Exception as exc:  # e.g. an ORT build that cannot load fp16 on CPU at all
            note = f"{name} could not run on ONNX Runtime CPU ({exc}); validate it on the GPU"
            log.warning(note)
            warnings.append(note)
            models[name]["validated_on"] = "not validated"
            continue
        embeds[name] = functools.partial(run, sess)
    halves = evaluation.load_halves(trials) if trials else None
    if halves and halves.skipped:
        warnings.append(
            f"trial recordings skipped (a half under {MIN_HALF_SECONDS} s): {list(halves.skipped)}"
        )
    embedded = {n: evaluation.embed_halves(e, halves) for n, e in embeds.items()} if halves else {}
    mates = validation.random_partials(40, seed=11)
    targets = dev.all_partials[:24] if dev else validation.random_partials(24, seed=12)
    for name, embed in embeds.items():
        figures = models[name]
        if name != reference and dev is not None:
            figures.update(_compare_to_fp32(name, embed, embeds[reference], dev))
        if halves:
            figures["eer"] = {
                **evaluation.equal_error_rate(*embedded[name]),
                "recordings": len(halves.files),
                "trials": "two halves of each recording; first halves vs other recordings' "
                "second halves",
            }
            if name != reference:
                cosine = validation.check_cosine(
                    f"{name} (trial halves)",
                    np.concatenate(embedded[name]),
                    np.concatenate(embedded[reference]),
                    [f"{f} (1st half)" for f in halves.files]
                    + [f"{f} (2nd half)" for f in halves.files],
                )
                figures.setdefault("vs_fp32", {})["trial_halves"] = cosine
                _check_reduced_precision(name, figures, models[reference]["eer"], len(halves.files))
        invariance = evaluation.batch_invariance(embed, targets, mates)
        figures["batch_invariance"] = invariance
        if target == "cpu" and invariance["max_abs_diff"] > evaluation.INVARIANCE_LIMIT:
            raise ExportError(
                f"{name}: an embedding changes by {invariance['max_abs_diff']:.3g} with its "
                f"batch-mates (limit {evaluation.INVARIANCE_LIMIT:g})"
            )
    timed = {n: embeds[n] for n in CPU_TIMED[target] if n in embeds}
    if timed:
        speeds = compare(timed, THROUGHPUT_BATCHES, rounds=throughput_rounds)
        for name, figures in speeds.items():
            if name != reference:
                ratio = speedup(speeds, name, reference, THROUGHPUT_BATCHES[-1])
                figures[f"speedup_vs_fp32_at_{THROUGHPUT_BATCHES[-1]}"] = ratio
                if ratio < MIN_INT8_SPEEDUP:
                    warnings.append(
                        f"{name}: {ratio:.2f}x fp32's partials/s at batch "
                        f"{THROUGHPUT_BATCHES[-1]}, below {MIN_INT8_SPEEDUP}x (shared or busy "
                        "machine? see the spread; `python -m benchmarks.quantization`)"
                    )
            models[name]["throughput"] = figures
    return {"table": [_summary_row(n, files[n], models[n]) for n in models]}


def _check_reduced_precision(
    name: str, figures: dict[str, Any], reference_eer: dict[str, Any], recordings: int
) -> None:
    """The EER change against fp32 (the cosine floor is `validation.check_cosine`'s)."""
    delta = round(figures["eer"]["eer_percent"] - reference_eer["eer_percent"], 3)
    enforced = recordings >= evaluation.EER_MIN_RECORDINGS
    figures["eer"]["delta_vs_fp32_points"] = delta
    figures["eer"]["delta_limit_points"] = evaluation.EER_MAX_DELTA_POINTS
    figures["eer"]["delta_enforced"] = enforced
    if enforced and abs(delta) > evaluation.EER_MAX_DELTA_POINTS:
        raise ExportError(
            f"{name}: dev EER {figures['eer']['eer_percent']} % is {delta:+.3f} points from "
            f"fp32's {reference_eer['eer_percent']} % (limit {evaluation.EER_MAX_DELTA_POINTS})"
        )


def _summary_row(name: str, path: Path, figures: dict[str, Any]) -> dict[str, Any]:
    vs = figures.get("vs_fp32")
    vs = vs if isinstance(vs, dict) else {}
    cosines = [v for v in vs.values() if isinstance(v, dict)]
    speeds = figures.get("throughput", {}).get("by_batch", {})
    row: dict[str, Any] = {
        "model": name,
        "precision": figures["precision"],
        "onnx_mb": round(path.stat().st_size / 1e6, 2),
        "cosine_to_fp32_min": min((c["cosine_min"] for c in cosines), default=None),
        "cosine_to_fp32_mean": (vs.get("trial_halves") or vs["per_utterance"])["cosine_mean"]
        if cosines
        else None,
        "eer_percent": figures.get("eer", {}).get("eer_percent"),
        "partials_per_s": {b: v["partials_per_cpu_s"] for b, v in speeds.items()} or None,
        "batch_invariance_max_abs_diff": figures.get("batch_invariance", {}).get("max_abs_diff"),
    }
    if name == "ge2e_fp32":
        row["cosine_to_fp32_min"] = row["cosine_to_fp32_mean"] = 1.0
    return row


def print_summary(report: dict[str, Any]) -> None:
    lines = [
        f"voicegate export: target {report['target']} → {report['repository']} "
        f"in {report['export_seconds']} s",
        f"  data: {report['data']['summary']}",
        f"  fp32 ONNX vs torch: max abs diff {report['fp32_vs_torch']['max_abs_diff']:.2g} "
        f"(limit {report['fp32_vs_torch']['limit']:g})",
    ]
    if report.get("calibration"):
        cal = report["calibration"]
        lines.append(
            f"  int8 calibration: {cal['partials']} partials of {cal['recordings']} recordings, "
            f"seed {cal['seed']}, sha256 {cal['partials_sha256'][:16]}…"
        )
    batches = [str(b) for b in THROUGHPUT_BATCHES]
    lines.append(
        f"  {'model':14s} {'MB':>5s} {'cos min':>8s} {'cos mean':>8s} {'EER %':>6s} "
        + " ".join(f"{'p/s@' + b:>7s}" for b in batches)
        + f" {'batch dep.':>10s}"
    )

    def cell(value: Any, fmt: str, width: int) -> str:
        return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}s}"

    for row in report["precision"]["table"]:
        speeds = row["partials_per_s"] or {}
        lines.append(
            f"  {row['model']:14s} {row['onnx_mb']:5.2f} "
            f"{cell(row['cosine_to_fp32_min'], '.5f', 8)} "
            f"{cell(row['cosine_to_fp32_mean'], '.5f', 8)} "
            f"{cell(row['eer_percent'], '.2f', 6)} "
            + " ".join(cell(speeds.get(b), ".0f", 7) for b in batches)
            + f" {cell(row['batch_invariance_max_abs_diff'], '.2g', 10)}"
        )
    for name, info in report["models"].items():
        lines.append(f"  {name}: {info['precision']}")
        if name == vad.MODEL_NAME:
            lines.append(_vad_summary(info))
        ratio = info.get("throughput", {}).get(f"speedup_vs_fp32_at_{THROUGHPUT_BATCHES[-1]}")
        if ratio:
            lines.append(f"    {ratio:.2f}x fp32's partials/s at batch {THROUGHPUT_BATCHES[-1]}")
        eer = info.get("eer", {})
        if "delta_vs_fp32_points" in eer:
            lines.append(
                f"    dev EER {eer['eer_percent']:.2f} % "
                f"({eer['delta_vs_fp32_points']:+.2f} points vs fp32; "
                f"{eer['same_speaker_trials']} same-speaker, "
                f"{eer['different_speaker_trials']} different-speaker trials)"
            )
    lines.append(
        "  (p/s: partials per CPU-second, one ONNX Runtime thread; batch dep.: max abs change "
        "of an embedding between alone and batched with other partials)"
    )
    lines += [f"  WARNING: {w}" for w in report["warnings"]]
    print("\n".join(lines))


def _compare_to_fp32(
    label: str, cand: validation.Embed, ref: validation.Embed, dev: DevSet
) -> dict[str, Any]:
    """Whole dev utterances embedded by `cand` against fp32's (`ref`), one utterance per run
    and in mixed batches; ExportError below the cosine floor."""
    reference = validation.utterance_embeddings(ref, dev.partials)
    per_utterance = validation.check_cosine(
        f"{label} (one utterance per run)",
        validation.utterance_embeddings(cand, dev.partials),
        reference,
        dev.files,
    )
    # Dynamic quantization scales by the whole batch: an utterance's embedding depends on what
    # Triton batched with it, so check the served situation too.
    mixed = validation.check_cosine(
        f"{label} (mixed batches of {SERVED_BATCH})",
        validation.batched_utterance_embeddings(cand, dev.partials, SERVED_BATCH),
        reference,
        dev.files,
    )
    return {"vs_fp32": {"per_utterance": per_utterance, "mixed_batches": mixed}}


def _dev_set(
    data_dir: Path | None, requested: Path | None, n: int, warnings: list[str]
) -> DevSet | None:
    """The dev set of `data_dir` (resolved: None when there is none; `requested`: what the
    caller asked for, named in the warning)."""
    if data_dir is None:
        note = (
            f"development speech not found (data_dir={requested}, VOICEGATE_DATA_DIR unset or "
            "missing): the real-speech accuracy checks of the reduced-precision models are "
            "SKIPPED; fp32 is checked against torch on synthetic partials only"
        )
        log.warning(note)
        print(f"WARNING: {note}", file=sys.stderr)
        warnings.append(note)
        return None
    dev = load_dev_set(data_dir, n)
    if not dev.files:
        raise ExportError(f"no .flac or .wav files in {data_dir}")
    if len(dev.files) < n:
        warnings.append(f"only {len(dev.files)} of {n} validation utterances found in {data_dir}")
    return dev


def _data_report(dev: DevSet | None) -> dict[str, Any]:
    if dev is None:
        return {"summary": "none (real-speech checks skipped)", "data_dir": None}
    return {
        "summary": f"{len(dev.files)} utterances, {dev.n_partials} partials from {dev.data_dir}",
        "data_dir": str(dev.data_dir),
        "utterances": len(dev.files),
        "partials": dev.n_partials,
        "first_file": dev.files[0],
        "last_file": dev.files[-1],
    }


def _batches(array: np.ndarray, size: int) -> list[np.ndarray]:
    return [array[i : i + size] for i in range(0, len(array), size)]
