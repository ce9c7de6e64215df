"""Triton Python-backend model: runs this version's `model.onnx` with ONNX Runtime on CPU.

Copied by `voicegate export --target cpu` to `model_repository/<model>/1/model.py`; edit the
source in `export/triton_python_model.py`. The Triton bundled in the nvidia-pytriton wheel has
only the Python backend, so each ONNX model (the GE2E encoders, Silero VAD) is wrapped by this
file. It is generic: the inputs and outputs are the ones the model's config.pbtxt declares,
all FP32 with the batch axis first (max_batch_size > 0).

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


class TritonPythonModel:
    """One ORT session per model instance; requests of one shape go through it in one run."""

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
        # name -> dims after the batch axis (-1: any size), in the config's order
        self.inputs = {i["name"]: tuple(int(d) for d in i["dims"]) for i in config["input"]}
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests: list[Any]) -> list[Any]:
        """Concatenate same-shaped requests into one ORT run, then split the outputs back.

        Triton's dynamic batcher only merges requests whose shapes agree (no ragged batching),
        but requests are grouped by shape here as well, so any mix is served correctly.
        """
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[tuple[int, ...], ...], list[tuple[int, dict[str, np.ndarray]]]] = {}
        for index, request in enumerate(requests):
            try:
                arrays = self._inputs(request)
            except ValueError as exc:
                responses[index] = _error(str(exc), invalid=True)
                continue
            key = tuple(a.shape[1:] for a in arrays.values())
            groups.setdefault(key, []).append((index, arrays))
        for members in groups.values():
            self._run(members, responses)
        return responses

    def _run(self, members: list[tuple[int, dict[str, np.ndarray]]], responses: list[Any]) -> None:
        feeds = {name: np.concatenate([a[name] for _, a in members]) for name in self.inputs}
        rows = len(next(iter(feeds.values())))
        try:
            results = self.session.run(self.outputs, feeds)
        except Exception as exc:  # every request of the run shares the failure
            failure = f"{self.model_name}: ONNX Runtime failed on a batch of {rows}: {exc}"
            for index, _ in members:
                responses[index] = _error(failure)
            return
        offset = 0
        for index, arrays in members:
            n = len(next(iter(arrays.values())))
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[offset : offset + n], np.float32))
                for name, out in zip(self.outputs, results, strict=True)
            ]
            offset += n
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)

    def _inputs(self, request: Any) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for name, dims in self.inputs.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input {name!r} is missing")
            array = tensor.as_numpy()
            fits = array.ndim == len(dims) + 1 and all(
                d < 0 or d == s for d, s in zip(dims, array.shape[1:], strict=True)
            )
            if not fits:
                expected = ", ".join(["n", *(str(d) if d >= 0 else "any" for d in dims)])
                raise ValueError(
                    f"input {name!r} has shape {list(array.shape)}, expected [{expected}]"
                )
            if array.dtype != np.float32:
                raise ValueError(f"input {name!r} is {array.dtype}, expected float32")
            if not np.isfinite(array).all():
                raise ValueError(f"input {name!r} holds NaN or infinite values")
            arrays[name] = array
        rows = {len(a) for a in arrays.values()}
        if len(rows) > 1:
            raise ValueError(f"inputs have different batch sizes {sorted(rows)}")
        return arrays

    def finalize(self) -> None:
        self.session = None


def _error(message: str, invalid: bool = False) -> Any:
    error_type = pb_utils.TritonError
    code = getattr(error_type, "INVALID_ARG", None) if invalid else None
    error = error_type(message) if code is None else error_type(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)
