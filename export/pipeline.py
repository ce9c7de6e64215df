"""`voicegate export`: GE2E weights → validated ONNX models → Triton model repository.

Every model is built and validated in a scratch folder first; the repository is only written
once all checks pass, so a failed export never leaves a broken model behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from export import repository as repo
from export import validation
from export.devdata import DevSet, load_dev_set
from server.errors import ExportError

log = logging.getLogger("voicegate.export")

# Batch size of the mixed-utterance check: what Triton's dynamic batcher can put together.
SERVED_BATCH = 64


def run_export(
    target: str = "cpu",
    repository: Path | None = None,
    data_dir: Path | None = None,
    validation_utterances: int = 40,
) -> dict[str, Any]:
    """Export, validate and install the `target` models; returns the report (also printed).

    repository None: model_repository/ for cpu, build/model_repository_gpu/ for gpu.
    data_dir None: `VOICEGATE_DATA_DIR`; without it the real-speech checks are skipped loudly.
    """
    import onnx
    import onnxruntime
    import torch

    from export.encoder import load_encoder, pretrained_path
    from export.onnx_export import OPSET, export_onnx

    repo.check_target(target)
    if validation_utterances < 1:
        raise ExportError("validation_utterances must be at least 1")
    repository = repository or repo.DEFAULT_REPOSITORY[target]
    repo.check_no_other_target(repository, target)
    started = time.perf_counter()
    warnings: list[str] = []
    dev = _dev_set(data_dir, validation_utterances, warnings)

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
    with tempfile.TemporaryDirectory(prefix="voicegate-export-") as scratch:
        work = Path(scratch)
        encoder = load_encoder()
        fp32 = export_onnx(encoder, work / "ge2e_fp32.onnx")
        report["fp32_vs_torch"] = check_fp32(encoder, fp32, dev)
        models = {"ge2e_fp32": {"precision": "fp32", "fp32_vs_torch": report["fp32_vs_torch"]}}
        files = {"ge2e_fp32": fp32}
        if target == "cpu":
            files["ge2e_int8"], models["ge2e_int8"] = build_int8(fp32, work, dev, warnings)
        else:
            files["ge2e_fp16"], models["ge2e_fp16"] = build_fp16(fp32, work, dev, warnings)
        common = {k: report[k] for k in ("target", "opset", "versions", "data")}
        reports = {name: {"model": name, **common, **figures} for name, figures in models.items()}
        report["models"] = repo.write_repository(repository, target, files, reports)
    report["export_seconds"] = round(time.perf_counter() - started, 1)
    print_summary(report)
    return report


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


def build_int8(
    fp32: Path, work: Path, dev: DevSet | None, warnings: list[str]
) -> tuple[Path, dict[str, Any]]:
    """Quantize, check the node layout, and compare utterance embeddings to fp32."""
    import onnx

    from export.quantize import lstm_nodes, quantize_int8

    path = work / "ge2e_int8.onnx"
    with _quiet_root_logger():  # ORT's quantizer logs a generic pre-processing hint
        excluded = quantize_int8(fp32, path)
    layout = [node.op_type for node in lstm_nodes(onnx.load(str(path)))]
    if layout != ["LSTM", "DynamicQuantizeLSTM", "DynamicQuantizeLSTM"]:
        raise ExportError(f"int8 model has LSTM layout {layout}; expected the first one fp32")
    figures: dict[str, Any] = {
        "precision": "int8 dynamic, per-channel weights, first LSTM fp32",
        "fp32_nodes": excluded,
        "lstm_layout": layout,
    }
    figures.update(_compare_to_fp32("int8", path, fp32, dev, warnings))
    return path, figures


def build_fp16(
    fp32: Path, work: Path, dev: DevSet | None, warnings: list[str]
) -> tuple[Path, dict[str, Any]]:
    """Convert to fp16 and compare on ORT CPU where it runs.

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
    try:
        figures.update(_compare_to_fp32("fp16", path, fp32, dev, warnings))
    except ExportError:
        raise
    except Exception as exc:  # an ORT build that cannot load fp16 on CPU at all
        note = f"fp16 could not run on ONNX Runtime CPU ({exc}); validate it on the GPU"
        log.warning(note)
        warnings.append(note)
        figures["validated_on"] = "not validated"
    return path, figures


def print_summary(report: dict[str, Any]) -> None:
    lines = [
        f"voicegate export: target {report['target']} → {report['repository']} "
        f"in {report['export_seconds']} s",
        f"  data: {report['data']['summary']}",
        f"  fp32 ONNX vs torch: max abs diff {report['fp32_vs_torch']['max_abs_diff']:.2g} "
        f"(limit {report['fp32_vs_torch']['limit']:g})",
    ]
    for name, info in report["models"].items():
        line = f"  {name}: {info['onnx_bytes'] / 1e6:.2f} MB, {info['precision']}"
        cosine = info.get("vs_fp32", {}).get("per_utterance")
        if cosine:
            batched = info["vs_fp32"]["mixed_batches"]
            line += (
                f"; cosine to fp32 min {cosine['cosine_min']:.5f} mean {cosine['cosine_mean']:.5f}"
                f" (mixed batches of {SERVED_BATCH}: min {batched['cosine_min']:.5f})"
            )
        lines.append(line)
    lines += [f"  WARNING: {w}" for w in report["warnings"]]
    print("\n".join(lines))


def _compare_to_fp32(
    label: str, candidate: Path, fp32: Path, dev: DevSet | None, warnings: list[str]
) -> dict[str, Any]:
    from export.onnx_export import run, session

    if dev is None:
        return {"vs_fp32": "skipped: no development speech"}
    ref_sess, cand_sess = session(fp32), session(candidate)

    def ref(m: np.ndarray) -> np.ndarray:
        return run(ref_sess, m)

    def cand(m: np.ndarray) -> np.ndarray:
        return run(cand_sess, m)

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


def _dev_set(data_dir: Path | None, n: int, warnings: list[str]) -> DevSet | None:
    if data_dir is None and os.environ.get("VOICEGATE_DATA_DIR"):
        data_dir = Path(os.environ["VOICEGATE_DATA_DIR"])
    if data_dir is None or not data_dir.is_dir():
        note = (
            f"development speech not found (data_dir={data_dir}, VOICEGATE_DATA_DIR unset or "
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


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
