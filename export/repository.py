"""Triton model-repository layout: what each target holds and how it is written."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from export import triton_config
from server.errors import ExportError

# cpu: the Triton bundled in nvidia-pytriton (Python backend only), int8 is the served default.
# gpu: the NGC Triton container's ONNX Runtime backend; dynamic int8 has no CUDA kernels there,
# so fp16 on the CUDA provider, and the fp32 ONNX through the TensorRT provider in FP16.
ENCODER_MODELS = {
    "cpu": ("ge2e_int8", "ge2e_fp32"),
    "gpu": ("ge2e_fp32", "ge2e_fp16", "ge2e_trt_fp16"),
}
# Silero VAD (export/vad.py), fp32 on both targets.
VAD_MODEL = triton_config.VAD_MODEL
TARGET_MODELS = {target: (*names, VAD_MODEL) for target, names in ENCODER_MODELS.items()}
DEFAULT_REPOSITORY = {"cpu": Path("model_repository"), "gpu": Path("build/model_repository_gpu")}
MODEL_PY_SOURCE = Path(__file__).with_name("triton_python_model.py")
VERSION = "1"


def check_target(target: str) -> None:
    if target not in TARGET_MODELS:
        raise ExportError(f"unknown export target {target!r}; use one of {sorted(TARGET_MODELS)}")


def committed_files(target: str) -> dict[str, bytes]:
    """Path (relative to the repository) → content of every generated file that is not build
    output: configs, and for cpu the model.py wrapper."""
    check_target(target)
    files: dict[str, bytes] = {}
    for name in TARGET_MODELS[target]:
        if target == "cpu":
            files[f"{name}/config.pbtxt"] = triton_config.cpu_config(name).encode()
            files[f"{name}/{VERSION}/model.py"] = MODEL_PY_SOURCE.read_bytes()
        else:
            files[f"{name}/config.pbtxt"] = triton_config.gpu_config(name).encode()
    for path, content in files.items():
        if path.endswith(".pbtxt"):
            triton_config.parse_config(content.decode())
    return files


def check_no_other_target(repository: Path, target: str) -> None:
    """Refuse to overwrite the other target's models (both have a ge2e_fp32)."""
    files = committed_files(target)
    for name in TARGET_MODELS[target]:
        config = repository / name / "config.pbtxt"
        if not config.is_file():
            continue
        wanted = triton_config.parse_config(files[f"{name}/config.pbtxt"].decode())
        found = triton_config.parse_config(config.read_text())
        if (found.backend, found.platform) != (wanted.backend, wanted.platform):
            raise ExportError(
                f"{config} belongs to another export target ({found.backend or found.platform}); "
                f"write the {target} target to another repository"
            )


def write_repository(
    repository: Path, target: str, onnx_files: dict[str, Path], reports: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Install each model's ONNX file, config (and model.py) and export_report.json.

    Writes the target's models found in `onnx_files` (an export of only some models leaves the
    others as they are).
    """
    files = committed_files(target)
    written: dict[str, dict[str, Any]] = {}
    for name in (n for n in TARGET_MODELS[target] if n in onnx_files):
        version_dir = repository / name / VERSION
        data = onnx_files[name].read_bytes()
        _write(version_dir / "model.onnx", data)
        for path, content in files.items():
            if path.startswith(f"{name}/"):
                _write(repository / path, content)
        info = {
            "onnx_bytes": len(data),
            "onnx_sha256": hashlib.sha256(data).hexdigest(),
            **reports.get(name, {}),
        }
        _write(version_dir / "export_report.json", (json.dumps(info, indent=2) + "\n").encode())
        written[name] = info
    return written


def _write(path: Path, content: bytes) -> None:
    # Via a temporary file and a rename: a running Triton never reads a half-written model.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
