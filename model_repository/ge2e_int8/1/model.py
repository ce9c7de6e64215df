"""Triton Python-backend model: runs this version's `model.onnx` with ONNX Runtime on CPU.

Copied by `voicegate export --target cpu` to `model_repository/<model>/1/model.py`; edit the
source in `export/triton_python_model.py`. The Triton bundled in the nvidia-pytriton wheel has
only the Python backend, so each ONNX encoder is wrapped by this file.

Config `parameters` (string values): intra_op_thread_count, inter_op_thread_count and
execution_mode (0 sequential, 1 parallel), named as in Triton's own ONNX Runtime backend.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import onnxruntime
import triton_python_backend_utils as pb_utils

INPUT = "mels"
OUTPUT = "embedding"
FRAMES, MELS = 160, 40


class TritonPythonModel:
    """One ORT session per model instance; a whole dynamic batch goes through it at once."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_thread_count") or 1)
        options.inter_op_num_threads = int(params.get("inter_op_thread_count") or 1)
        options.execution_mode = (
            onnxruntime.ExecutionMode.ORT_PARALLEL
            if params.get("execution_mode") == "1"
            else onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        )
        # Not ORT's default of spinning between runs: the cores are shared with preprocessing.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = onnxruntime.InferenceSession(
            path, options, providers=["CPUExecutionProvider"]
        )
        self.model_name = args.get("model_name", config.get("name", "model"))

    def execute(self, requests: list[Any]) -> list[Any]:
        """Concatenate the requests' partials into one ORT run, then split the embeddings back."""
        responses: list[Any] = [None] * len(requests)
        owners: list[int] = []
        parts: list[np.ndarray] = []
        for index, request in enumerate(requests):
            try:
                parts.append(_mels(request))
                owners.append(index)
            except ValueError as exc:
                responses[index] = _error(str(exc), invalid=True)
        rows = sum(len(part) for part in parts)
        if rows:
            try:
                (embeddings,) = self.session.run([OUTPUT], {INPUT: np.concatenate(parts)})
            except Exception as exc:  # every request of the batch shares the failure
                failure = f"{self.model_name}: ONNX Runtime failed on a batch of {rows}: {exc}"
                for index in owners:
                    responses[index] = _error(failure)
                return responses
        else:
            embeddings = np.zeros((0, 256), dtype=np.float32)
        offset = 0
        for index, part in zip(owners, parts, strict=True):
            chunk = np.ascontiguousarray(embeddings[offset : offset + len(part)], dtype=np.float32)
            offset += len(part)
            responses[index] = pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(OUTPUT, chunk)]
            )
        return responses

    def finalize(self) -> None:
        self.session = None


def _mels(request: Any) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
    if tensor is None:
        raise ValueError(f"input {INPUT!r} is missing")
    mels = tensor.as_numpy()
    if mels.ndim != 3 or mels.shape[1:] != (FRAMES, MELS):
        raise ValueError(f"input {INPUT!r} has shape {list(mels.shape)}, expected [n, 160, 40]")
    if mels.dtype != np.float32:
        raise ValueError(f"input {INPUT!r} is {mels.dtype}, expected float32")
    if not np.isfinite(mels).all():
        raise ValueError(f"input {INPUT!r} holds NaN or infinite values")
    return mels


def _error(message: str, invalid: bool = False) -> Any:
    error_type = pb_utils.TritonError
    code = getattr(error_type, "INVALID_ARG", None) if invalid else None
    error = error_type(message) if code is None else error_type(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
